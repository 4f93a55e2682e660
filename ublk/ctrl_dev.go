package ublk

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/ublk/internal/uapi"
)

// DeviceState is the driver's device state (UBLK_S_DEV_*).
type DeviceState uint16

const (
	StateDead     DeviceState = uapi.UBLK_S_DEV_DEAD     // added, not started, or stopped
	StateLive     DeviceState = uapi.UBLK_S_DEV_LIVE     // serving
	StateQuiesced DeviceState = uapi.UBLK_S_DEV_QUIESCED // daemon gone, waiting for recovery
	StateFailIO   DeviceState = uapi.UBLK_S_DEV_FAIL_IO  // daemon gone, I/O fails (6.13+)
)

func (s DeviceState) String() string {
	switch s {
	case StateDead:
		return "DEAD"
	case StateLive:
		return "LIVE"
	case StateQuiesced:
		return "QUIESCED"
	case StateFailIO:
		return "FAIL_IO"
	}
	return fmt.Sprintf("DeviceState(%d)", uint16(s))
}

// DeviceInfo is what the driver knows about a device
// (struct ublksrv_ctrl_dev_info).
type DeviceInfo struct {
	ID         int
	Queues     int
	Depth      int
	State      DeviceState
	MaxIOBytes uint32
	DaemonPID  int      // ublksrv_pid given to START_DEV / END_USER_RECOVERY
	Flags      Features // the UBLK_F_* the device was created with (plus forced ones)
	OwnerUID   uint32
	OwnerGID   uint32
}

// BlockDevice is the device's block node, /dev/ublkbN.
func (i DeviceInfo) BlockDevice() string { return fmt.Sprintf("/dev/ublkb%d", i.ID) }

// CharDevice is the device's daemon node, /dev/ublkcN.
func (i DeviceInfo) CharDevice() string { return fmt.Sprintf("/dev/ublkc%d", i.ID) }

func infoFromRaw(r *uapi.UblksrvCtrlDevInfo) DeviceInfo {
	return DeviceInfo{
		ID:         int(r.DevID),
		Queues:     int(r.NrHwQueues),
		Depth:      int(r.QueueDepth),
		State:      DeviceState(r.State),
		MaxIOBytes: r.MaxIOBufBytes,
		DaemonPID:  int(r.UblksrvPid),
		Flags:      Features(r.Flags),
		OwnerUID:   r.OwnerUID,
		OwnerGID:   r.OwnerGID,
	}
}

func devCmd(id int) uapi.UblksrvCtrlCmd {
	return uapi.UblksrvCtrlCmd{DevID: uint32(id), QueueID: 0xffff}
}

func asBytes[T any](v *T) []byte { return unsafe.Slice((*byte)(unsafe.Pointer(v)), unsafe.Sizeof(*v)) }

// addDev sends ADD_DEV and returns the device as the kernel created it
// (it fills in the id, and may adjust depth, queues and buffer size).
func (c *Control) addDev(ctx context.Context, o Options) (DeviceInfo, error) {
	var ri uapi.UblksrvCtrlDevInfo
	ri.NrHwQueues = uint16(o.Queues)
	ri.QueueDepth = uint16(o.Depth)
	ri.MaxIOBufBytes = o.MaxIOBytes
	ri.DevID = ^uint32(0)
	if o.ID != AutoID {
		ri.DevID = uint32(o.ID)
	}
	switch o.Recovery {
	case Recovery:
		ri.Flags |= uapi.UBLK_F_USER_RECOVERY
	case RecoveryReissue:
		ri.Flags |= uapi.UBLK_F_USER_RECOVERY | uapi.UBLK_F_USER_RECOVERY_REISSUE
	case RecoveryFailIO:
		ri.Flags |= uapi.UBLK_F_USER_RECOVERY | uapi.UBLK_F_USER_RECOVERY_FAIL_IO
	}
	// QUIESCE_DEV (Device.Handoff) needs the flag at ADD_DEV, and the
	// driver takes it only with USER_RECOVERY.
	if ri.Flags&uapi.UBLK_F_USER_RECOVERY != 0 && c.features.Has(FeatureQuiesce) {
		ri.Flags |= uapi.UBLK_F_QUIESCE
	}
	if o.ZeroCopy {
		// Kernels before 6.5 report no features: they lack it too.
		if !c.features.Has(FeatureAutoBufReg) {
			return DeviceInfo{}, missing(FeatureAutoBufReg)
		}
		ri.Flags |= uapi.UBLK_F_AUTO_BUF_REG
		// With it the driver copies nothing; USER_COPY (6.4) lets the
		// backend copy a few bytes itself where an operation on the
		// registered pages would cost more (Request.ReadAt, WriteAt).
		// The driver takes both together (ublk_ctrl_add_dev).
		ri.Flags |= uapi.UBLK_F_USER_COPY
	}
	if o.BatchIO {
		if !c.features.Has(FeatureBatchIO) {
			return DeviceInfo{}, missing(FeatureBatchIO)
		}
		ri.Flags |= uapi.UBLK_F_BATCH_IO
	}
	if c.features != 0 {
		if want := Features(ri.Flags); !c.features.Has(want) {
			return DeviceInfo{}, missing(want &^ c.features)
		}
	}
	cmd := devCmd(int(ri.DevID))
	if _, err := c.run(ctx, cmdAddDev, cmd, asBytes(&ri)); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return DeviceInfo{}, fmt.Errorf("%w: device %d already exists", err, o.ID)
		}
		return DeviceInfo{}, err
	}
	return infoFromRaw(&ri), nil
}

