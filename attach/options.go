// Package attach exposes one namespace of a remote NVMe/TCP controller as a
// ublk block device: it validates what the user asked for, connects, creates
// the device, serves it until told to stop, and hands every ordering
// question (keep-alive, recovery, teardown) to package lifecycle.
package attach

import (
	"errors"
	"fmt"
	"net"
	"runtime"
	"strconv"
	"time"
)

// Options are the attach settings. Their names and defaults follow nvme-cli's
// connect (and so the Linux host's fabrics options), plus the ublk side.
type Options struct {
	TrAddr  string // target address (IP or host name)
	TrSvcID string // target port, default "4420"
	NQN     string // subsystem NQN
	HostNQN string // default: /etc/nvme/hostnqn, else a UUID-based NQN
	HostID  string // default: /etc/nvme/hostid, else a UUID

	NrIOQueues     int           // default: number of CPUs
	QueueSize      int           // default 128
	KeepAliveTmo   time.Duration // KATO, default 5 s
	ReconnectDelay time.Duration // default 10 s
	CtrlLossTmo    time.Duration // default 600 s; negative: retry forever
	FastIOFailTmo  time.Duration // default off (negative)
	HdrDigest      bool
	DataDigest     bool
	// ZeroCopy chooses whether each request's data moves between its
	// own pages and the socket (ublk UBLK_F_AUTO_BUF_REG, Linux 6.16)
	// rather than through the daemon's buffers: UseAuto (the
	// default, "" too) where the kernel has it and there are no data
	// digests (the daemon never sees the bytes it would digest),
	// UseOn always (refused on an older kernel, and with
	// DataDigest), UseOff never.
	ZeroCopy FeatureUse
	// BatchIO chooses whether ublk hands requests over and takes their
	// completions in batches (UBLK_F_BATCH_IO, Linux 7.0: one multishot
	// fetch and one commit per loop iteration instead of a command per
	// request): UseAuto (the default, "" too) where the kernel has it,
	// UseOn always (refused on an older kernel), UseOff never.
	BatchIO FeatureUse

	NSID     uint32 // namespace, default 1
	DevID    int    // ublk device id; negative: the kernel picks
	Recovery bool   // ublk user recovery (a restarted daemon takes the device over)
	// RecoveryFailIO: while no daemon serves the device, its I/O fails
	// with EIO instead of waiting for a new daemon
	// (UBLK_F_USER_RECOVERY_FAIL_IO, Linux 6.13). Needs Recovery.
	RecoveryFailIO bool
	// Recover takes over the device a dead daemon left for the same
	// target and namespace, if there is one, instead of creating one.
	Recover bool
	// MustRecover makes the absence of such a device an error.
	MustRecover bool
	// LinkWatch watches the link and route towards TrAddr (netlink): a
	// link going down starts recovery at once instead of after KATO.
	LinkWatch bool
	// DH-HMAC-CHAP in-band authentication (auth.go).
	AuthOptions
}

// Defaults as the Linux host (drivers/nvme/host/fabrics.h: NVMF_DEF_*).
const (
	DefaultTrSvcID        = "4420"
	DefaultQueueSize      = 128
	DefaultKeepAliveTmo   = 5 * time.Second
	DefaultReconnectDelay = 10 * time.Second
	DefaultCtrlLossTmo    = 600 * time.Second
	DefaultNSID           = 1

	// Queue size bounds of the Linux host (NVMF_MIN_QUEUE_SIZE,
	// NVMF_MAX_QUEUE_SIZE).
	MinQueueSize = 16
	MaxQueueSize = 1024

	// MaxKeepAliveTmo is the longest KATO the Connect command can carry:
	// its KATO field (NVMe over Fabrics 1.1, Connect command, CDW12) is
	// milliseconds in 32 bits. The Linux host sends kato * 1000 in a u32
	// as well, so a longer value wraps there; here it is refused.
	MaxKeepAliveTmo = (1<<32 - 1) / 1000 * time.Second // 4294967 s, whole seconds
	// MaxTimeout bounds reconnect_delay, ctrl_loss_tmo and
	// fast_io_fail_tmo: a year. A longer value is a typo (forever is -1),
	// and far longer ones overflow time arithmetic.
	MaxTimeout = 365 * 24 * time.Hour

	// MinNSID and MaxNSID bound a namespace ID: 0 is not one, and
	// 0xFFFFFFFF is the broadcast value (NVMe Base 2.0, 3.2.1.2).
	MinNSID = 1
	MaxNSID = 0xFFFFFFFE
	// MaxDevID is the largest ublk device number: the driver allocates
	// ids below UBLK_MAX_UBLKS, 1 << MINORBITS (drivers/block/ublk_drv.c).
	MaxDevID = 1<<20 - 1
)

// DefaultOptions returns Options with every default filled in.
func DefaultOptions() Options {
	return Options{
		TrSvcID:        DefaultTrSvcID,
		NrIOQueues:     runtime.NumCPU(),
		QueueSize:      DefaultQueueSize,
		KeepAliveTmo:   DefaultKeepAliveTmo,
		ReconnectDelay: DefaultReconnectDelay,
		CtrlLossTmo:    DefaultCtrlLossTmo,
		FastIOFailTmo:  -1,
		NSID:           DefaultNSID,
		DevID:          -1,
		Recovery:       true,
		ZeroCopy:       UseAuto,
		BatchIO:        UseAuto,
	}
}

