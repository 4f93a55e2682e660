package nvmeof_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle/nvmeofconn"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/scripted"
)

// The hostile-controller fuzz target: a scripted controller whose every
// answer comes from the fuzzer's bytes (the ICResp, Connect responses,
// property values, Identify Controller/Namespace/NS list/NS ID
// descriptors/CNS 06h, log pages including the discovery log, Set
// Features results, asynchronous event completions, I/O completions)
// drives the host through what `discover` does and what attach does
// (nvmeofconn's Connect: connect, identify, namespace; then I/O, the
// namespace list, log pages, events). Whatever the controller says: no
// panic, no hang, no goroutine left, and a bounded amount of work.

// fuzzStream hands out the fuzzer's bytes; empty, it reads zeroes.
type fuzzStream struct {
	mu sync.Mutex
	b  []byte
}

func (s *fuzzStream) bytes(n int) []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]byte, n)
	k := copy(out, s.b)
	s.b = s.b[k:]
	return out
}

func (s *fuzzStream) byte() byte { return s.bytes(1)[0] }

// Reply operations, one byte each (then their operands) per command: the
// byte modulo opCount, except opHold, which is only the byte 0xff (a held
// command costs a timeout, and the fuzzer should not spend its time there).
const (
	opPolite      = iota // the polite answer
	opStatus             // polite, with the status that follows (2 bytes)
	opResult             // polite, with the result that follows (8 bytes)
	opPatch              // polite, with n (1 byte, up to 15) patches of offset (2 bytes) and value (1 byte)
	opData               // the data that follows (length: 2 bytes, up to 8 KiB) instead
	opPatchResult        // opPatch, then opResult
	opCount
	opHold = 0xff // no answer (the command times out)
)

// reply applies the next operation of s to the polite answer. An
// Asynchronous Event Request is held by the polite controller; any
// operation but opPolite and opHold completes it.
func (s *fuzzStream) reply(polite scripted.Reply) scripted.Reply {
	r := polite
	op := s.byte()
	if op != opHold {
		op %= opCount
	}
	if op != opPolite && op != opHold {
		r.Hold = false
	}
	switch op {
	case opStatus:
		r.Status = nvme.Status(binary.LittleEndian.Uint16(s.bytes(2)) & 0x7fff)
	case opResult:
		r.Result = binary.LittleEndian.Uint64(s.bytes(8))
	case opPatch, opPatchResult:
		n := int(s.byte() % 16)
		for range n {
			p := s.bytes(3)
			if len(r.Data) > 0 {
				r.Data[int(binary.LittleEndian.Uint16(p))%len(r.Data)] = p[2]
			}
		}
		if op == opPatchResult {
			r.Result = binary.LittleEndian.Uint64(s.bytes(8))
		}
	case opData:
		r.Data = s.bytes(int(binary.LittleEndian.Uint16(s.bytes(2)) % (8 << 10)))
	case opHold:
		r.Hold = true
	}
	return r
}

// hostileScript answers from two streams: events (Asynchronous Event
// Requests and the Changed Namespace List their handler reads, on the event
// goroutine) and main (everything else, in the harness's order), so that an
// input replays the same way.
func hostileScript(main, events *fuzzStream) *scripted.Script {
	return &scripted.Script{
		ICResp: func(polite scripted.ICResp) scripted.ICResp {
			if main.byte()&1 == 0 {
				return polite
			}
			b := main.bytes(8)
			return scripted.ICResp{PFV: binary.LittleEndian.Uint16(b), CPDA: b[2], Digest: b[3], MaxH2CData: binary.LittleEndian.Uint32(b[4:])}
		},
		Reply: func(c *scripted.Command, polite scripted.Reply) scripted.Reply {
			op := c.Cmd.Opcode()
			if c.QID == 0 && (op == nvme.NVME_ADMIN_ASYNC_EVENT ||
				op == nvme.NVME_ADMIN_GET_LOG_PAGE && uint8(c.Cmd.CDW(10)) == nvme.NVME_LOG_CHANGED_NS) {
				return events.reply(polite)
			}
			return main.reply(polite)
		},
	}
}

