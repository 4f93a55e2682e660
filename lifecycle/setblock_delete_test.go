package lifecycle

import (
	"errors"
	"testing"
)

// A block device registered while a delete is tearing the controller down
// (a self-delete while attach creates the device) was taken by neither:
// the delete had looked for a block device before it was set, and attach
// saw the controller not yet Done. SetBlock refuses it once the delete has
// begun, so that its caller removes it; one registered before is removed
// by the delete.
func TestSetBlockDuringDelete(t *testing.T) {
	h := newUnstartedHarness(t, noKeepAlive)
	if err := h.c.Start(t.Context()); err != nil {
		t.Fatalf("Start: %v", err)
	}
	inTeardown := make(chan struct{})
	release := make(chan struct{})
	h.c.setStepHook(func(s Step, after bool) {
		if s == StepChangeState && !after {
			close(inTeardown)
			<-release
		}
	})
	go h.c.Delete()
	<-inTeardown
	err := h.c.SetBlock(h.blk)
	close(release)
	<-h.c.Done()
	h.blk.mu.Lock()
	removed := h.blk.removed
	h.blk.mu.Unlock()
	switch {
	case err == nil && !removed:
		t.Fatal("SetBlock during the delete's teardown was accepted, and the delete did not remove the block device: it is left behind")
	case err != nil && !errors.Is(err, ErrDeleted):
		t.Fatalf("SetBlock during the delete: %v, want ErrDeleted", err)
	case err != nil && removed:
		t.Fatal("SetBlock refused the block device, and the delete removed it too")
	}
	h.finish()
}
