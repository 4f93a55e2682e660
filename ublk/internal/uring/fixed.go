package uring

import (
	"os"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/ublk/internal/uapi"
)

// Registered buffers: a table of buffers the ring knows by index, so that
// an operation names its memory by (buf_index, offset) instead of an
// address. ublk zero copy fills a sparse table with the pages of the block
// requests themselves (UBLK_F_AUTO_BUF_REG); a table of user memory works
// the same way for the operations and is what the tests here use.

func (r *Ring) register(op uintptr, arg unsafe.Pointer, nr uintptr) error {
	for {
		_, _, errno := unix.Syscall6(uapi.SYS_IO_URING_REGISTER, uintptr(r.fd), op, uintptr(arg), nr, 0, 0)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return os.NewSyscallError("io_uring_register", errno)
		}
		return nil
	}
}

// RegisterSparseBuffers gives the ring a buffer table of n empty slots
// (IORING_REGISTER_BUFFERS2 with IORING_RSRC_REGISTER_SPARSE, 5.19). With
// IORING_SETUP_SINGLE_ISSUER it must be called on the submitting thread.
func (r *Ring) RegisterSparseBuffers(n uint32) error {
	rr := uapi.IoUringRsrcRegister{Nr: n, Flags: uapi.IORING_RSRC_REGISTER_SPARSE}
	return r.register(uapi.IORING_REGISTER_BUFFERS2, unsafe.Pointer(&rr), unsafe.Sizeof(rr))
}

// RegisterBuffers gives the ring a table of the given buffers, slot i
// being bufs[i] (IORING_REGISTER_BUFFERS). The kernel pins their pages;
// the memory must be mmap'd (or otherwise never move) and stay mapped until
// UnregisterBuffers or Close.
func (r *Ring) RegisterBuffers(bufs [][]byte) error {
	iov := make([]unix.Iovec, len(bufs))
	for i, b := range bufs {
		iov[i].Base = unsafe.SliceData(b)
		iov[i].SetLen(len(b))
	}
	return r.register(uapi.IORING_REGISTER_BUFFERS, unsafe.Pointer(unsafe.SliceData(iov)), uintptr(len(iov)))
}

// UnregisterBuffers drops the ring's buffer table.
func (r *Ring) UnregisterBuffers() error {
	return r.register(uapi.IORING_UNREGISTER_BUFFERS, nil, 0)
}

// PrepReadFixed fills s as IORING_OP_READ_FIXED: n bytes from fd at off
// into registered buffer bufIndex, starting bufOff bytes into it. For a
// buffer the kernel registered (a ublk request's pages) the offset is from
// its start; for user memory io_uring takes sqe->addr as an address, so
// bufOff is then added to the buffer's own address by the caller (see
// FixedAddr). On a socket this is a receive into the buffer.
func PrepReadFixed(s SQE, fd int, bufIndex uint16, addr uint64, n uint32, off uint64, userData uint64) {
	prepFixed(s, uapi.IORING_OP_READ_FIXED, fd, bufIndex, addr, n, off, userData)
}

// PrepWriteFixed fills s as IORING_OP_WRITE_FIXED: n bytes from
// registered buffer bufIndex (at addr, as for PrepReadFixed) to fd at off.
func PrepWriteFixed(s SQE, fd int, bufIndex uint16, addr uint64, n uint32, off uint64, userData uint64) {
	prepFixed(s, uapi.IORING_OP_WRITE_FIXED, fd, bufIndex, addr, n, off, userData)
}

func prepFixed(s SQE, op uint8, fd int, bufIndex uint16, addr uint64, n uint32, off uint64, userData uint64) {
	raw := s.Raw()
	raw.Opcode = op
	raw.Fd = int32(fd)
	raw.Addr = addr
	raw.Len = n
	raw.Off = off
	raw.BufIndex = bufIndex
	raw.UserData = userData
}

// PrepSendZCFixed fills s as IORING_OP_SEND_ZC of n bytes of registered
// buffer bufIndex (at addr, as for PrepReadFixed) on the socket fd
// (IORING_RECVSEND_FIXED_BUF, 6.0). It completes twice: the result, with
// IORING_CQE_F_MORE, then a notification (IORING_CQE_F_NOTIF, res 0) once
// the kernel let go of the pages; only then may the buffer be reused. The
// socket must support zero-copy sends (TCP does, AF_UNIX does not:
// -EOPNOTSUPP).
func PrepSendZCFixed(s SQE, fd int, bufIndex uint16, addr uint64, n uint32, msgFlags uint32, userData uint64) {
	raw := s.Raw()
	raw.Opcode = uapi.IORING_OP_SEND_ZC
	raw.Fd = int32(fd)
	raw.Ioprio = uapi.IORING_RECVSEND_FIXED_BUF
	raw.Addr = addr
	raw.Len = n
	raw.OpFlags = msgFlags
	raw.BufIndex = bufIndex
	raw.UserData = userData
}

// FixedAddr is the sqe->addr that names off bytes into b, a buffer
// registered from user memory (RegisterBuffers).
func FixedAddr(b []byte, off int) uint64 {
	return uint64(uintptr(unsafe.Pointer(unsafe.SliceData(b)))) + uint64(off)
}

// PrepWriteBuf fills s as IORING_OP_WRITE of buf to fd at off (the
// unregistered counterpart of PrepWriteFixed). buf must be mmap'd or
// pinned memory that stays valid until the completion is reaped.
func PrepWriteBuf(s SQE, fd int, buf []byte, off uint64, userData uint64) {
	PrepRead(s, fd, buf, off, userData)
	s.Raw().Opcode = uapi.IORING_OP_WRITE
}
