package nvmeof_test

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/spdk"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// Interop with SPDK v24.01's nvmf_tgt on this machine (e2e/spdk; make
// spdk-test). Without the SPDK build, and under -short, these skip.

const spdkNQN = "nqn.2016-06.io.spdk:ublk-nvmeof-interop"

// startSPDK runs nvmf_tgt with one 64 MiB malloc namespace of 512-byte
// blocks behind a TCP transport with the given parameters.
func startSPDK(t *testing.T, transport map[string]any) (*spdk.Target, spdk.Export) {
	t.Helper()
	b := spdk.Require(t)
	tg := spdk.StartTarget(t, b, spdk.TargetOptions{})
	e := tg.Export(t, spdk.ExportConfig{NQN: spdkNQN, Transport: transport, Discovery: true})
	return tg, e
}

// logCapture is a slog handler that keeps every record at Debug and above
// as "LEVEL msg attrs" lines.
type logCapture struct {
	mu    sync.Mutex
	lines []string
}

func (l *logCapture) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func (l *logCapture) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, strings.TrimSpace(string(p)))
	return len(p), nil
}

// matching returns the lines that contain every one of subs.
func (l *logCapture) matching(subs ...string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, line := range l.lines {
		all := true
		for _, s := range subs {
			all = all && strings.Contains(line, s)
		}
		if all {
			out = append(out, line)
		}
	}
	return out
}

