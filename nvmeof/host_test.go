package nvmeof_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target/targetproc"
)

func TestMain(m *testing.M) {
	if code, ok := targetproc.ServeIfChild(); ok {
		os.Exit(code)
	}
	goleak.VerifyTestMain(m)
}

const testNQN = "nqn.2026-11.io.ublk-nvmeof:test"

var testHost = nvmeof.HostIdentity{NQN: "nqn.2014-08.org.nvmexpress:uuid:5f2b8a52-1d6e-4c1b-9a55-3c0e8d7f6a01", ID: [16]byte{0x5f, 0x2b}}

// hangDeadline bounds every wait in these tests: reaching it means a hang,
// not slowness.
const hangDeadline = 60 * time.Second

type testTarget struct {
	*target.Target
	addr string
	sub  *target.Subsystem
	mem  *target.MemoryBackend
}

func startTarget(t *testing.T, cfg target.Config, blockShift uint8, size int64) *testTarget {
	t.Helper()
	tg := target.New(cfg)
	sub, err := tg.AddSubsystem(testNQN)
	if err != nil {
		t.Fatal(err)
	}
	mem := target.NewMemoryBackend(size)
	if err := sub.AddNamespace(target.NamespaceConfig{NSID: 1, Backend: mem, BlockShift: blockShift,
		NGUID: [16]byte{0xa1, 2, 3}, EUI64: [8]byte{0xe1}, UUID: [16]byte{0x55, 1}}); err != nil {
		t.Fatal(err)
	}
	addr, err := tg.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tg.Close() })
	return &testTarget{Target: tg, addr: addr.String(), sub: sub, mem: mem}
}

func connect(t *testing.T, tt *testTarget, cfg nvmeof.ControllerConfig) *nvmeof.Controller {
	t.Helper()
	cfg.Addr = tt.addr
	if cfg.SubsysNQN == "" {
		cfg.SubsysNQN = testNQN
	}
	cfg.Host = testHost
	ctx, cancel := context.WithTimeout(context.Background(), hangDeadline)
	defer cancel()
	c, err := nvmeof.Connect(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), hangDeadline)
	t.Cleanup(cancel)
	return ctx
}

