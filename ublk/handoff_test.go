package ublk

import (
	"context"
	"errors"
	"testing"
	"time"
)

// TestHandoffRefusedOnceStopBegan: a hand-over (SIGUSR2) that comes while
// a delete's teardown is stopping the device (the controller deleted
// itself) must leave the device to that delete: had Handoff gone on, it
// would have claimed Close, and DEL_DEV would never have been sent.
func TestHandoffRefusedOnceStopBegan(t *testing.T) {
	d := &Device{info: DeviceInfo{ID: 3, Flags: FeatureUserRecovery | FeatureQuiesce}}
	if d.beginEnd() { // what Stop and Close do first
		t.Fatal("no hand-over began, yet beginEnd says handed over")
	}
	_, err := d.Handoff(context.Background())
	if !errors.Is(err, ErrStopping) {
		t.Fatalf("Handoff after Stop began: %v, want ErrStopping", err)
	}
	if d.handoff != nil {
		t.Fatal("a refused Handoff claimed the device's end")
	}
}

// TestStopWaitsForHandoff: Stop (and Close) during a hand-over wait for it
// and then do nothing: the device is the next daemon's. d has no control
// device, so a Stop that went on to STOP_DEV would panic.
func TestStopWaitsForHandoff(t *testing.T) {
	d := &Device{info: DeviceInfo{ID: 3}}
	h := make(chan struct{})
	d.handoff = h // as Handoff sets it before it quiesces
	stopped := make(chan error, 2)
	go func() { stopped <- d.Stop(context.Background()) }()
	go func() { stopped <- d.Close(context.Background()) }()
	select {
	case err := <-stopped:
		t.Fatalf("Stop or Close returned (%v) while the hand-over was under way", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(h)
	for range 2 {
		if err := <-stopped; err != nil {
			t.Fatalf("Stop/Close after a hand-over: %v", err)
		}
	}
	if d.stopBegun {
		t.Fatal("Stop after a hand-over marked the stop begun")
	}
}