// DeviceInfo returns the driver's view of device id (GET_DEV_INFO).
func (c *Control) DeviceInfo(ctx context.Context, id int) (DeviceInfo, error) {
	var ri uapi.UblksrvCtrlDevInfo
	if _, err := c.run(ctx, cmdGetDevInfo, devCmd(id), asBytes(&ri)); err != nil {
		return DeviceInfo{}, err
	}
	return infoFromRaw(&ri), nil
}

// QueueAffinity returns the CPUs whose I/O blk-mq maps to queue q of
// device id (GET_QUEUE_AFFINITY): where that queue's thread best runs.
func (c *Control) QueueAffinity(ctx context.Context, id, q int) (unix.CPUSet, error) {
	var set unix.CPUSet // 1024 CPUs, a multiple of sizeof(long) as the driver requires
	cmd := devCmd(id)
	cmd.Data[0] = uint64(q) // the queue goes in data[0], not queue_id
	_, err := c.run(ctx, cmdGetQueueAffinity, cmd, asBytes(&set))
	return set, err
}

func (c *Control) setParams(ctx context.Context, id int, p *Params) error {
	rp := p.raw()
	_, err := c.run(ctx, cmdSetParams, devCmd(id), asBytes(&rp))
	return err
}

// Params returns device id's parameters (GET_PARAMS).
func (c *Control) Params(ctx context.Context, id int) (Params, error) {
	var rp uapi.UblkParams
	rp.Len = uint32(unsafe.Sizeof(rp))
	if _, err := c.run(ctx, cmdGetParams, devCmd(id), asBytes(&rp)); err != nil {
		return Params{}, err
	}
	return paramsFromRaw(&rp), nil
}

// startDev sends START_DEV. It returns only when every queue has fetched
// all its tags and the disk was added, which includes the partition scan's
// reads: the queues must already be serving.
func (c *Control) startDev(ctx context.Context, id int) error {
	cmd := devCmd(id)
	cmd.Data[0] = uint64(os.Getpid())
	_, err := c.run(ctx, cmdStartDev, cmd, nil)
	return err
}

// stopDev sends STOP_DEV: the disk is removed (in-flight I/O drains, so the
// queues must keep serving) and pending fetches end with -ENODEV.
func (c *Control) stopDev(ctx context.Context, id int) error {
	_, err := c.run(ctx, cmdStopDev, devCmd(id), nil)
	return err
}

// delDev sends DEL_DEV, which waits until /dev/ublkcN is closed and unmapped
// by everyone.
func (c *Control) delDev(ctx context.Context, id int) error {
	_, err := c.run(ctx, cmdDelDev, devCmd(id), nil)
	return err
}

func (c *Control) startUserRecovery(ctx context.Context, id int) error {
	_, err := c.run(ctx, cmdStartUserRecovery, devCmd(id), nil)
	return err
}

func (c *Control) endUserRecovery(ctx context.Context, id int) error {
	cmd := devCmd(id)
	cmd.Data[0] = uint64(os.Getpid())
	_, err := c.run(ctx, cmdEndUserRecovery, cmd, nil)
	return err
}

// quiesceDev sends QUIESCE_DEV (UBLK_F_QUIESCE, 6.16): the driver stops
// dispatching new requests (they wait in the kernel), waits up to timeout
// until every queue has an idle fetch (EBUSY if not), then aborts the idle
// fetches (UBLK_IO_RES_ABORT). The device becomes QUIESCED when /dev/ublkcN
// is closed.
func (c *Control) quiesceDev(ctx context.Context, id int, timeout time.Duration) error {
	cmd := devCmd(id)
	cmd.Data[0] = uint64(max(timeout.Milliseconds(), 1)) // 0 would wait forever
	_, err := c.run(ctx, cmdQuiesceDev, cmd, nil)
	return err
}

// Remove stops and deletes device id, for devices this process does not
// serve (e.g. left behind by a daemon that died). Devices created or
// recovered by this process are removed with Device.Close.
func (c *Control) Remove(ctx context.Context, id int) error {
	if err := c.stopDev(ctx, id); err != nil && !errors.Is(err, unix.ENODEV) {
		return err
	}
	return c.delDev(ctx, id)
}

// List returns the ublk devices present, ordered by id.
func (c *Control) List(ctx context.Context) ([]DeviceInfo, error) {
	ids, err := listIDs()
	if err != nil {
		return nil, err
	}
	var out []DeviceInfo
	for _, id := range ids {
		info, err := c.DeviceInfo(ctx, id)
		if errors.Is(err, unix.ENODEV) {
			continue // deleted meanwhile
		}
		if err != nil {
			return nil, err
		}
		out = append(out, info)
	}
	return out, nil
}

// listIDs finds device numbers from sysfs (class ublk-char), falling back
// to /dev when sysfs is not mounted.
func listIDs() ([]int, error) {
	var ids []int
	add := func(name, prefix string) {
		if n, ok := strings.CutPrefix(name, prefix); ok {
			if id, err := strconv.Atoi(n); err == nil {
				ids = append(ids, id)
			}
		}
	}
	ents, err := os.ReadDir("/sys/class/ublk-char")
	if err == nil {
		for _, e := range ents {
			add(e.Name(), "ublkc")
		}
	} else {
		names, gerr := filepath.Glob("/dev/ublkc*")
		if gerr != nil {
			return nil, gerr
		}
		for _, n := range names {
			add(filepath.Base(n), "ublkc")
		}
	}
	slices.Sort(ids)
	return slices.Compact(ids), nil
}
