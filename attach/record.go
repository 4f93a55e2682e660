package attach

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/ublk-nvmeof/ublk-nvmeof/ublk"
)

// record is what a daemon leaves in RunDir about the device it serves, so
// that after a crash a new daemon (attach --recover, systemd's restart) can
// find the device to take over. A clean detach removes it.
type record struct {
	DevID   int    `json:"dev_id"`
	TrAddr  string `json:"traddr"`
	TrSvcID string `json:"trsvcid"`
	NQN     string `json:"nqn"`
	NSID    uint32 `json:"nsid"`
	Size    uint64 `json:"size"`
}

func recordPath(devID int) string {
	return filepath.Join(RunDir(), "ublkb"+strconv.Itoa(devID)+".json")
}

func (r record) sameTarget(o Options) bool {
	return r.TrAddr == o.TrAddr && r.TrSvcID == o.TrSvcID && r.NQN == o.NQN && r.NSID == o.NSID
}

func writeRecord(r record) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	tmp := recordPath(r.DevID) + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, recordPath(r.DevID))
}

func removeRecord(devID int) error {
	err := os.Remove(recordPath(devID))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}

// findRecoverable returns the device a dead daemon left for o's target and
// namespace: its record names o's target, and the driver has it waiting
// for a new daemon (QUIESCED). Records of devices that are gone are
// removed.
func findRecoverable(ctx context.Context, ctl *ublk.Control, o Options) (record, bool, error) {
	paths, err := filepath.Glob(filepath.Join(RunDir(), "ublkb*.json"))
	if err != nil {
		return record{}, false, err
	}
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		var r record
		if err := json.Unmarshal(b, &r); err != nil || !r.sameTarget(o) {
			continue
		}
		info, err := ctl.DeviceInfo(ctx, r.DevID)
		if err != nil {
			if errors.Is(err, syscall.ENODEV) {
				_ = os.Remove(p) // the device is gone
			}
			continue
		}
		switch info.State {
		case ublk.StateQuiesced:
			return r, true, nil
		case ublk.StateLive:
			// Its daemon may have died a moment ago, before the driver
			// quiesced the device; Recover waits for that.
			if err := syscall.Kill(info.DaemonPID, 0); errors.Is(err, syscall.ESRCH) {
				return r, true, nil
			}
			return record{}, false, fmt.Errorf("/dev/ublkb%d for this target is live, served by pid %d: detach it first", r.DevID, info.DaemonPID)
		}
	}
	return record{}, false, nil
}
