package ublk

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"runtime"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/ublk/internal/uapi"
	"github.com/ublk-nvmeof/ublk-nvmeof/ublk/internal/uring"
)

// ControlPath is the ublk driver's control node.
const ControlPath = "/dev/ublk-control"

// DefaultCommandTimeout bounds control commands whose context has no
// deadline, so a stuck kernel call is reported instead of hanging.
const DefaultCommandTimeout = 30 * time.Second

// Control is an open /dev/ublk-control. Its methods are safe for concurrent
// use: every command runs on its own short-lived io_uring, so a command that
// blocks in the kernel (START_DEV, STOP_DEV, DEL_DEV) does not hold up
// commands for other devices.
type Control struct {
	mu       sync.RWMutex // guards fd against Close while a command submits
	fd       int
	features Features // from GET_FEATURES at open; 0 on kernels before 6.5
	encode   bool     // use ioctl-encoded opcodes (UBLK_F_CMD_IOCTL_ENCODE)

	// Logger, if set before Create or Recover, logs for the devices they
	// return (with ublk=N added), so that a caller's attributes (which
	// target the device serves) are on every line of the device and its
	// queues. nil: slog.Default().
	Logger *slog.Logger
}

func (c *Control) logger() *slog.Logger {
	if c.Logger != nil {
		return c.Logger
	}
	return slog.Default()
}

// OpenControl opens /dev/ublk-control and probes the driver's features.
func OpenControl() (*Control, error) {
	fd, err := unix.Open(ControlPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	switch {
	case err == nil:
	case errors.Is(err, unix.ENOENT), errors.Is(err, unix.ENODEV), errors.Is(err, unix.ENXIO):
		return nil, fmt.Errorf("open %s: %w", ControlPath, ErrNotLoaded)
	case errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM):
		return nil, fmt.Errorf("open %s: %w (ublk needs root or CAP_SYS_ADMIN)", ControlPath, fs.ErrPermission)
	default:
		return nil, &os.PathError{Op: "open", Path: ControlPath, Err: err}
	}
	c := &Control{fd: fd}
	f, err := c.getFeatures(context.Background())
	switch {
	case err == nil:
		c.features = f
		c.encode = f.Has(FeatureCmdIoctlEncode)
	case errors.Is(err, ErrNotSupported):
		// Before 6.5 there is no GET_FEATURES; such kernels understand
		// the legacy opcodes.
	default:
		c.Close()
		return nil, err
	}
	return c, nil
}

// Close closes the control node. Commands already submitted keep their own
// reference to it in the kernel.
func (c *Control) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fd < 0 {
		return nil
	}
	err := unix.Close(c.fd)
	c.fd = -1
	return err
}

// Features returns the driver's feature mask (UBLK_U_CMD_GET_FEATURES,
// Linux 6.5). On older kernels the error wraps ErrNotSupported.
func (c *Control) Features() (Features, error) {
	if c.features != 0 {
		return c.features, nil
	}
	return c.getFeatures(context.Background())
}

func (c *Control) getFeatures(ctx context.Context) (Features, error) {
	var buf [8]byte
	_, err := c.run(ctx, cmdGetFeatures, uapi.UblksrvCtrlCmd{DevID: ^uint32(0), QueueID: 0xffff}, buf[:])
	if err != nil {
		// Kernels before 6.5 reject the unknown opcode with EINVAL
		// (6.0, 6.1) or EOPNOTSUPP.
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
			return 0, &FeatureError{Feature: "UBLK_U_CMD_GET_FEATURES", Since: "6.5"}
		}
		return 0, err
	}
	return Features(*(*uint64)(unsafe.Pointer(&buf[0]))), nil
}

// ctrlOp names one control command in both its encodings.
type ctrlOp struct {
	name    string // kernel name without the UBLK_U_CMD_ prefix
	encoded uint32 // UBLK_U_CMD_*
	legacy  uint32 // UBLK_CMD_*; 0 when the command has no legacy form
}

var (
	cmdGetFeatures       = ctrlOp{"GET_FEATURES", uapi.UBLK_U_CMD_GET_FEATURES, 0}
	cmdGetQueueAffinity  = ctrlOp{"GET_QUEUE_AFFINITY", uapi.UBLK_U_CMD_GET_QUEUE_AFFINITY, uapi.UBLK_CMD_GET_QUEUE_AFFINITY}
	cmdGetDevInfo        = ctrlOp{"GET_DEV_INFO", uapi.UBLK_U_CMD_GET_DEV_INFO, uapi.UBLK_CMD_GET_DEV_INFO}
	cmdAddDev            = ctrlOp{"ADD_DEV", uapi.UBLK_U_CMD_ADD_DEV, uapi.UBLK_CMD_ADD_DEV}
	cmdDelDev            = ctrlOp{"DEL_DEV", uapi.UBLK_U_CMD_DEL_DEV, uapi.UBLK_CMD_DEL_DEV}
	cmdStartDev          = ctrlOp{"START_DEV", uapi.UBLK_U_CMD_START_DEV, uapi.UBLK_CMD_START_DEV}
	cmdStopDev           = ctrlOp{"STOP_DEV", uapi.UBLK_U_CMD_STOP_DEV, uapi.UBLK_CMD_STOP_DEV}
	cmdSetParams         = ctrlOp{"SET_PARAMS", uapi.UBLK_U_CMD_SET_PARAMS, uapi.UBLK_CMD_SET_PARAMS}
	cmdGetParams         = ctrlOp{"GET_PARAMS", uapi.UBLK_U_CMD_GET_PARAMS, uapi.UBLK_CMD_GET_PARAMS}
	cmdStartUserRecovery = ctrlOp{"START_USER_RECOVERY", uapi.UBLK_U_CMD_START_USER_RECOVERY, uapi.UBLK_CMD_START_USER_RECOVERY}
	cmdEndUserRecovery   = ctrlOp{"END_USER_RECOVERY", uapi.UBLK_U_CMD_END_USER_RECOVERY, uapi.UBLK_CMD_END_USER_RECOVERY}
	cmdUpdateSize        = ctrlOp{"UPDATE_SIZE", uapi.UBLK_U_CMD_UPDATE_SIZE, 0}
	cmdQuiesceDev        = ctrlOp{"QUIESCE_DEV", uapi.UBLK_U_CMD_QUIESCE_DEV, 0}
)

