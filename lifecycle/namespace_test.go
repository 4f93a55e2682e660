package lifecycle

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Every fake association reports namespace changes from its target.
func (c *fakeConn) NamespaceChanged() <-chan Namespace { return c.target.nsEvents }

// resizableBlock is a fakeBlock that can be resized (ublk UPDATE_SIZE).
type resizableBlock struct {
	*fakeBlock
	mu      sync.Mutex
	size    uint64
	err     error // returned by Resize, which then keeps the size
	resizes []uint64
}

func (b *resizableBlock) Size() uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.size
}

func (b *resizableBlock) Resize(ctx context.Context, size uint64) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.resizes = append(b.resizes, size)
	if b.err != nil {
		return b.err
	}
	b.size = size
	return nil
}

// logRecords is a slog handler that keeps every record.
type logRecords struct {
	mu   sync.Mutex
	recs []slog.Record
}

func (l *logRecords) Enabled(context.Context, slog.Level) bool { return true }
func (l *logRecords) Handle(_ context.Context, r slog.Record) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.recs = append(l.recs, r.Clone())
	return nil
}
func (l *logRecords) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l *logRecords) WithGroup(string) slog.Handler      { return l }

// warnings returns the messages of the WARN records containing s.
func (l *logRecords) warnings(s string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, r := range l.recs {
		if r.Level == slog.LevelWarn && strings.Contains(r.Message, s) {
			out = append(out, r.Message)
		}
	}
	return out
}

func TestNamespaceIdentity(t *testing.T) {
	base := Namespace{NSID: 1, NGUID: [16]byte{1}, EUI64: [8]byte{2}, UUID: [16]byte{3}, Blocks: 100, BlockSize: 512}
	if err := base.SameIdentity(base); err != nil {
		t.Fatal(err)
	}
	resized := base
	resized.Blocks = 101
	if err := base.SameIdentity(resized); err != nil {
		t.Errorf("a new size alone counted as another namespace: %v", err)
	}
	for i, mut := range []func(*Namespace){
		func(n *Namespace) { n.NSID = 2 },
		func(n *Namespace) { n.NGUID[15] = 1 },
		func(n *Namespace) { n.EUI64[7] = 1 },
		func(n *Namespace) { n.UUID[15] = 1 },
		func(n *Namespace) { n.BlockSize = 4096 },
	} {
		o := base
		mut(&o)
		if base.SameIdentity(o) == nil {
			t.Errorf("identity change %d not detected", i)
		}
	}
	if _, ok := (Namespace{Blocks: 1 << 60, BlockSize: 1 << 16}).Bytes(); ok {
		t.Error("Bytes() of 2^76 bytes reported as fitting")
	}
	if n, ok := (Namespace{Blocks: 3, BlockSize: 4096}).Bytes(); !ok || n != 3*4096 {
		t.Errorf("Bytes() = %d, %v", n, ok)
	}
}

// newResizeHarness is a harness whose block device can be resized, at the
// namespace's size, with the controller's log kept.
func newResizeHarness(t *testing.T) (*harness, *resizableBlock, *logRecords) {
	t.Helper()
	logs := &logRecords{}
	h := newHarness(t, func(o *Options, _ *fakeTarget) { o.Logger = slog.New(logs) })
	b := &resizableBlock{fakeBlock: h.blk, size: (1 << 20) * 4096}
	h.c.SetBlock(b)
	return h, b, logs
}

// waitDead waits for the controller to have deleted itself.
func (h *harness) waitDead() {
	h.t.Helper()
	select {
	case <-h.c.Done():
	case <-time.After(20 * time.Second):
		h.t.Fatalf("the controller was not deleted; state %v", h.c.State())
	}
}

func (h *harness) setTargetBlocks(n uint64) Namespace {
	h.tgt.mu.Lock()
	defer h.tgt.mu.Unlock()
	h.tgt.ns.Blocks = n
	return h.tgt.ns
}

// A reconnect that finds the same namespace with a new size keeps the
// device and resizes it; the held I/O resumes.
func TestReconnectResizedNamespace(t *testing.T) {
	h, b, _ := newResizeHarness(t)
	h.setTargetBlocks(2 << 20)
	res := h.heldWrite()
	h.clk.WaitTimers(1)
	h.clk.Advance(10 * time.Second)
	h.waitState(StateLive)
	if err := <-res; err != nil {
		t.Fatalf("held write after reconnecting to the resized namespace: %v", err)
	}
	if got := h.c.Namespace().Blocks; got != 2<<20 {
		t.Errorf("Namespace().Blocks = %d, want %d", got, 2<<20)
	}
	if b.Size() != (2<<20)*4096 {
		t.Errorf("block device size %d, want %d", b.Size(), (2<<20)*4096)
	}
	h.finish()
}