// FeatureUse is whether a kernel feature is used (Options.ZeroCopy,
// BatchIO).
type FeatureUse string

// The choices of --zero-copy and --batch-io.
const (
	UseAuto FeatureUse = "auto"
	UseOn   FeatureUse = "on"
	UseOff  FeatureUse = "off"
)

// ErrInvalidOptions is wrapped by every validation error.
var ErrInvalidOptions = errors.New("invalid options")

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrInvalidOptions}, args...)...)
}

// Validate checks the options on their own, before anything is touched;
// NQN forms are checked by the NVMe layer when it uses them.
func (o *Options) Validate() error {
	if err := o.ValidateTarget(); err != nil {
		return err
	}
	if o.NQN == "" {
		return invalid("--nqn is required")
	}
	if o.NrIOQueues < 1 {
		return invalid("--nr-io-queues %d: at least 1", o.NrIOQueues)
	}
	if n := runtime.NumCPU(); o.NrIOQueues > n {
		// ublk serves each hardware queue from its own thread; more queues
		// than CPUs only adds contention (and blk-mq maps them onto CPUs).
		return invalid("--nr-io-queues %d: more than the %d CPUs", o.NrIOQueues, n)
	}
	if o.QueueSize < MinQueueSize || o.QueueSize > MaxQueueSize {
		return invalid("--queue-size %d: must be %d-%d", o.QueueSize, MinQueueSize, MaxQueueSize)
	}
	if o.KeepAliveTmo < 0 || o.KeepAliveTmo > MaxKeepAliveTmo {
		return invalid("--keep-alive-tmo %v: must be 0 (off) to %v (Connect carries milliseconds in 32 bits)", o.KeepAliveTmo, MaxKeepAliveTmo)
	}
	if o.ReconnectDelay <= 0 || o.ReconnectDelay > MaxTimeout {
		return invalid("--reconnect-delay %v: must be positive and at most %v", o.ReconnectDelay, MaxTimeout)
	}
	if o.RecoveryFailIO && !o.Recovery {
		return invalid("--recovery-fail-io needs --recovery")
	}
	switch o.ZeroCopy {
	case "", UseAuto, UseOff:
	case UseOn:
		if o.DataDigest {
			return invalid("--zero-copy on with --data-digest: the daemon never sees the data it would digest")
		}
	default:
		return invalid("--zero-copy %q: auto, on or off", o.ZeroCopy)
	}
	switch o.BatchIO {
	case "", UseAuto, UseOn, UseOff:
	default:
		return invalid("--batch-io %q: auto, on or off", o.BatchIO)
	}
	if o.CtrlLossTmo > MaxTimeout {
		return invalid("--ctrl-loss-tmo %v: at most %v (negative: forever)", o.CtrlLossTmo, MaxTimeout)
	}
	if o.FastIOFailTmo > MaxTimeout {
		return invalid("--fast-io-fail-tmo %v: at most %v (negative: off)", o.FastIOFailTmo, MaxTimeout)
	}
	if o.CtrlLossTmo >= 0 && o.CtrlLossTmo < o.ReconnectDelay {
		// As the Linux host: a loss timeout shorter than one reconnect delay
		// would never reconnect at all.
		return invalid("--ctrl-loss-tmo %v is shorter than --reconnect-delay %v", o.CtrlLossTmo, o.ReconnectDelay)
	}
	if o.NSID < MinNSID || o.NSID > MaxNSID {
		return invalid("--nsid %d: not a namespace ID (%d-%d)", o.NSID, MinNSID, MaxNSID)
	}
	if o.DevID < -1 || o.DevID > MaxDevID {
		return invalid("--dev-id %d: must be -1 (the kernel picks) or 0-%d", o.DevID, MaxDevID)
	}
	return o.validateAuth()
}

// ValidateTarget checks the target's address and port only.
func (o *Options) ValidateTarget() error {
	if o.TrAddr == "" {
		return invalid("--traddr is required")
	}
	if ip := net.ParseIP(o.TrAddr); ip == nil && !validHostname(o.TrAddr) {
		return invalid("--traddr %q is neither an IP address nor a host name", o.TrAddr)
	}
	port, err := strconv.Atoi(o.TrSvcID)
	if err != nil || port < 1 || port > 65535 {
		return invalid("--trsvcid %q is not a TCP port (1-65535)", o.TrSvcID)
	}
	return nil
}

// validHostname accepts RFC 1123 host names.
func validHostname(s string) bool {
	if len(s) == 0 || len(s) > 253 {
		return false
	}
	label := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '.':
			if label == 0 || s[i-1] == '-' {
				return false
			}
			label = 0
			continue
		case c == '-':
			if label == 0 {
				return false
			}
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		default:
			return false
		}
		label++
		if label > 63 {
			return false
		}
	}
	return s[len(s)-1] != '-'
}

// Addr is the target's host:port.
func (o *Options) Addr() string { return net.JoinHostPort(o.TrAddr, o.TrSvcID) }