// opcode picks the encoding this kernel understands: ioctl-encoded when the
// driver advertises UBLK_F_CMD_IOCTL_ENCODE (it may be built without the
// legacy opcodes), the legacy number otherwise (kernels before 6.2).
func (op ctrlOp) opcode(encode bool) uint32 {
	if encode || op.legacy == 0 {
		return op.encoded
	}
	return op.legacy
}

// ctrlError is a failed control command: which command, for which device,
// and the kernel's errno.
type ctrlError struct {
	op    string
	devID uint32
	err   error
}

func (e *ctrlError) Error() string {
	hint := ""
	if errors.Is(e.err, unix.EPERM) {
		hint = " (ublk control commands need root or CAP_SYS_ADMIN)"
	}
	if e.devID == ^uint32(0) {
		return fmt.Sprintf("ublk %s: %v%s", e.op, e.err, hint)
	}
	return fmt.Sprintf("ublk %s (dev %d): %v%s", e.op, e.devID, e.err, hint)
}

func (e *ctrlError) Unwrap() error { return e.err }

// run executes one control command and returns the CQE result (>= 0).
// payload, if not nil, is copied to a kernel-visible buffer whose address
// and length go into the command, and copied back afterwards (the kernel
// both reads and writes such buffers, depending on the command).
//
// The command gets a fresh SQE128 ring: commands can block in the kernel
// for long (START_DEV waits for every queue's fetches) and must not
// serialize unrelated devices. If ctx ends first, the ring is closed, which
// makes io_uring cancel the command in its worker, and an error wrapping
// ErrTimeout (or ctx's error) is returned.
func (c *Control) run(ctx context.Context, op ctrlOp, cmd uapi.UblksrvCtrlCmd, payload []byte) (int32, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultCommandTimeout)
		defer cancel()
	}
	fail := func(err error) (int32, error) { return 0, &ctrlError{op.name, cmd.DevID, err} }

	ring, err := uring.New(4, uring.WithSQE128())
	if err != nil {
		if errors.Is(err, unix.EINVAL) {
			// SQE128 arrived in 5.19, together with URING_CMD.
			return fail(&FeatureError{Feature: "IORING_SETUP_SQE128", Since: "5.19"})
		}
		if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) {
			return fail(fmt.Errorf("io_uring unavailable (disabled by kernel.io_uring_disabled or seccomp?): %w", err))
		}
		return fail(err)
	}
	closeRing := true
	defer func() {
		if closeRing {
			ring.Close()
		}
	}()

	// The kernel copies to and from payload's address from an io-wq worker,
	// possibly after we returned on a timeout: use mmap'd memory that the
	// Go runtime will never hand out again while the command may run.
	var buf []byte
	if len(payload) > 0 {
		if buf, err = unix.Mmap(-1, 0, os.Getpagesize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE); err != nil {
			return fail(fmt.Errorf("mmap command buffer: %w", err))
		}
		copy(buf, payload)
		cmd.Addr = uint64(uintptr(unsafe.Pointer(&buf[0])))
		cmd.Len = uint16(len(payload))
	}
	unmap := true
	defer func() {
		if unmap && buf != nil {
			unix.Munmap(buf)
		}
	}()

	// Keep submission and reaping on one thread: completions of io-wq work
	// are delivered as task work to the submitting thread.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()

	c.mu.RLock()
	if c.fd < 0 {
		c.mu.RUnlock()
		return fail(os.ErrClosed)
	}
	sqe, err := ring.GetSQE()
	if err != nil {
		c.mu.RUnlock()
		return fail(err)
	}
	uring.PrepURingCmd(sqe, c.fd, op.opcode(c.encode), 1)
	*(*uapi.UblksrvCtrlCmd)(unsafe.Pointer(&sqe.Cmd()[0])) = cmd
	_, err = ring.Submit(0)
	c.mu.RUnlock()
	if err != nil {
		return fail(err)
	}

	for {
		cqe, ok := ring.ReapCQE()
		if ok {
			if cqe.Res < 0 {
				return fail(unix.Errno(-cqe.Res))
			}
			copy(payload, buf)
			return cqe.Res, nil
		}
		slice := 100 * time.Millisecond
		if dl, _ := ctx.Deadline(); time.Until(dl) < slice {
			slice = max(time.Until(dl), 0)
		}
		if _, err := ring.WaitCQE(slice); err != nil {
			return fail(err)
		}
		if _, ok := ring.PeekCQE(); ok {
			continue
		}
		if ctx.Err() != nil {
			// Leave the buffer mapped: the io-wq worker may still write
			// to it after the ring is gone. One page per stuck command
			// is the price of never corrupting reused memory.
			unmap = false
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return fail(fmt.Errorf("%w (kernel call still blocked)", ErrTimeout))
			}
			return fail(ctx.Err())
		}
	}
}
