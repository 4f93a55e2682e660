package target

import (
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// Fault describes misbehaviour for tests. A fault applies to commands that
// match QID and Match, at most Times times (0: every time), until removed.
// The actions are applied in this order: Before, Stall, Close, Reply,
// Status, Drop, Delay.
type Fault struct {
	// QID selects the queue; AnyQueue matches all.
	QID int
	// Match selects commands; nil matches every command.
	Match func(cmd *nvme.Command) bool
	// Times limits how many commands the fault hits; 0 is unlimited.
	Times int
	// For limits how long after InjectFault the fault hits; 0 is for
	// ever. A Namespace Not Ready for a few seconds is
	// Fault{Match: MatchIO(), Status: nvme.NVME_SC_NS_NOT_READY, For: ...}.
	For time.Duration

	// Before runs when a matching command arrives, before the actions.
	Before func()
	// Stall stops reading from the connection for this long when a
	// matching command arrives, then executes it normally.
	Stall time.Duration
	// Close closes the connection when a matching command arrives,
	// before it is executed.
	Close bool
	// Reply sends these bytes instead of executing the command: a
	// malformed or hostile PDU. The function gets the command (for its
	// command ID). The connection stays open.
	Reply func(cmd *nvme.Command) []byte
	// Status, if not success, completes the command with this status
	// instead of executing it: a write's data is taken (R2T) but not
	// written, a read returns no data. For statuses such as the Path
	// Related ones (SCT 3) with or without NVME_STATUS_DNR. The Command
	// Retry Delay bits (NVME_STATUS_CRD: CRD index 1..3 into
	// Config.CRDT) are sent only once the host enabled Advanced Command
	// Retry (Host Behavior Support), as the spec asks; else cleared.
	Status nvme.Status
	// CorruptDataDigest sends the first C2HData PDU of a matching read
	// with a wrong data digest (when data digests were negotiated); the
	// command otherwise completes normally.
	CorruptDataDigest bool
	// Drop executes the command but never sends its response.
	Drop bool
	// Delay executes the command and sends its response this much later.
	Delay time.Duration
	// CloseAfterData closes the connection after sending this many bytes
	// of a read's data (mid-I/O), when > 0.
	CloseAfterData int
}

// AnyQueue as Fault.QID matches every queue; AnyIOQueue every queue but
// the admin queue.
const (
	AnyQueue   = -1
	AnyIOQueue = -2
)

// MatchOpcode matches admin commands (admin true) or I/O commands with the
// opcode.
func MatchOpcode(op uint8) func(*nvme.Command) bool {
	return func(c *nvme.Command) bool { return c.Opcode() == op }
}

// MatchIO matches every command but the Fabrics ones; with QID
// AnyIOQueue: the NVM I/O commands (read, write, flush, write zeroes,
// dataset management), not the I/O queues' Connect.
func MatchIO() func(*nvme.Command) bool {
	return func(c *nvme.Command) bool { return c.Opcode() != nvme.NVME_FABRICS_COMMAND }
}

// MatchKeepAlive matches Keep Alive commands.
func MatchKeepAlive() func(*nvme.Command) bool { return MatchOpcode(nvme.NVME_ADMIN_KEEP_ALIVE) }

type faultEntry struct {
	Fault
	hits  int
	until time.Time // zero: no end
}

// InjectFault installs f and returns a function that removes it.
func (t *Target) InjectFault(f Fault) (remove func()) {
	e := &faultEntry{Fault: f}
	if f.For > 0 {
		e.until = time.Now().Add(f.For)
	}
	t.mu.Lock()
	t.faults = append(t.faults, e)
	t.mu.Unlock()
	return func() {
		t.mu.Lock()
		defer t.mu.Unlock()
		for i, x := range t.faults {
			if x == e {
				t.faults = append(t.faults[:i], t.faults[i+1:]...)
				return
			}
		}
	}
}

// faultFor returns the fault hitting cmd on queue qid, if any.
func (t *Target) faultFor(qid uint16, cmd *nvme.Command) *Fault {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, e := range t.faults {
		switch {
		case e.QID == AnyQueue:
		case e.QID == AnyIOQueue && qid > 0:
		case e.QID != int(qid):
			continue
		}
		if e.Match != nil && !e.Match(cmd) {
			continue
		}
		if e.Times > 0 && e.hits >= e.Times {
			continue
		}
		if !e.until.IsZero() && time.Now().After(e.until) {
			continue
		}
		e.hits++
		f := e.Fault
		return &f
	}
	return nil
}