// connectSPDK connects to the export; the controller is closed by the
// test's cleanup (before nvmf_tgt stops).
func connectSPDK(t *testing.T, e spdk.Export, cfg nvmeof.ControllerConfig) *nvmeof.Controller {
	t.Helper()
	cfg.Addr, cfg.SubsysNQN, cfg.Host = e.Addr, e.NQN, testHost
	ctx, cancel := context.WithTimeout(context.Background(), hangDeadline)
	defer cancel()
	c, err := nvmeof.Connect(ctx, cfg)
	if err != nil {
		t.Fatalf("connect to nvmf_tgt: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// ioEveryQueue writes a distinct pattern through every I/O queue at once,
// each queue with qd commands in flight in its own LBA region, then reads
// every region back through another queue and compares.
func ioEveryQueue(t *testing.T, c *nvmeof.Controller, ns *nvmeof.Namespace, qd, blocksPerIO, iosPerQueue int) {
	t.Helper()
	qs := c.IOQueues()
	bs := ns.BlockSize()
	region := uint64(blocksPerIO * iosPerQueue)
	if region*uint64(len(qs)) > ns.Blocks {
		t.Fatalf("%d queues of %d blocks do not fit in %d blocks", len(qs), region, ns.Blocks)
	}
	data := func(qi, i int) []byte {
		d := make([]byte, blocksPerIO*bs)
		for j := range d {
			d[j] = byte(qi*31 + i*7 + j*3 + qd)
		}
		return d
	}
	pass := func(write bool) error {
		var wg sync.WaitGroup
		errs := make(chan error, len(qs))
		for qi := range qs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				// Reads go through the next queue: the data crossed queues.
				q := qs[qi]
				if !write {
					q = qs[(qi+1)%len(qs)]
				}
				errs <- queuePass(q, ns, write, qd, iosPerQueue, func(i int) (uint64, []byte) {
					return uint64(qi)*region + uint64(i*blocksPerIO), data(qi, i)
				})
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				return err
			}
		}
		return nil
	}
	if err := pass(true); err != nil {
		t.Fatalf("write pass, qd %d, %d blocks: %v", qd, blocksPerIO, err)
	}
	if err := pass(false); err != nil {
		t.Fatalf("read pass, qd %d, %d blocks: %v", qd, blocksPerIO, err)
	}
}

// queuePass submits ios commands on q, at most qd in flight, and checks
// every read against the data it was written with.
func queuePass(q *nvmeof.IOQueue, ns *nvmeof.Namespace, write bool, qd, ios int, at func(i int) (uint64, []byte)) error {
	sem := make(chan struct{}, qd)
	var wg sync.WaitGroup
	var failed atomic.Value
	for i := range ios {
		lba, want := at(i)
		req := new(nvmeof.Request)
		var err error
		if write {
			err = ns.PrepareWrite(req, lba, want, false)
		} else {
			err = ns.PrepareRead(req, lba, make([]byte, len(want)))
		}
		if err != nil {
			return err
		}
		sem <- struct{}{}
		wg.Add(1)
		err = q.Submit(req, func(err error) {
			defer wg.Done()
			defer func() { <-sem }()
			if err != nil {
				failed.Store(fmt.Errorf("lba %d: %w", lba, err))
			} else if !write && !bytes.Equal(req.Data, want) {
				failed.Store(fmt.Errorf("lba %d: read back different data", lba))
			}
		})
		if err != nil {
			wg.Done()
			<-sem
			failed.Store(err)
			break
		}
	}
	wg.Wait()
	err, _ := failed.Load().(error)
	return err
}

// TestSPDKHostLibrary: discovery, then per digest setting an association
// of four I/O queues: identify, I/O on every queue at once at several
// depths and sizes (in-capsule and R2T writes), Write Zeroes, Deallocate,
// Flush, Keep Alive, and the shutdown notification, after which SPDK
// closes the I/O queues and the host must not count that as a failure.
func TestSPDKHostLibrary(t *testing.T) {
	_, e := startSPDK(t, nil)
	ctx := testCtx(t)

	entries, err := nvmeof.Discover(ctx, e.Addr, testHost)
	if err != nil {
		t.Fatalf("discover: %v", err)
	}
	found := false
	for _, d := range entries {
		t.Logf("discovery entry: %s %s:%s subtype %d", d.SubNQN, d.TrAddr, d.TrSvcID, d.SubType)
		found = found || d.SubNQN == e.NQN && d.TrType == nvme.NVMF_TRTYPE_TCP && d.TrSvcID == fmt.Sprint(e.Port)
	}
	if !found {
		t.Fatalf("the discovery log lacks %s on port %d", e.NQN, e.Port)
	}

	for _, dg := range []struct{ hd, dd bool }{{false, false}, {true, false}, {false, true}, {true, true}} {
		t.Run(fmt.Sprintf("hdgst=%v,ddgst=%v", dg.hd, dg.dd), func(t *testing.T) {
			var logs logCapture
			var failures atomic.Int32
			c := connectSPDK(t, e, nvmeof.ControllerConfig{IOQueues: 4, QueueSize: 128, HeaderDigest: dg.hd, DataDigest: dg.dd,
				NoKeepAlive: true, Logger: logs.logger(), OnFailure: func(error) { failures.Add(1) }})
			id := c.Identify()
			t.Logf("nvmf_tgt: cntlid %d mn %q mdts %d ioccsz %d oncs %#x vwc %d maxcmd %d mqes %d maxh2cdata %d",
				c.CNTLID(), id.MN, id.MDTS, id.IOCCSZ, id.ONCS, id.VWC, id.MAXCMD, nvme.CAPMQES(c.CAP()), c.IOQueues()[0].MaxH2CData())
			if id.SubNQN != e.NQN || len(c.IOQueues()) != 4 || c.QueueSize() != 128 {
				t.Fatalf("subnqn %q, %d I/O queues of %d, want %s, 4 of 128", id.SubNQN, len(c.IOQueues()), c.QueueSize(), e.NQN)
			}
			ns, err := c.Namespace(ctx, 1)
			if err != nil {
				t.Fatal(err)
			}
			if ns.BlockSize() != 512 || ns.Blocks != 64<<20/512 {
				t.Fatalf("namespace %+v, want 131072 blocks of 512 bytes", ns)
			}
			if err := c.KeepAlive(ctx); err != nil {
				t.Fatalf("keep alive: %v", err)
			}
			// 1 block: in-capsule (ICD 4096); 64 blocks (32 KiB): R2T;
			// MaxTransfer: the largest one command carries.
			for _, io := range []struct{ qd, blocks int }{{1, 1}, {32, 8}, {127, 64}, {4, ns.MaxTransfer / 512}} {
				ioEveryQueue(t, c, ns, io.qd, io.blocks, 16)
			}
			checkZeroesAndDeallocate(t, c, ns)
			if err := c.IOQueues()[3].Flush(ctx, ns); err != nil {
				t.Fatalf("flush: %v", err)
			}

			if err := c.ShutdownController(ctx); err != nil {
				t.Fatalf("shutdown notification: %v", err)
			}
			c.Close()
			if n := failures.Load(); n != 0 {
				t.Errorf("%d queue failures reported after an orderly shutdown: %q", n, logs.matching("queue failed"))
			}
			if lines := logs.matching("level=WARN"); len(lines) != 0 {
				t.Errorf("warnings after an orderly shutdown: %q", lines)
			}
		})
	}
}

// checkZeroesAndDeallocate writes ones, zeroes a range with Write Zeroes
// (half of it with DEAC) and deallocates two more, one per command (the malloc bdev reads deallocated blocks as
// zeroes), and checks exactly those blocks read as zeroes.
func checkZeroesAndDeallocate(t *testing.T, c *nvmeof.Controller, ns *nvmeof.Namespace) {
	t.Helper()
	ctx := testCtx(t)
	if !ns.SupportsWriteZeroes() || !ns.SupportsDeallocate() {
		t.Fatalf("nvmf_tgt's malloc namespace without Write Zeroes or Deallocate: ONCS %#x", ns.ONCS)
	}
	q := c.IOQueues()[1]
	const base = 4096
	ones := bytes.Repeat([]byte{0xff}, 64*512)
	if err := q.Write(ctx, ns, base, ones, true); err != nil {
		t.Fatal(err)
	}
	if err := q.WriteZeroes(ctx, ns, base+8, 4, false); err != nil {
		t.Fatalf("write zeroes: %v", err)
	}
	// With DEAC: the blocks may be deallocated, and read as zeroes.
	if err := q.WriteZeroes(ctx, ns, base+12, 4, true); err != nil {
		t.Fatalf("write zeroes with deallocate: %v", err)
	}
	// nvmf_tgt reports DMRL 1 (one range per Dataset Management): the
	// host sends one command per range and refuses two in one before
	// sending, as the Linux host's max_discard_segments 1.
	ranges := []nvme.DSMRange{{SLBA: base + 32, NLB: 4}, {SLBA: base + 40, NLB: 2}}
	if ns.MaxDeallocateRanges != 1 {
		t.Fatalf("MaxDeallocateRanges %d, want nvmf_tgt's DMRL 1", ns.MaxDeallocateRanges)
	}
	if err := q.Deallocate(ctx, ns, ranges); err == nil {
		t.Fatal("two ranges in one Dataset Management accepted with DMRL 1")
	}
	for _, r := range ranges {
		if err := q.Deallocate(ctx, ns, []nvme.DSMRange{r}); err != nil {
			t.Fatalf("deallocate %+v: %v", r, err)
		}
	}
	got := make([]byte, len(ones))
	if err := q.Read(ctx, ns, base, got); err != nil {
		t.Fatal(err)
	}
	for blk := range 64 {
		zero := (blk >= 8 && blk < 16) || (blk >= 32 && blk < 36) || (blk >= 40 && blk < 42)
		want := byte(0xff)
		if zero {
			want = 0
		}
		if !bytes.Equal(got[blk*512:(blk+1)*512], bytes.Repeat([]byte{want}, 512)) {
			t.Fatalf("block %d: want every byte %#x", blk, want)
		}
	}
}

// TestSPDKQueueLimits: SPDK's smallest I/O queue (max_queue_depth 2, one
// command in flight) and the host's largest (1024, the attach limit)
// against a target that allows exactly that; the controller grants fewer
// queues than asked for (max_io_qpairs_per_ctrlr).
func TestSPDKQueueLimits(t *testing.T) {
	spdk.Require(t) // the parent skips too: no skip counted as a pass
	for _, tc := range []struct {
		depth, qpairs int
		wantQueues    int
	}{
		{depth: 2, qpairs: 2, wantQueues: 2},
		{depth: 1024, qpairs: 1, wantQueues: 1},
	} {
		t.Run(fmt.Sprintf("max_queue_depth=%d", tc.depth), func(t *testing.T) {
			_, e := startSPDK(t, map[string]any{"max_queue_depth": tc.depth, "max_io_qpairs_per_ctrlr": tc.qpairs})
			c := connectSPDK(t, e, nvmeof.ControllerConfig{IOQueues: 4, QueueSize: 1024, NoKeepAlive: true})
			if got := nvme.CAPMQES(c.CAP()); int(got) != tc.depth-1 {
				t.Fatalf("CAP.MQES %d, want %d", got, tc.depth-1)
			}
			if c.QueueSize() != tc.depth || len(c.IOQueues()) != tc.wantQueues {
				t.Fatalf("%d I/O queues of %d entries, want %d of %d", len(c.IOQueues()), c.QueueSize(), tc.wantQueues, tc.depth)
			}
			ns, err := c.Namespace(testCtx(t), 1)
			if err != nil {
				t.Fatal(err)
			}
			// A queue of n entries holds n-1 commands; Submit past that
			// is the caller's to avoid, so the depth is what it allows.
			ioEveryQueue(t, c, ns, tc.depth-1, 8, 2*tc.depth)
		})
	}
}

// TestSPDKR2T: no in-capsule data at all (every write waits for SPDK's
// R2T), smaller maximum I/O (MDTS and MAXH2CDATA follow max_io_size) and
// small I/O units, with and without digests.
func TestSPDKR2T(t *testing.T) {
	_, e := startSPDK(t, map[string]any{"in_capsule_data_size": 0, "max_io_size": 65536, "io_unit_size": 8192})
	for _, dg := range []bool{false, true} {
		t.Run(fmt.Sprintf("digests=%v", dg), func(t *testing.T) {
			c := connectSPDK(t, e, nvmeof.ControllerConfig{IOQueues: 2, QueueSize: 64, HeaderDigest: dg, DataDigest: dg, NoKeepAlive: true})
			id := c.Identify()
			if id.IOCCSZ != 4 || c.MaxTransfer() != 65536 || c.IOQueues()[0].MaxH2CData() != 65536 {
				t.Fatalf("IOCCSZ %d (want 4: no in-capsule data), MaxTransfer %d, MAXH2CDATA %d (want 65536)",
					id.IOCCSZ, c.MaxTransfer(), c.IOQueues()[0].MaxH2CData())
			}
			ns, err := c.Namespace(testCtx(t), 1)
			if err != nil {
				t.Fatal(err)
			}
			for _, io := range []struct{ qd, blocks int }{{1, 1}, {16, 7}, {63, 128}} {
				ioEveryQueue(t, c, ns, io.qd, io.blocks, 32)
			}
		})
	}
}

// TestSPDKKeepAlive: with keep-alives sent the association outlives
// several KATOs; without them nvmf_tgt ends it (its keep-alive timer), and
// the host reports a failed queue.
func TestSPDKKeepAlive(t *testing.T) {
	_, e := startSPDK(t, nil)
	const kato = 2 * time.Second
	failed := make(chan error, 8)
	c := connectSPDK(t, e, nvmeof.ControllerConfig{KATO: kato, Logger: slog.New(slog.DiscardHandler),
		OnFailure: func(err error) { failed <- err }})
	if c.KATO() != kato {
		t.Fatalf("KATO %v", c.KATO())
	}
	ctx := testCtx(t)
	ns, err := c.Namespace(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	for range 6 { // three KATOs, a keep-alive every half
		if err := c.KeepAlive(ctx); err != nil {
			t.Fatalf("keep alive: %v", err)
		}
		select {
		case err := <-failed:
			t.Fatalf("association failed while keep-alives were sent: %v", err)
		case <-time.After(kato / 2):
		}
	}
	if err := c.IOQueues()[0].Read(ctx, ns, 0, make([]byte, 512)); err != nil {
		t.Fatalf("read after %v of keep-alives: %v", 3*kato, err)
	}
	select {
	case err := <-failed:
		t.Logf("without keep-alives nvmf_tgt ended the association: %v", err)
	case <-ctx.Done():
		t.Fatalf("nvmf_tgt kept the association %v without keep-alives (KATO %v)", hangDeadline, kato)
	}
}
