package attach

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
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
	Size    uint64 `json:"size"` // at creation

	// The namespace's identity (Namespace Identifiers and LBA data
	// size, as lifecycle.Namespace.SameIdentity compares them), so that a
	// new daemon never serves another namespace's data to the file system
	// on the device. Absent from records of daemons before they were kept.
	NGUID     string `json:"nguid,omitempty"` // hex
	EUI64     string `json:"eui64,omitempty"`
	UUID      string `json:"uuid,omitempty"`
	BlockSize uint32 `json:"block_size,omitempty"`
}

// newRecord is the record of device devID serving namespace ns of o's
// target.
func newRecord(devID int, o Options, ns *nvmeof.Namespace) record {
	return record{
		DevID: devID, TrAddr: o.TrAddr, TrSvcID: o.TrSvcID, NQN: o.NQN, NSID: o.NSID,
		Size:  ns.Blocks << ns.BlockShift,
		NGUID: hex.EncodeToString(ns.NGUID[:]), EUI64: hex.EncodeToString(ns.EUI64[:]), UUID: hex.EncodeToString(ns.UUID[:]),
		BlockSize: uint32(ns.BlockSize()),
	}
}

// ErrOtherNamespace: attach --recover found the device left for this
// target and NSID, but the namespace behind the NSID is another one now.
// The device is left alone, for a daemon of its own namespace. Errors
// wrapping it also match ErrNoNamespace (exit status 7).
var ErrOtherNamespace = errors.New("another namespace")

type otherNamespaceError struct{ msg string }

func (e *otherNamespaceError) Error() string { return e.msg }
func (e *otherNamespaceError) Is(target error) bool {
	return target == ErrOtherNamespace || target == ErrNoNamespace
}

// checkNamespace returns an error wrapping ErrOtherNamespace unless ns is
// the namespace the recorded device served. Its size may have changed (the
// device follows it). Without identifiers to compare (a record of an older
// daemon, or a namespace reporting none) the size must be the same, as
// before identities were kept.
func (r record) checkNamespace(ns *nvmeof.Namespace) error {
	now := newRecord(r.DevID, Options{}, ns)
	dev := fmt.Sprintf("/dev/ublkb%d", r.DevID)
	differ := func(what, was, is string) error {
		return &otherNamespaceError{fmt.Sprintf("%s served namespace %d with %s %s; it has %s %s now: another namespace, not taking the device over (left for its own daemon)",
			dev, r.NSID, what, was, what, is)}
	}
	known := r.BlockSize != 0
	switch {
	case known && r.NGUID != now.NGUID:
		return differ("NGUID", r.NGUID, now.NGUID)
	case known && r.EUI64 != now.EUI64:
		return differ("EUI64", r.EUI64, now.EUI64)
	case known && r.UUID != now.UUID:
		return differ("UUID", r.UUID, now.UUID)
	case known && r.BlockSize != now.BlockSize:
		return differ("block size", fmt.Sprint(r.BlockSize), fmt.Sprint(now.BlockSize))
	}
	noIDs := strings.Trim(now.NGUID+now.EUI64+now.UUID, "0") == ""
	if (!known || noIDs) && r.Size != now.Size {
		return differ("size", fmt.Sprint(r.Size), fmt.Sprint(now.Size))
	}
	return nil
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
