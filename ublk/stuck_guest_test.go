package ublk

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
)

// holdingBackend serves reads and holds every write until release: a
// backend whose target stopped answering.
type holdingBackend struct {
	mem  *MemoryBackend
	mu   sync.Mutex
	held []*Request
	got  chan struct{} // receives once per held write
}

func (h *holdingBackend) Serve(r *Request) {
	if r.Op != OpWrite {
		h.mem.Serve(r)
		return
	}
	h.mu.Lock()
	h.held = append(h.held, r)
	h.mu.Unlock()
	select {
	case h.got <- struct{}{}:
	default:
	}
}

func (h *holdingBackend) release(err error) int {
	h.mu.Lock()
	held := h.held
	h.held = nil
	h.mu.Unlock()
	for _, r := range held {
		r.Complete(err)
	}
	return len(held)
}

// TestGuestCloseStuckBackend: a backend that never completes a write must
// not make Close hang: it returns an error naming the stuck kernel call
// once its context ends, the queues are forced down, and the device can
// still be removed once the driver notices the daemon is gone.
func TestGuestCloseStuckBackend(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	mem, err := NewMemoryBackend(4 * mib)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	h := &holdingBackend{mem: mem, got: make(chan struct{}, 1)}
	d, err := c.Create(t.Context(), Options{ID: AutoID, Queues: 1, Depth: 16, Params: Params{Size: 4 * mib}}, h)
	if err != nil {
		t.Fatal(err)
	}
	w := startWriter(t, d.BlockDevice(), 4)
	go func() { <-w.done; w.f.Close() }()
	select {
	case <-h.got:
	case <-time.After(time.Minute):
		t.Fatal("no write reached the backend")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	err = d.Close(ctx)
	t.Logf("Close with a stuck backend: %v", err)
	if !errors.Is(err, ErrTimeout) {
		t.Errorf("Close = %v, want an error wrapping ErrTimeout", err)
	}
	select {
	case <-d.Done():
	default:
		t.Error("queues still running after Close returned")
	}
	select {
	case <-w.done:
		t.Logf("writer: %v", w.err)
	case <-time.After(2 * time.Minute):
		t.Fatal("writer still blocked 2 minutes after Close")
	}
	// Completing after the queue is gone is harmless (dropped), and frees
	// the tag buffers.
	if n := h.release(nil); n == 0 {
		t.Error("backend held no request")
	}
	// Close's DEL_DEV may already have removed it, once the driver failed
	// the held request; otherwise removing it must work now.
	rctx, rcancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer rcancel()
	if err := c.Remove(rctx, d.ID()); err != nil && !errors.Is(err, unix.ENODEV) {
		t.Fatalf("device %d cannot be removed: %v", d.ID(), err)
	}
	assertGone(t, c, d.ID())
}
