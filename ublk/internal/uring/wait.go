package uring

import (
	"os"
	"runtime"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/ublk/internal/uapi"
)

// getEventsArg mirrors struct io_uring_getevents_arg
// (include/uapi/linux/io_uring.h), passed with IORING_ENTER_EXT_ARG (5.11).
type getEventsArg struct {
	Sigmask   uint64
	SigmaskSz uint32
	Pad       uint32 // min_wait_usec since 6.12; 0 = unused
	Ts        uint64 // *struct __kernel_timespec
}

// WaitCQE waits up to timeout for at least one completion to be available,
// without submitting anything. It reports whether one is. EINTR is retried
// with the time that is left.
func (r *Ring) WaitCQE(timeout time.Duration) (bool, error) {
	if _, ok := r.PeekCQE(); ok {
		return true, nil
	}
	deadline := time.Now().Add(timeout)
	ts := new(unix.Timespec)
	arg := new(getEventsArg)
	// Both are read by the kernel through pointers that Go cannot see
	// (arg.Ts is an integer): pin them for the duration of the call.
	var pin runtime.Pinner
	pin.Pin(ts)
	pin.Pin(arg)
	defer pin.Unpin()
	arg.Ts = uint64(uintptr(unsafe.Pointer(ts)))
	for {
		left := time.Until(deadline)
		if left < 0 {
			left = 0
		}
		*ts = unix.NsecToTimespec(left.Nanoseconds())
		_, _, errno := unix.Syscall6(uapi.SYS_IO_URING_ENTER, uintptr(r.fd), 0, 1,
			uapi.IORING_ENTER_GETEVENTS|uapi.IORING_ENTER_EXT_ARG,
			uintptr(unsafe.Pointer(arg)), unsafe.Sizeof(*arg))
		switch errno {
		case 0:
		case unix.ETIME:
			_, ok := r.PeekCQE()
			return ok, nil
		case unix.EINTR:
			if _, ok := r.PeekCQE(); ok {
				return true, nil
			}
			if time.Until(deadline) <= 0 {
				return false, nil
			}
			continue
		default:
			return false, os.NewSyscallError("io_uring_enter", errno)
		}
		if _, ok := r.PeekCQE(); ok {
			return true, nil
		}
		if time.Until(deadline) <= 0 {
			return false, nil
		}
	}
}
