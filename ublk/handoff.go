package ublk

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// errBatchQuiesce refuses Handoff on a UBLK_F_BATCH_IO device: QUIESCE_DEV
// ends such a queue's fetch through ublk_batch_cancel_queue, which also
// sets the queue's force_abort, and from then on the driver fails every
// new request with EIO until the next daemon's PREP_IO_CMDS (seen on 7.3:
// TestGuestBatchIOHandoff's writers got EIO while no daemon served). A
// daemon that exits instead leaves the requests to the next one: with
// USER_RECOVERY_REISSUE requeued (attach's choice where the kernel has
// BATCH_IO); without it the driver fails those it had queued for a batch
// fetch (ublk_abort_batch_queue), unlike a per-tag queue's.
var errBatchQuiesce = fmt.Errorf("%w: QUIESCE_DEV of a UBLK_F_BATCH_IO device fails new I/O with EIO until the next daemon is ready", ErrNotSupported)

// ErrStopping: Handoff was refused because Stop or Close had begun (a
// delete is under way, which removes the device).
var ErrStopping = errors.New("the device is being stopped")

// beginEnd is called by Stop and Close. After a Handoff began it waits for
// it and reports true: the device is the next daemon's, Stop and Close do
// nothing. Otherwise it marks the stop begun (Handoff refuses from now on,
// so a delete under way keeps the device to remove it) and reports false.
func (d *Device) beginEnd() (handedOver bool) {
	d.endMu.Lock()
	h := d.handoff
	if h == nil {
		d.stopBegun = true
	}
	d.endMu.Unlock()
	if h != nil {
		<-h
		return true
	}
	return false
}

// Handoff ends serving and leaves the device, with its /dev/ublkbN and the
// applications' I/O, to the next daemon (Control.Recover), failing nothing.
// It needs UBLK_F_QUIESCE (Linux 6.16), which Create sets where the kernel
// has it and recovery is on; on a device without it Handoff returns an
// error wrapping ErrNotSupported and changes nothing (the device still
// serves). Afterwards Stop and Close do nothing: the device is no longer
// this process's; called during a Handoff, they wait for it. Once Stop or
// Close has begun (a delete under way), Handoff refuses with ErrStopping
// and the delete removes the device.
//
// QUIESCE_DEV, sent while the queues still serve, makes the driver stop
// dispatching (new requests wait in the kernel) and abort the idle
// fetches; the Backend completes what it holds, those completions are
// committed, then the queues stop and /dev/ublkcN is closed, which leaves
// the device QUIESCED with no request in this process's hands. If that
// fails (QUIESCE_DEV's EBUSY, ctx ending), the queues stop anyway and the
// driver requeues what the Backend still held for the next daemon
// (USER_RECOVERY_REISSUE; with plain USER_RECOVERY it fails), as after a
// crash; the Backend's late completions are dropped. abandoned counts those
// requests (0 after a clean hand-over). ctx bounds the wait (default
// DefaultCommandTimeout).
//
// Without QUIESCE (6.12), and on a BATCH_IO device (errBatchQuiesce), the
// way to hand over is to exit: the driver quiesces the device once the
// daemon is gone and the next one recovers it (see
// TestGuestRecoveryAfterSIGKILL).
func (d *Device) Handoff(ctx context.Context) (abandoned int, err error) {
	for _, f := range []Features{FeatureUserRecovery, FeatureQuiesce} {
		if !d.info.Flags.Has(f) {
			return 0, fmt.Errorf("ublk: device %d cannot be handed over: %w", d.info.ID, missing(f))
		}
	}
	if d.info.Flags.Has(FeatureBatchIO) {
		return 0, fmt.Errorf("ublk: device %d cannot be handed over: %w", d.info.ID, errBatchQuiesce)
	}
	d.endMu.Lock()
	if d.stopBegun || d.handoff != nil {
		d.endMu.Unlock()
		return 0, fmt.Errorf("ublk: device %d cannot be handed over: %w", d.info.ID, ErrStopping)
	}
	done := make(chan struct{})
	d.handoff = done
	d.endMu.Unlock()
	defer close(done)
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultCommandTimeout)
		defer cancel()
	}
	err = d.quiesce(ctx)
	abandoned = d.held()
	// Stop and Close are Handoff's from now on: no STOP_DEV, no DEL_DEV.
	d.stopOnce.Do(func() {})
	d.closeOnce.Do(func() {})
	d.stopQueues() // commits what the Backend finished, then the loops end
	d.closeCdev()
	return abandoned, err
}

// quiesce sends QUIESCE_DEV and waits until the Backend holds no request.
func (d *Device) quiesce(ctx context.Context) error {
	deadline, _ := ctx.Deadline()
	if err := d.ctrl.quiesceDev(ctx, d.info.ID, time.Until(deadline)); err != nil {
		return err
	}
	for d.held() > 0 {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-d.done:
			return nil
		case <-time.After(5 * time.Millisecond):
		}
	}
	return nil
}

// held counts the requests the Backend holds, on every queue.
func (d *Device) held() int {
	n := 0
	for _, q := range d.queues {
		q.mu.Lock()
		if !q.closed {
			n += q.owned
		}
		q.mu.Unlock()
	}
	return n
}
