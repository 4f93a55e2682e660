package ublk

import (
	"testing"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
)

// requireBatchIO checks that a kernel without UBLK_F_BATCH_IO refuses
// BatchIO, naming the feature and the release, and leaves no device; then
// skips with that reason. On a kernel with it, it returns.
func requireBatchIO(t *testing.T, c *Control) {
	t.Helper()
	o := ringOptions(false)
	o.BatchIO = true
	requireFeature(t, c, FeatureBatchIO, o)
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
	// With one fetch buffer, a second batch of requests dispatched
	// before the loop gave the buffer back finds none: the fetch ends
	// with -ENOBUFS, the requests wait in the driver, and the re-armed
	// fetch hands them over. Nothing is lost or repeated.
	t.Run("one fetch buffer", func(t *testing.T) {
		// Restored after the device is closed (cleanups run last
		// first), though each queue keeps the count it was set up with.
		n := fetchBufCount
		t.Cleanup(func() { fetchBufCount = n })
		fetchBufCount = 1
		o := ringOptions(false)
		o.BatchIO = true
		b := newRingFileBackend(t, int64(o.Size), o.Queues, o.Depth)
		d := createDevice(t, c, o, b)
		verifyRingDevice(t, d, b, 4*mib)
		var rearmed int64
		for _, q := range d.queues {
			rearmed += q.rearmed.Load()
		}
		t.Logf("fetches armed again: %d", rearmed)
		if rearmed == 0 {
			t.Error("no fetch ended for want of a buffer: the path this case is for did not run")
		}
	})
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
	stoppedElsewhere(t, c, d)
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
