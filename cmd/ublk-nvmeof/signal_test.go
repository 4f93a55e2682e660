package main

import (
	"fmt"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/attach"
)

// TestSignalStages: the first SIGTERM ends the context (graceful detach),
// the second closes hurry (immediate); stop joins the handler. Real signals to this process: signal.Notify keeps them from
// killing it while signalContext runs.
func TestSignalStages(t *testing.T) {
	ctx, hurry, stop := signalContext()
	stopped := false
	defer func() {
		if !stopped {
			stop()
		}
	}()
	wait := func(what string, ch <-chan struct{}) {
		t.Helper()
		select {
		case <-ch:
		case <-time.After(20 * time.Second):
			t.Fatalf("%s not seen", what)
		}
	}
	if err := syscall.Kill(os.Getpid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	wait("first SIGTERM", ctx.Done())
	select {
	case <-hurry:
		t.Fatal("one signal made the detach immediate")
	default:
	}
	// Sent only after the first was handled: two pending SIGTERMs would
	// merge into one.
	if err := syscall.Kill(os.Getpid(), syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	wait("second signal", hurry)
	stop()
	stopped = true
}

func TestExitImmediate(t *testing.T) {
	err := fmt.Errorf("attach: %w", attach.ErrDetachedImmediately)
	if got := exitCode(err); got != exitImmediate {
		t.Fatalf("exitCode(%v) = %d, want %d", err, got, exitImmediate)
	}
	if exitImmediate == exitOK || exitImmediate == exitFailure {
		t.Fatal("an immediate detach must be told apart from success and failure")
	}
}