func TestConnectIdentify(t *testing.T) {
	tt := startTarget(t, target.Config{}, 12, 16<<20)
	c := connect(t, tt, nvmeof.ControllerConfig{IOQueues: 3, QueueSize: 64})
	ctx := testCtx(t)

	if c.CNTLID() == 0 {
		t.Fatal("no controller ID")
	}
	if got := len(c.IOQueues()); got != 3 {
		t.Fatalf("%d I/O queues, want 3", got)
	}
	id := c.Identify()
	if id.SubNQN != testNQN || id.CNTLID != c.CNTLID() || id.IOCCSZ == 0 {
		t.Fatalf("identify controller %+v", id)
	}
	nsids, err := c.ActiveNamespaces(ctx)
	if err != nil || len(nsids) != 1 || nsids[0] != 1 {
		t.Fatalf("active namespaces %v, %v", nsids, err)
	}
	ns, err := c.Namespace(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	if ns.BlockSize() != 4096 || ns.Blocks != 4096 || ns.NGUID[0] != 0xa1 || ns.EUI64[0] != 0xe1 || ns.UUID[0] != 0x55 {
		t.Fatalf("namespace %+v", ns)
	}
	if !ns.VolatileWriteCache || !ns.SupportsDeallocate() || !ns.SupportsWriteZeroes() {
		t.Fatalf("namespace capabilities %+v", ns)
	}
	if _, err := c.Namespace(ctx, 2); err == nil {
		t.Fatal("inactive namespace 2 identified")
	}
	csts, err := c.PropertyGet(ctx, nvme.NVME_REG_CSTS, false)
	if err != nil || csts&nvme.NVME_CSTS_RDY == 0 {
		t.Fatalf("CSTS %#x, %v", csts, err)
	}
	if err := c.KeepAlive(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.ShutdownController(ctx); err != nil {
		t.Fatal(err)
	}
	csts, _ = c.PropertyGet(ctx, nvme.NVME_REG_CSTS, false)
	if csts&nvme.NVME_CSTS_SHST_MASK != nvme.NVME_CSTS_SHST_CMPLT {
		t.Fatalf("CSTS %#x after shutdown", csts)
	}
}

// ioPattern writes then reads back blocks at queue depth qd through the
// asynchronous Submit, and checks the data.
func ioPattern(t *testing.T, c *nvmeof.Controller, qd int, ios int) {
	t.Helper()
	ctx := testCtx(t)
	ns, err := c.Namespace(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	q := c.IOQueues()[0]
	bs := ns.BlockSize()
	rng := rand.New(rand.NewPCG(uint64(qd), 7))
	type io struct {
		lba  uint64
		data []byte
	}
	// Non-overlapping extents of 1..32 blocks, sizes chosen to cover
	// in-capsule writes, R2T with several H2CData, and multi-PDU reads.
	var extents []io
	var lba uint64
	for range ios {
		n := 1 + rng.IntN(32)
		if lba+uint64(n) > ns.Blocks {
			break
		}
		d := make([]byte, n*bs)
		for i := range d {
			d[i] = byte(rng.Uint32())
		}
		extents = append(extents, io{lba, d})
		lba += uint64(n)
	}

	run := func(write bool) {
		sem := make(chan struct{}, qd)
		var wg sync.WaitGroup
		var failed atomic.Value
		for i, e := range extents {
			sem <- struct{}{}
			wg.Add(1)
			req := new(nvmeof.Request)
			var err error
			if write {
				err = ns.PrepareWrite(req, e.lba, e.data, i%5 == 0)
			} else {
				err = ns.PrepareRead(req, e.lba, make([]byte, len(e.data)))
			}
			if err != nil {
				t.Fatal(err)
			}
			want := e.data
			err = q.Submit(req, func(err error) {
				defer wg.Done()
				defer func() { <-sem }()
				if err != nil {
					failed.Store(fmt.Errorf("lba %d: %w", e.lba, err))
					return
				}
				if !write && !bytes.Equal(req.Data, want) {
					failed.Store(fmt.Errorf("lba %d: read back different data", e.lba))
				}
			})
			if err != nil {
				t.Fatal(err)
			}
		}
		wg.Wait()
		if err, _ := failed.Load().(error); err != nil {
			t.Fatal(err)
		}
	}
	run(true)
	run(false)
	if err := q.Flush(ctx, ns); err != nil {
		t.Fatal(err)
	}
}

func TestIOQueueDepthsAndDigests(t *testing.T) {
	for _, dg := range []struct{ hd, dd bool }{{false, false}, {true, false}, {false, true}, {true, true}} {
		for _, c2hSuccess := range []bool{false, true} {
			name := fmt.Sprintf("hdgst=%v,ddgst=%v,c2hsuccess=%v", dg.hd, dg.dd, c2hSuccess)
			t.Run(name, func(t *testing.T) {
				// Small MAXH2CDATA and C2H chunks so one command takes
				// several PDUs each way; CPDA pads H2C data.
				tt := startTarget(t, target.Config{MaxH2CData: 4096, C2HChunk: 3072, CPDA: 3, C2HSuccess: c2hSuccess, InCapsuleDataSize: 4096}, 9, 8<<20)
				// No Keep Alive is sent here: a KATO would let the target
				// delete the controller when the I/O outlasts it (under
				// -race on a loaded machine it does).
				c := connect(t, tt, nvmeof.ControllerConfig{QueueSize: 128, HeaderDigest: dg.hd, DataDigest: dg.dd, NoKeepAlive: true})
				for _, qd := range []int{1, 8, 127} { // 127: SQSIZE of a queue of 128
					ioPattern(t, c, qd, 200)
				}
			})
		}
	}
}

func TestWriteZeroesDeallocate(t *testing.T) {
	tt := startTarget(t, target.Config{}, 9, 1<<20)
	c := connect(t, tt, nvmeof.ControllerConfig{})
	ctx := testCtx(t)
	ns, err := c.Namespace(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	q := c.IOQueues()[0]
	ones := bytes.Repeat([]byte{0xff}, 64*512)
	if err := q.Write(ctx, ns, 0, ones, true); err != nil {
		t.Fatal(err)
	}
	if err := q.WriteZeroes(ctx, ns, 8, 8, false); err != nil {
		t.Fatal(err)
	}
	if err := q.Deallocate(ctx, ns, []nvme.DSMRange{{SLBA: 32, NLB: 4}, {SLBA: 40, NLB: 2}}); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(ones))
	if err := q.Read(ctx, ns, 0, got); err != nil {
		t.Fatal(err)
	}
	for blk := range 64 {
		zero := (blk >= 8 && blk < 16) || (blk >= 32 && blk < 36) || (blk >= 40 && blk < 42)
		b := got[blk*512 : (blk+1)*512]
		if want := byte(0xff); zero {
			want = 0
			if !bytes.Equal(b, make([]byte, 512)) {
				t.Fatalf("block %d not zeroed", blk)
			}
		} else if b[0] != want || b[511] != want {
			t.Fatalf("block %d changed", blk)
		}
	}
	// Out of range and oversize requests fail before being sent.
	if err := q.Read(ctx, ns, ns.Blocks-1, make([]byte, 1024)); err == nil {
		t.Fatal("read past the end accepted")
	}
	if err := q.Read(ctx, ns, 0, make([]byte, ns.MaxTransfer+512)); err == nil {
		t.Fatal("read above MDTS accepted")
	}
	// An LBA range error from the controller is a named status.
	var req nvmeof.Request
	ns2 := *ns
	ns2.Blocks = 1 << 40
	if err := ns2.PrepareRead(&req, ns.Blocks, make([]byte, 512)); err != nil {
		t.Fatal(err)
	}
	err = q.Do(ctx, &req)
	var st nvme.Status
	if !errors.As(err, &st) || st.Code() != nvme.NVME_SC_LBA_RANGE || !st.DNR() {
		t.Fatalf("read beyond the namespace: %v", err)
	}
	if nvmeof.IsPathError(err) {
		t.Fatal("a status is not a path error")
	}
}

func TestConnectRejected(t *testing.T) {
	tt := startTarget(t, target.Config{AllowedHosts: []string{"nqn.2026-11.io.example:other"}}, 9, 1<<20)
	ctx := testCtx(t)
	_, err := nvmeof.Connect(ctx, nvmeof.ControllerConfig{Addr: tt.addr, SubsysNQN: testNQN, Host: testHost})
	var st nvme.Status
	if !errors.As(err, &st) || st.Code() != nvme.NVME_SC_CONNECT_INVALID_HOST || !st.DoNotRetry() {
		t.Fatalf("connect from a host not allowed: %v", err)
	}
	_, err = nvmeof.Connect(ctx, nvmeof.ControllerConfig{Addr: tt.addr, SubsysNQN: "nqn.2026-11.io.example:missing", Host: testHost})
	if !errors.As(err, &st) || st.Code() != nvme.NVME_SC_CONNECT_INVALID_PARAM {
		t.Fatalf("connect to a missing subsystem: %v", err)
	}
	_, err = nvmeof.Connect(ctx, nvmeof.ControllerConfig{Addr: tt.addr, SubsysNQN: "bogus", Host: testHost})
	if !errors.Is(err, nvmeof.ErrInvalidNQN) {
		t.Fatalf("invalid NQN: %v", err)
	}
}

// TestDoWaitsForSlot: more synchronous callers than command slots all
// succeed; Submit alone reports ErrQueueFull.
func TestDoWaitsForSlot(t *testing.T) {
	tt := startTarget(t, target.Config{}, 9, 1<<20)
	c := connect(t, tt, nvmeof.ControllerConfig{QueueSize: 4})
	ctx := testCtx(t)
	ns, err := c.Namespace(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	q := c.IOQueues()[0]
	if q.Size() != 4 {
		t.Fatalf("queue size %d", q.Size())
	}
	remove := tt.InjectFault(target.Fault{QID: 1, Delay: 20 * time.Millisecond})
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for i := range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- q.Write(ctx, ns, uint64(i), make([]byte, 512), false)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	remove()

	// Fill every slot (SQSIZE of them) with held commands: the next
	// Submit is refused.
	tt.InjectFault(target.Fault{QID: 1, Delay: time.Hour})
	for range q.Depth() {
		var req nvmeof.Request
		ns.PrepareFlush(&req)
		r := req
		if err := q.Submit(&r, func(error) {}); err != nil {
			t.Fatal(err)
		}
	}
	var req nvmeof.Request
	ns.PrepareFlush(&req)
	if err := q.Submit(&req, func(error) {}); !errors.Is(err, nvmeof.ErrQueueFull) {
		t.Fatalf("Submit on a full queue: %v", err)
	}
}
