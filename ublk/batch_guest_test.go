package ublk

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
)

// requireBatchIO checks that a kernel without UBLK_F_BATCH_IO refuses
// BatchIO, naming the feature and the release, and leaves no device; then
// skips with that reason. On a kernel with it, it returns.
func requireBatchIO(t *testing.T, c *Control) {
	t.Helper()
	f, err := c.Features()
	if err != nil {
		t.Fatal(err)
	}
	if f.Has(FeatureBatchIO) {
		return
	}
	before, _ := c.List(t.Context())
	o := ringOptions(false)
	o.BatchIO = true
	d, err := c.Create(t.Context(), o, NullBackend{})
	if err == nil {
		d.Close(t.Context())
		t.Fatalf("Create with BatchIO succeeded on a kernel without BATCH_IO (features %v)", f)
	}
	var fe *FeatureError
	if !errors.As(err, &fe) || !strings.Contains(err.Error(), "UBLK_F_BATCH_IO") || !strings.Contains(err.Error(), "7.0") {
		t.Fatalf("Create with BatchIO: %v; want a FeatureError naming UBLK_F_BATCH_IO and 7.0", err)
	}
	if after, _ := c.List(t.Context()); len(after) != len(before) {
		t.Errorf("devices before %v, after the refused Create %v", before, after)
	}
	t.Skipf("batch I/O: %v (Create refused it as it should)", err)
}

// TestGuestBatchIO: with UBLK_F_BATCH_IO (7.0) requests arrive through
// the multishot fetch and are committed in batches, copying through the
// tag buffers and with zero copy; every request size reads back what was
// written, and lands in the backend.
func TestGuestBatchIO(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	requireBatchIO(t, c)
	for _, zeroCopy := range []bool{false, true} {
		name := "copy"
		if zeroCopy {
			name = "zero-copy"
		}
		t.Run(name, func(t *testing.T) {
			if zeroCopy {
				requireZeroCopy(t, c)
			}
			o := ringOptions(zeroCopy)
			o.BatchIO = true
			b := newRingFileBackend(t, int64(o.Size), o.Queues, o.Depth)
			d := createDevice(t, c, o, b)
			if !d.Info().Flags.Has(FeatureBatchIO) {
				t.Fatalf("device flags %v lack BATCH_IO", d.Info().Flags)
			}
			verifyRingDevice(t, d, b, 4*mib)
			served := b.copied.Load() + b.zeroCopied.Load()
			if served == 0 || (zeroCopy && b.copied.Load() != 0) {
				t.Errorf("%d requests with a copy buffer, %d zero-copy", b.copied.Load(), b.zeroCopied.Load())
			}
		})
	}
}

// TestGuestBatchIOStoppedElsewhere: STOP_DEV from another process ends a
// batch queue's fetch with -ENODEV, and the queues end by themselves.
func TestGuestBatchIOStoppedElsewhere(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	requireBatchIO(t, c)
	mem, err := NewMemoryBackend(2 * mib)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	d, err := c.Create(t.Context(), Options{ID: AutoID, Queues: 2, Depth: 8, BatchIO: true, Params: Params{Size: 2 * mib}}, mem)
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, d.BlockDevice(), 0, 1)
	other := openControl(t)
	if err := other.stopDev(t.Context(), d.ID()); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d.Done():
	case <-time.After(time.Minute):
		t.Fatal("queues still serving a minute after STOP_DEV")
	}
	if err := d.Err(); err != nil {
		t.Errorf("queues ended with %v", err)
	}
	if err := d.Close(t.Context()); err != nil {
		t.Errorf("Close after an external stop: %v", err)
	}
	assertGone(t, c, d.ID())
}

// TestGuestBatchIORecoveryAfterSIGKILL: a batch device whose daemon was
// killed under writes is recovered (PREP_IO_CMDS again by the new
// daemon's queues) with no write lost or failed, copying and zero copy.
func TestGuestBatchIORecoveryAfterSIGKILL(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	requireBatchIO(t, c)
	t.Run("copy", func(t *testing.T) { recoverAfterSIGKILL(t, c, envBatch+"=1") })
	t.Run("zero-copy", func(t *testing.T) {
		requireZeroCopy(t, c)
		recoverAfterSIGKILL(t, c, envBatch+"=1", envZeroCopy+"=1")
	})
}

// TestGuestBatchIOHandoff: Handoff refuses a BATCH_IO device, naming
// why (QUIESCE_DEV would fail the I/O that arrives before the next
// daemon), and the device goes on serving; such a daemon hands over by
// exiting (TestGuestBatchIORecoveryAfterSIGKILL).
func TestGuestBatchIOHandoff(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	requireBatchIO(t, c)
	t.Logf("Handoff refused: %v", handoffRefused(t, c, true))
}
