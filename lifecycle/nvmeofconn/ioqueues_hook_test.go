package nvmeofconn_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
)

// IOQueuesConnected sees the association once its I/O queues connected,
// before I/O is let in, and I/O then works.
func TestIOQueuesConnectedHook(t *testing.T) {
	r := newRig(t, target.Config{}, time.Second)
	var calls atomic.Int32
	r.conn.IOQueuesConnected = func(ctrl *nvmeof.Controller) error {
		calls.Add(1)
		if len(ctrl.IOQueues()) != 2 {
			t.Errorf("hook with %d I/O queues, want 2", len(ctrl.IOQueues()))
		}
		return nil
	}
	c := r.start(nil)
	defer c.Delete()
	if n := calls.Load(); n != 1 {
		t.Fatalf("hook called %d times, want once", n)
	}
	if err := write(c, 0, 3, 42); err != nil {
		t.Fatalf("write: %v", err)
	}
	if v, err := read(c, 3); err != nil || v != 42 {
		t.Fatalf("read: %d, %v", v, err)
	}
}

// An error from IOQueuesConnected fails the association: the first one
// fails Start with it.
func TestIOQueuesConnectedHookError(t *testing.T) {
	r := newRig(t, target.Config{}, time.Second)
	refused := errors.New("refused by the test")
	r.conn.IOQueuesConnected = func(*nvmeof.Controller) error { return refused }
	opts := lifecycle.DefaultOptions()
	opts.Logger = quiet
	c, err := lifecycle.New(r.conn, opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.Start(ctx); !errors.Is(err, refused) {
		t.Fatalf("Start = %v, want the hook's error", err)
	}
}