// hostileRun is one execution: discover (flags bit 0) or attach's flow
// against a controller scripted by the two streams.
func hostileRun(t *testing.T, flags byte, main, events []byte) {
	ms, es := &fuzzStream{b: main}, &fuzzStream{b: events}
	pipes := &pipeScript{script: hostileScript(ms, es)}
	cfg := nvmeof.ControllerConfig{
		Addr: "hostile", Host: testHost, IOQueues: 2, QueueSize: 8,
		// Short timeouts: a held command costs the fuzzer that long.
		// Keep Alive's timeout is KATO.
		IOTimeout: 100 * time.Millisecond, AdminTimeout: 100 * time.Millisecond, KATO: 100 * time.Millisecond, Logger: quiet,
		Dial:    pipes.dial,
		OnEvent: func(nvmeof.AsyncEvent) {},
	}
	// Bounds the CSTS polls of a controller that never becomes ready
	// (CAP.TO allows up to 127 s).
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if flags&1 != 0 {
		hostileDiscover(ctx, cfg)
	} else {
		hostileAttach(ctx, cfg, flags)
	}
	pipes.close()
}

// hostileDiscover is nvmeof.Discover (what `discover` runs) over the
// scripted controller.
func hostileDiscover(ctx context.Context, cfg nvmeof.ControllerConfig) {
	cfg.SubsysNQN, cfg.NoKeepAlive = nvme.NVME_DISC_SUBSYS_NAME, true
	c, err := nvmeof.Connect(ctx, cfg)
	if err != nil {
		return
	}
	defer c.Close()
	if _, err := c.DiscoveryLog(ctx); err == nil {
		c.ShutdownController(ctx)
	}
}

// hostileAttach is attach's connect (nvmeofconn: connect the admin queue,
// identify the namespace, connect the I/O queues), then what a running daemon asks of the association.
func hostileAttach(ctx context.Context, cfg nvmeof.ControllerConfig, flags byte) {
	cfg.SubsysNQN = scripted.PoliteNQN
	k := &nvmeofconn.Connector{Config: cfg, NSID: 1 + uint32(flags>>1&1)}
	lc, err := k.Connect(ctx, func(error) {})
	if err != nil {
		return
	}
	conn := lc.(*nvmeofconn.Conn)
	defer func() {
		conn.Shutdown()
		conn.WaitIdle()
		conn.FreeIOQueues()
		conn.FreeAdminQueue()
	}()
	// lifecycle starts keep-alive here, between the two phases.
	if err := conn.ConnectIOQueues(ctx); err != nil {
		return
	}
	c, ns := conn.Controller(), conn.NS()
	if ns.MaxTransfer < ns.BlockSize() || ns.MaxTransfer > c.MaxTransfer() || c.MaxTransfer() < 4096 || c.MaxTransfer() > 1<<20 ||
		c.QueueSize() < 2 || c.QueueSize() > 8 || len(c.IOQueues()) < 1 || len(c.IOQueues()) > 2 ||
		ns.MaxWriteZeroesBlocks > 65536 || ns.MaxDeallocateRanges < 1 || ns.MaxDeallocateRanges > 256 || ns.MaxDeallocateBlocks < 1 {
		panic(fmt.Sprintf("limits out of bounds: transfer %d of %d, queue size %d, %d queues, namespace %+v",
			ns.MaxTransfer, c.MaxTransfer(), c.QueueSize(), len(c.IOQueues()), ns))
	}
	q := conn.IOQueue(0)
	n := min(ns.MaxTransfer, 8192)
	q.Read(ctx, ns, 0, make([]byte, n))
	q.Write(ctx, ns, 0, make([]byte, n), false)
	q.WriteZeroes(ctx, ns, 0, min(8, ns.MaxWriteZeroesBlocks), false)
	q.Deallocate(ctx, ns, []nvme.DSMRange{{NLB: min(8, ns.MaxDeallocateBlocks)}})
	c.ActiveNamespaces(ctx)
	c.GetLogPage(ctx, nvme.NVME_LOG_ERROR, nvme.NVME_NSID_ALL, 0, 4096)
	conn.KeepAlive(ctx)
}

