package ublk

import (
	"context"
	"errors"
	"fmt"
)

// ErrStopped: the device no longer serves (Stop was called, or it was
// stopped from outside), so it cannot be resized.
var ErrStopped = errors.New("ublk: device stopped")

// Resize changes the size of the started device to size bytes while it
// serves (UBLK_U_CMD_UPDATE_SIZE, Linux 6.16): the kernel sets the disk's
// capacity and notifies user space (set_capacity_and_notify: a uevent with
// RESIZE=1), as the NVMe host driver does when a namespace's size changes.
// A smaller size makes the block layer fail I/O past the new end.
//
// On a kernel without UBLK_F_UPDATE_SIZE the error wraps ErrNotSupported
// (a *FeatureError naming the release) and the device keeps its size.
// size must be a positive multiple of the logical block size.
func (d *Device) Resize(ctx context.Context, size uint64) error {
	if !d.ctrl.features.Has(FeatureUpdateSize) {
		return &FeatureError{Feature: "UBLK_F_UPDATE_SIZE", Since: FeatureUpdateSize.since()}
	}
	lbs := uint64(d.params.LogicalBlockSize)
	if lbs == 0 {
		lbs = 512
	}
	if size == 0 || size%lbs != 0 {
		return fmt.Errorf("ublk: resize device %d to %d bytes: not a positive multiple of the %d byte block", d.info.ID, size, lbs)
	}
	// Never after Stop: STOP_DEV deletes the disk, and UPDATE_SIZE on a
	// device without one dereferences NULL on kernels without "ublk: fix
	// NULL pointer dereference in ublk_ctrl_set_size" (stable, 2025).
	d.sizeMu.Lock()
	defer d.sizeMu.Unlock()
	if d.stopping {
		return fmt.Errorf("resize device %d: %w", d.info.ID, ErrStopped)
	}
	select {
	case <-d.done:
		return fmt.Errorf("resize device %d: %w", d.info.ID, ErrStopped)
	default:
	}
	if size == d.size {
		return nil
	}
	cmd := devCmd(d.info.ID)
	cmd.Data[0] = size >> 9 // in 512-byte sectors, as dev_sectors
	if _, err := d.ctrl.run(ctx, cmdUpdateSize, cmd, nil); err != nil {
		return err
	}
	d.size = size
	return nil
}

// Size is the device's size in bytes: as created, found at recovery, or
// last set by Resize.
func (d *Device) Size() uint64 {
	d.sizeMu.Lock()
	defer d.sizeMu.Unlock()
	return d.size
}

// noMoreResize makes every later Resize fail, after waiting for one in
// progress: Stop calls it before STOP_DEV.
func (d *Device) noMoreResize() {
	d.sizeMu.Lock()
	d.stopping = true
	d.sizeMu.Unlock()
}