// A namespace-changed event of the same namespace with a new size resizes
// the device while LIVE, without a reconnect; a failed resize keeps the
// device and says so in one WARN line.
func TestNamespaceEventResizes(t *testing.T) {
	h, b, logs := newResizeHarness(t)
	h.tgt.nsEvents <- h.setTargetBlocks(3 << 20)
	waitFor(t, "the resize", func() bool { return b.Size() == (3<<20)*4096 })
	if got := h.c.Namespace().Blocks; got != 3<<20 {
		t.Errorf("Namespace().Blocks = %d, want %d", got, 3<<20)
	}

	b.mu.Lock()
	b.err = errors.New("ublk: UBLK_F_UPDATE_SIZE not supported by this kernel (needs Linux 6.16 or newer)")
	b.mu.Unlock()
	h.tgt.nsEvents <- h.setTargetBlocks(1 << 19) // a shrink
	waitFor(t, "the WARN line", func() bool { return len(logs.warnings("keeps its size")) > 0 })
	if w := logs.warnings("keeps its size"); len(w) != 1 {
		t.Errorf("WARN lines about the size: %q, want one", w)
	}
	if b.Size() != (3<<20)*4096 {
		t.Errorf("block device size %d after a failed resize, want %d", b.Size(), (3<<20)*4096)
	}
	if err := <-h.doWrite(2, 2); err != nil {
		t.Fatalf("write after the resize events: %v", err)
	}
	if n := h.tgt.connectCount(); n != 1 || h.c.State() != StateLive {
		t.Errorf("after resize events: %d connects, state %v; want 1 and LIVE", n, h.c.State())
	}
	h.finish()
}

// namespaceReplacedEvent gives the target's namespace another UUID and
// sends the namespace-changed event that reports it.
func (h *harness) namespaceReplacedEvent() {
	h.tgt.mu.Lock()
	h.tgt.ns.UUID[0] ^= 0xff
	ns := h.tgt.ns
	h.tgt.mu.Unlock()
	h.tgt.nsEvents <- ns
}

// A namespace-changed event that finds another namespace deletes the
// controller and its device.
func TestNamespaceEventIdentityChanged(t *testing.T) {
	h, _, _ := newResizeHarness(t)
	h.namespaceReplacedEvent()
	h.waitDead()
	if err := h.c.Err(); !errors.Is(err, ErrNamespaceChanged) {
		t.Fatalf("Err() = %v, want ErrNamespaceChanged", err)
	}
	if !h.blk.removed {
		t.Error("the block device was not removed")
	}
	if err := <-h.doWrite(1, 1); !errors.Is(err, syscall.EIO) {
		t.Errorf("write after the delete: %v, want EIO", err)
	}
	h.finish()
}

// A namespace that is no longer active holds I/O while reconnects look for
// it; when it is back with the same identity, the held I/O resumes: nothing
// is lost.
func TestNamespaceGoneThenBack(t *testing.T) {
	h, _, _ := newResizeHarness(t)
	gone := h.tgt.ns
	gone.Blocks = 0
	h.tgt.mu.Lock()
	h.tgt.connectErrs = []error{errors.New("fake: namespace 1: not active")}
	h.tgt.mu.Unlock()
	h.tgt.nsEvents <- gone
	h.waitState(StateConnecting)
	res := h.doWrite(1, 1)
	waitFor(t, "the write to be held", func() bool { return h.c.Held() == 1 })
	h.clk.WaitTimers(1)
	h.clk.Advance(10 * time.Second) // the namespace is still away
	h.clk.WaitTimers(1)
	h.clk.Advance(10 * time.Second) // back
	h.waitState(StateLive)
	if err := <-res; err != nil {
		t.Fatalf("held write: %v", err)
	}
	if h.tgt.data[1] != 1 {
		t.Error("the held write did not reach the namespace")
	}
	if h.blk.stopped {
		t.Error("the block device was stopped")
	}
	h.finish()
}

// A namespace that stays away is removed: after ctrl_loss_tmo the
// controller and its device are deleted and held I/O fails with EIO.
func TestNamespaceGoneForGood(t *testing.T) {
	h := newHarness(t, func(o *Options, _ *fakeTarget) { o.CtrlLossTmo = 20 * time.Second })
	h.tgt.mu.Lock()
	for range 5 {
		h.tgt.connectErrs = append(h.tgt.connectErrs, errors.New("fake: namespace 1: not active"))
	}
	h.tgt.mu.Unlock()
	gone := h.tgt.ns
	gone.Blocks = 0
	h.tgt.nsEvents <- gone
	h.waitState(StateConnecting)
	res := h.doWrite(1, 1)
	waitFor(t, "the write to be held", func() bool { return h.c.Held() == 1 })
	for range 2 {
		h.clk.WaitTimers(1)
		h.clk.Advance(10 * time.Second)
	}
	h.waitDead()
	if err := h.c.Err(); err == nil || !strings.Contains(err.Error(), "ctrl_loss_tmo") {
		t.Errorf("Err() = %v, want ctrl_loss_tmo expired", err)
	}
	if err := <-res; !errors.Is(err, syscall.EIO) {
		t.Errorf("held write: %v, want EIO", err)
	}
	if !h.blk.removed {
		t.Error("the block device was not removed")
	}
	h.finish()
}

// A device taken over at another size than the namespace's now (a daemon
// recovering after the namespace grew) is resized when registered.
func TestSetBlockFitsSize(t *testing.T) {
	h := newHarness(t, nil)
	b := &resizableBlock{fakeBlock: h.blk, size: 4096}
	h.c.SetBlock(b)
	if want := uint64(1<<20) * 4096; b.Size() != want {
		t.Errorf("block device size %d, want %d", b.Size(), want)
	}
	h.finish()
}
