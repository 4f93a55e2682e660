package attach

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/ublk-nvmeof/ublk-nvmeof/ublk"
)

// Orphans are ublk devices this tool made that no live daemon serves: a
// daemon that died (SIGKILL, a crash) and was not restarted left the
// device behind, and with user recovery the driver keeps it, holding its
// I/O, until a daemon recovers it or someone deletes it
// (`detach --force`).

// StateOrphaned is the State that List gives an orphaned device.
const StateOrphaned = "ORPHANED"

// ErrServed: detach --force refused a device that a live daemon serves.
var ErrServed = errors.New("served by a live daemon")

// orphans returns, as List shows them, the devices whose run record is in
// RunDir and which the driver still has, but whose daemon neither answers
// on its control socket nor lives. served holds the device ids a daemon
// answered for. Without ublk_drv there are none.
func orphans(ctx context.Context, served map[int]bool) ([]Status, error) {
	paths, err := filepath.Glob(filepath.Join(RunDir(), "ublkb*.json"))
	if err != nil || len(paths) == 0 {
		return nil, err
	}
	var recs []record
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		var r record
		if json.Unmarshal(b, &r) != nil || served[r.DevID] {
			continue
		}
		recs = append(recs, r)
	}
	if len(recs) == 0 {
		return nil, nil
	}
	ctl, err := ublk.OpenControl()
	if errors.Is(err, ublk.ErrNotLoaded) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer ctl.Close()
	var out []Status
	for _, r := range recs {
		info, err := ctl.DeviceInfo(ctx, r.DevID)
		if err != nil || daemonLives(info) {
			continue // gone (a later attach removes the record), or served
		}
		out = append(out, Status{
			Device: info.BlockDevice(), DevID: r.DevID,
			TrAddr: r.TrAddr, TrSvcID: r.TrSvcID, NQN: r.NQN, NSID: r.NSID,
			State: StateOrphaned, Queues: info.Queues, QueueSize: info.Depth + 1,
			UblkState: info.State.String(),
		})
	}
	return out, nil
}

// daemonLives reports whether the process the driver has as the device's
// daemon (the one that started or recovered it) is still alive while the
// device is LIVE. A QUIESCED or FAIL_IO device has no daemon; a DEAD one
// was never started or was stopped.
func daemonLives(info ublk.DeviceInfo) bool {
	if info.State != ublk.StateLive || info.DaemonPID <= 0 {
		return false
	}
	return !errors.Is(syscall.Kill(info.DaemonPID, 0), syscall.ESRCH)
}

// ForceDetach deletes device devID when no live daemon serves it: ublk
// STOP_DEV and DEL_DEV (I/O the driver holds for a recovery fails with
// EIO), and its run record is removed. It works without the record. It
// refuses, with an error wrapping ErrServed, a device whose daemon answers
// on its control socket or whose daemon process lives; a device the driver
// does not have is ErrNoSuchDevice.
func ForceDetach(ctx context.Context, devID int) error {
	dev := fmt.Sprintf("/dev/ublkb%d", devID)
	if st, err := GetStatus(ctx, devID); err == nil {
		return fmt.Errorf("%s: %w (pid %d): detach it without --force", dev, ErrServed, st.PID)
	}
	ctl, err := ublk.OpenControl()
	if err != nil {
		return err
	}
	defer ctl.Close()
	info, err := ctl.DeviceInfo(ctx, devID)
	if errors.Is(err, syscall.ENODEV) {
		_ = removeRecord(devID)
		return fmt.Errorf("%w: there is no %s", ErrNoSuchDevice, dev)
	}
	if err != nil {
		return err
	}
	if daemonLives(info) {
		return fmt.Errorf("%s: %w: the driver has pid %d serving it: stop that process first", dev, ErrServed, info.DaemonPID)
	}
	if err := ctl.Remove(ctx, devID); err != nil {
		return fmt.Errorf("deleting %s: %w", dev, err)
	}
	_ = os.Remove(socketPath(devID)) // its dead daemon's, nobody answers on it
	return removeRecord(devID)
}
