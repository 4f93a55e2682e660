package nvmeofconn_test

import (
	"context"
	"errors"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
)

// sizedBlock is a block device that can be resized (as ublk's UPDATE_SIZE).
type sizedBlock struct {
	mu   sync.Mutex
	size uint64
}

func (b *sizedBlock) Stop(context.Context) error   { return nil }
func (b *sizedBlock) Remove(context.Context) error { return nil }
func (b *sizedBlock) Size() uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.size
}
func (b *sizedBlock) Resize(_ context.Context, size uint64) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.size = size
	return nil
}

func waitCond(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 60 s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// The target resizes the namespace (nvmet's revalidate_size): the
// namespace-changed event resizes the block device without a reconnect,
// and I/O is bounded by the namespace's current size: past a shrunk end it
// fails before reaching the target, in a grown area it succeeds.
func TestNamespaceResizedByEvent(t *testing.T) {
	r := newRig(t, target.Config{}, time.Second)
	c := r.start(nil)
	defer c.Delete()
	sc := countStates(c)
	const full = (1 << 20) >> blockShift
	b := &sizedBlock{size: 1 << 20}
	c.SetBlock(b)

	if err := r.sub.ResizeNamespace(1, full/2); err != nil {
		t.Fatal(err)
	}
	waitCond(t, "the block device to shrink", func() bool { return b.Size() == 1<<19 })
	if got := c.Namespace().Blocks; got != full/2 {
		t.Errorf("Namespace().Blocks = %d, want %d", got, full/2)
	}
	err := write(c, 0, full-1, 77)
	if err == nil || nvmeof.IsPathError(err) {
		t.Errorf("write past the shrunk end: %v, want a failure that is not a path error", err)
	}
	if r.stored(full-1) == 77 {
		t.Error("a write past the shrunk end reached the target")
	}

	if err := r.sub.ResizeNamespace(1, full); err != nil {
		t.Fatal(err)
	}
	waitCond(t, "the block device to grow", func() bool { return b.Size() == 1<<20 })
	if err := write(c, 1, full-1, 78); err != nil {
		t.Fatalf("write in the grown area: %v", err)
	}
	if r.stored(full-1) != 78 {
		t.Errorf("block %d = %d, want 78", full-1, r.stored(full-1))
	}
	if n := sc.get(lifecycle.StateResetting); n != 0 || r.conn.attempts.Load() != 1 {
		t.Errorf("resizes made %d recoveries and %d connects; want none and 1", n, r.conn.attempts.Load())
	}
}

// The namespace removed from the target and added back with the same
// identity: I/O is held meanwhile and completes once it is back.
func TestNamespaceRemovedAndBack(t *testing.T) {
	r := newRig(t, target.Config{}, time.Second)
	c := r.start(nil)
	defer c.Delete()
	sc := countStates(c)
	r.sub.RemoveNamespace(1)
	waitEntered(t, c, lifecycle.StateResetting, 1, sc)
	res := make(chan error, 1)
	go func() { res <- write(c, 0, 9, 99) }()
	waitCond(t, "the write to be held", func() bool { return c.Held() == 1 })
	time.Sleep(50 * time.Millisecond) // a few reconnects find no namespace
	if err := r.sub.AddNamespace(target.NamespaceConfig{NSID: 1, Backend: r.mem, BlockShift: blockShift,
		NGUID: [16]byte{0xa1, 2, 3}, EUI64: [8]byte{0xe1}, UUID: [16]byte{0x55, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := <-res; err != nil {
		t.Fatalf("held write: %v", err)
	}
	if r.stored(9) != 99 {
		t.Errorf("block 9 = %d, want 99", r.stored(9))
	}
	if c.State() != lifecycle.StateLive {
		t.Errorf("state %v, want LIVE", c.State())
	}
}

// Another namespace under the same NSID, with the connections up: the
// namespace-changed events alone get the controller deleted.
func TestNamespaceReplaced(t *testing.T) {
	r := newRig(t, target.Config{}, time.Second)
	c := r.start(nil)
	defer c.Delete()
	r.sub.RemoveNamespace(1)
	if err := r.sub.AddNamespace(target.NamespaceConfig{NSID: 1, Backend: target.NewMemoryBackend(1 << 20), BlockShift: blockShift,
		NGUID: [16]byte{0xb2}, UUID: [16]byte{0x66}}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-c.Done():
	case <-time.After(60 * time.Second):
		t.Fatalf("not deleted; state %v", c.State())
	}
	if err := c.Err(); !errors.Is(err, lifecycle.ErrNamespaceChanged) {
		t.Errorf("Err() = %v, want ErrNamespaceChanged", err)
	}
	if err := write(c, 0, 3, 33); !errors.Is(err, syscall.EIO) {
		t.Errorf("write after the delete: %v, want EIO", err)
	}
}