// hostileInput is the encoding of a fuzz input: flags, the event stream's
// length, the event stream, the main stream.
func hostileInput(flags byte, main, events []byte) []byte {
	b := append([]byte{flags, byte(len(events))}, events...)
	return append(b, main...)
}

func splitHostileInput(b []byte) (flags byte, main, events []byte) {
	if len(b) < 2 {
		return 0, nil, nil
	}
	flags, n, b := b[0], int(b[1]), b[2:]
	n = min(n, len(b))
	return flags, b[n:], b[:n]
}

// hostileSeeds are the polite controller (every operation opPolite) for
// both flows, and a few shapes the fuzzer would take long to find.
func hostileSeeds() [][]byte {
	polite := make([]byte, 64)
	// The admin queue's ICResp, Connect, CAP, VS, CC, CSTS polite, then
	// Identify Controller with MDTS 51.
	mdts := []byte{0, 0, 0, 0, 0, 0, opPatch, 1, 77, 0, 51}
	aer := []byte{opResult, nvme.NVME_AER_TYPE_NOTICE, nvme.NVME_AER_NOTICE_NS_CHANGED, nvme.NVME_LOG_CHANGED_NS, 0, 0, 0, 0, 0,
		opPatch, 2, 0, 0, 1, 4, 0, 9}
	return [][]byte{
		hostileInput(0, polite, nil),
		hostileInput(1, polite, nil),
		hostileInput(0, mdts, nil),
		hostileInput(1, mdts, nil),
		hostileInput(0, polite, aer),
		hostileInput(1, polite, []byte{opResult, nvme.NVME_AER_TYPE_NOTICE, nvme.NVME_AER_NOTICE_DISC_CHANGED, 0x70, 0, 0, 0, 0, 0}),
	}
}

func FuzzHostileController(f *testing.F) {
	for _, s := range hostileSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		hostileOnce(t, b)
	})
}

// hostileOnce runs one input under a hang deadline and checks that no
// goroutine is left.
func hostileOnce(t *testing.T, b []byte) {
	before := goleak.IgnoreCurrent()
	flags, main, events := splitHostileInput(b)
	done := make(chan struct{})
	go func() {
		defer close(done)
		hostileRun(t, flags, main, events)
	}()
	select {
	case <-done:
	case <-time.After(hangDeadline):
		panic(fmt.Sprintf("hostile controller input hangs the host: %x", b))
	}
	if err := goleak.Find(before); err != nil {
		t.Fatalf("goroutines left: %v", err)
	}
}

// TestHostileControllerMutations is a deterministic cousin of
// FuzzHostileController for every test run: mutated seeds.
func TestHostileControllerMutations(t *testing.T) {
	seeds := hostileSeeds()
	rng := rand.New(rand.NewPCG(11, 3))
	n := 300
	if testing.Short() {
		n = 60
	}
	for range n {
		s := seeds[rng.IntN(len(seeds))]
		b := append([]byte(nil), s...)
		for range 1 + rng.IntN(6) {
			k := 2 + rng.IntN(len(b)-2)
			switch rng.IntN(3) {
			case 0:
				b[k] = byte(rng.Uint32())
			case 1:
				b[k] = byte(rng.IntN(opCount))
			case 2:
				b = append(b[:k], append([]byte{byte(rng.IntN(opCount)), byte(rng.Uint32()), byte(rng.Uint32())}, b[k:]...)...)
			}
		}
		hostileOnce(t, b)
	}
}
