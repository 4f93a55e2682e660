// Package uring is the minimal io_uring this project needs, on
// golang.org/x/sys/unix and without cgo: setup, the ring mmaps, SQE
// preparation and submission, io_uring_enter with EINTR retry, and CQE reaping.
//
// A Ring is not safe for concurrent use. ublk ties every I/O command of a
// queue to the task that issued it, so each ring is owned by one goroutine
// locked to its OS thread; other goroutines wake that owner through an
// eventfd whose read is posted on the ring (see Eventfd).
//
// Memory whose address goes into an SQE must not move and must stay alive
// until the kernel is done with it: callers use mmap'd memory (or a
// runtime.Pinner) for such buffers. The SQE and CQE arrays themselves are
// mmap'd from the ring fd.
package uring

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/ublk/internal/uapi"
)

// ErrSQFull is returned by GetSQE when every submission slot is taken.
var ErrSQFull = errors.New("io_uring: submission queue full")

// Ring is one io_uring instance. The zero value is not usable; see New.
type Ring struct {
	fd      int
	params  uapi.IoUringParams
	sqeSize uint32

	ringMem []byte // SQ ring (and CQ ring with IORING_FEAT_SINGLE_MMAP)
	cqMem   []byte // separate CQ ring mapping, nil with single mmap
	sqeMem  []byte // the SQE array

	// Pointers into the shared rings. head/tail written by the other side
	// are read with atomic loads; ours are published with atomic stores
	// (release), as liburing does.
	sqHead, sqTail, sqMask, sqArray *uint32
	cqHead, cqTail, cqMask          *uint32
	sqEntries, cqEntries            uint32
	cqes                            unsafe.Pointer

	sqeTail uint32 // next local SQE slot; published to *sqTail by Submit
}

// Option adjusts io_uring_setup parameters.
type Option func(*uapi.IoUringParams)

// WithSQE128 asks for 128-byte SQEs (IORING_SETUP_SQE128, 5.19): the ublk
// control ring needs them because struct ublksrv_ctrl_cmd (32 bytes) does
// not fit the 16 inline command bytes of a 64-byte SQE.
func WithSQE128() Option {
	return func(p *uapi.IoUringParams) { p.Flags |= uapi.IORING_SETUP_SQE128 }
}

// WithCQSize sets the completion queue size (IORING_SETUP_CQSIZE).
func WithCQSize(n uint32) Option {
	return func(p *uapi.IoUringParams) {
		p.Flags |= uapi.IORING_SETUP_CQSIZE
		p.CqEntries = n
	}
}

// WithFlags ORs raw IORING_SETUP_* flags into the setup parameters.
func WithFlags(flags uint32) Option {
	return func(p *uapi.IoUringParams) { p.Flags |= flags }
}

// New creates a ring with at least entries submission slots. On error
// nothing is left open or mapped.
func New(entries uint32, opts ...Option) (r *Ring, err error) {
	r = &Ring{fd: -1}
	for _, o := range opts {
		o(&r.params)
	}
	fd, _, errno := unix.Syscall(uapi.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&r.params)), 0)
	if errno != 0 {
		return nil, fmt.Errorf("io_uring_setup(entries=%d flags=%#x): %w", entries, r.params.Flags, errno)
	}
	r.fd = int(fd)
	defer func() {
		if err != nil {
			r.Close()
		}
	}()
	unix.CloseOnExec(r.fd)

	p := &r.params
	r.sqeSize = uapi.SQESize
	if p.Flags&uapi.IORING_SETUP_SQE128 != 0 {
		r.sqeSize = uapi.SQE128Size
	}
	cqeSize := uint32(uapi.CQESize)
	if p.Flags&uapi.IORING_SETUP_CQE32 != 0 {
		cqeSize *= 2
	}
	sqLen := int(p.SqOff.Array + p.SqEntries*4)
	cqLen := int(p.CqOff.Cqes + p.CqEntries*cqeSize)
	single := p.Features&uapi.IORING_FEAT_SINGLE_MMAP != 0
	if single {
		sqLen = max(sqLen, cqLen)
	}
	const prot = unix.PROT_READ | unix.PROT_WRITE
	const flags = unix.MAP_SHARED | unix.MAP_POPULATE
	if r.ringMem, err = unix.Mmap(r.fd, uapi.IORING_OFF_SQ_RING, sqLen, prot, flags); err != nil {
		return nil, fmt.Errorf("io_uring: mmap SQ ring: %w", err)
	}
	cqMem := r.ringMem
	if !single {
		if r.cqMem, err = unix.Mmap(r.fd, uapi.IORING_OFF_CQ_RING, cqLen, prot, flags); err != nil {
			return nil, fmt.Errorf("io_uring: mmap CQ ring: %w", err)
		}
		cqMem = r.cqMem
	}
	if r.sqeMem, err = unix.Mmap(r.fd, uapi.IORING_OFF_SQES, int(p.SqEntries*r.sqeSize), prot, flags); err != nil {
		return nil, fmt.Errorf("io_uring: mmap SQEs: %w", err)
	}

	u32 := func(m []byte, off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&m[off])) }
	r.sqHead = u32(r.ringMem, p.SqOff.Head)
	r.sqTail = u32(r.ringMem, p.SqOff.Tail)
	r.sqMask = u32(r.ringMem, p.SqOff.RingMask)
	r.sqArray = u32(r.ringMem, p.SqOff.Array)
	r.cqHead = u32(cqMem, p.CqOff.Head)
	r.cqTail = u32(cqMem, p.CqOff.Tail)
	r.cqMask = u32(cqMem, p.CqOff.RingMask)
	r.cqes = unsafe.Pointer(&cqMem[p.CqOff.Cqes])
	r.sqEntries = p.SqEntries
	r.cqEntries = p.CqEntries
	r.sqeTail = atomic.LoadUint32(r.sqTail)
	return r, nil
}

// Fd returns the ring's file descriptor (pollable: readable when a CQE is
// ready).
func (r *Ring) Fd() int { return r.fd }

// SQEntries and CQEntries are the ring sizes the kernel granted.
func (r *Ring) SQEntries() uint32 { return r.sqEntries }
func (r *Ring) CQEntries() uint32 { return r.cqEntries }

// Features returns io_uring_params.features as reported by setup.
func (r *Ring) Features() uint32 { return r.params.Features }

// Close unmaps the rings and closes the fd. The kernel cancels whatever is
// still in flight on the ring when its last reference goes away.
func (r *Ring) Close() error {
	var errs []error
	for _, m := range []*[]byte{&r.sqeMem, &r.cqMem, &r.ringMem} {
		if *m != nil {
			errs = append(errs, unix.Munmap(*m))
			*m = nil
		}
	}
	if r.fd >= 0 {
		errs = append(errs, unix.Close(r.fd))
		r.fd = -1
	}
	return errors.Join(errs...)
}

// SQE is one submission queue entry slot, 64 or 128 bytes, in the shared
// SQE array. It is only valid until the next Submit.
type SQE []byte

// Raw views the first 64 bytes as the kernel struct.
func (s SQE) Raw() *uapi.IoUringSqe { return (*uapi.IoUringSqe)(unsafe.Pointer(&s[0])) }

// Cmd is the inline command area of IORING_OP_URING_CMD (sqe->cmd[]).
func (s SQE) Cmd() []byte { return s[uapi.SQECmdOffset:] }

// Pending reports how many SQEs were prepared but not yet submitted.
func (r *Ring) Pending() uint32 { return r.sqeTail - atomic.LoadUint32(r.sqTail) }

// GetSQE returns the next free, zeroed submission slot. It is queued for
// the kernel by the next Submit.
func (r *Ring) GetSQE() (SQE, error) {
	head := atomic.LoadUint32(r.sqHead)
	if r.sqeTail-head >= r.sqEntries {
		return nil, ErrSQFull
	}
	idx := r.sqeTail & *r.sqMask
	off := idx * r.sqeSize
	s := SQE(r.sqeMem[off : off+r.sqeSize : off+r.sqeSize])
	clear(s)
	// The indirection array maps ring positions to SQE slots; identity
	// mapping is what every simple user does.
	*(*uint32)(unsafe.Add(unsafe.Pointer(r.sqArray), uintptr(idx)*4)) = idx
	r.sqeTail++
	return s, nil
}

// Submit publishes prepared SQEs and, if waitNr > 0, waits until at least
// waitNr completions are available. It returns the number of SQEs consumed.
// io_uring_enter is restarted after EINTR, which Go's preemption signals
// cause routinely.
func (r *Ring) Submit(waitNr uint32) (int, error) {
	tail := r.sqeTail
	// Release store: the SQE contents must be visible before the tail.
	atomic.StoreUint32(r.sqTail, tail)
	toSubmit := tail - atomic.LoadUint32(r.sqHead)
	if toSubmit == 0 && waitNr == 0 {
		return 0, nil // nothing for the kernel to do: save the syscall
	}
	var flags uintptr
	if waitNr > 0 {
		flags = uapi.IORING_ENTER_GETEVENTS
	}
	submitted := 0
	for {
		n, _, errno := unix.Syscall6(uapi.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(toSubmit), uintptr(waitNr), flags, 0, 0)
		if errno == unix.EINTR {
			// Some SQEs may have been consumed before the signal; only
			// submit what is left, but do wait again.
			toSubmit = tail - atomic.LoadUint32(r.sqHead)
			continue
		}
		if errno != 0 {
			return submitted, os.NewSyscallError("io_uring_enter", errno)
		}
		submitted += int(n)
		return submitted, nil
	}
}

// CQE is one completion.
type CQE struct {
	UserData uint64
	Res      int32
	Flags    uint32
}

// PeekCQE returns the oldest completion without consuming it.
func (r *Ring) PeekCQE() (CQE, bool) {
	head := *r.cqHead
	if head == atomic.LoadUint32(r.cqTail) {
		return CQE{}, false
	}
	cqeSize := uintptr(uapi.CQESize)
	if r.params.Flags&uapi.IORING_SETUP_CQE32 != 0 {
		cqeSize *= 2
	}
	raw := (*uapi.IoUringCqe)(unsafe.Add(r.cqes, uintptr(head&*r.cqMask)*cqeSize))
	return CQE{UserData: raw.UserData, Res: raw.Res, Flags: raw.Flags}, true
}

// SeenCQE marks the oldest completion consumed, freeing its slot.
func (r *Ring) SeenCQE() { atomic.StoreUint32(r.cqHead, *r.cqHead+1) }

// ReapCQE returns and consumes the oldest completion, if there is one.
func (r *Ring) ReapCQE() (CQE, bool) {
	c, ok := r.PeekCQE()
	if ok {
		r.SeenCQE()
	}
	return c, ok
}

// PrepURingCmd fills s as IORING_OP_URING_CMD on fd with the command opcode
// cmdOp; the caller writes the command payload into s.Cmd().
func PrepURingCmd(s SQE, fd int, cmdOp uint32, userData uint64) {
	raw := s.Raw()
	raw.Opcode = uapi.IORING_OP_URING_CMD
	raw.Fd = int32(fd)
	raw.Off = uint64(cmdOp) // cmd_op shares the union with off; __pad1 stays 0
	raw.UserData = userData
}

// PrepRead fills s as IORING_OP_READ of len(buf) bytes into buf at offset
// off. buf must be mmap'd or pinned memory that stays valid until the
// completion is reaped.
func PrepRead(s SQE, fd int, buf []byte, off uint64, userData uint64) {
	raw := s.Raw()
	raw.Opcode = uapi.IORING_OP_READ
	raw.Fd = int32(fd)
	raw.Addr = uint64(uintptr(unsafe.Pointer(unsafe.SliceData(buf))))
	raw.Len = uint32(len(buf))
	raw.Off = off
	raw.UserData = userData
}

// PrepNop fills s as IORING_OP_NOP.
func PrepNop(s SQE, userData uint64) {
	raw := s.Raw()
	raw.Opcode = uapi.IORING_OP_NOP
	raw.UserData = userData
}

// The socket operations below take buffers whose addresses the kernel
// keeps until the completion: they must be mmap'd or pinned memory that
// stays valid, and is not reused, until the CQE is reaped (or the request
// is cancelled and its CQE reaped). io_uring waits for a socket to be
// ready by itself (it arms an internal poll), whether or not the socket is
// O_NONBLOCK, so a receive posted before data arrives completes when it
// does.

// PrepSend fills s as IORING_OP_SEND of buf on the socket fd, with the
// send(2) flags msgFlags (e.g. MSG_NOSIGNAL). The result is the number of
// bytes sent, which may be fewer than len(buf).
func PrepSend(s SQE, fd int, buf []byte, msgFlags uint32, userData uint64) {
	prepRW(s, uapi.IORING_OP_SEND, fd, buf, msgFlags, userData)
}

// PrepRecv fills s as IORING_OP_RECV into buf from the socket fd, with the
// recv(2) flags msgFlags. The result is the number of bytes received, 0 at
// end of stream.
func PrepRecv(s SQE, fd int, buf []byte, msgFlags uint32, userData uint64) {
	prepRW(s, uapi.IORING_OP_RECV, fd, buf, msgFlags, userData)
}

func prepRW(s SQE, op uint8, fd int, buf []byte, msgFlags uint32, userData uint64) {
	raw := s.Raw()
	raw.Opcode = op
	raw.Fd = int32(fd)
	raw.Addr = uint64(uintptr(unsafe.Pointer(unsafe.SliceData(buf))))
	raw.Len = uint32(len(buf))
	raw.OpFlags = msgFlags
	raw.UserData = userData
}

// PrepSendmsg fills s as IORING_OP_SENDMSG of msg on the socket fd: one
// gathered send of msg's iovecs. msg, its iovec array and the memory they
// point to must stay valid until the completion is reaped.
func PrepSendmsg(s SQE, fd int, msg *unix.Msghdr, msgFlags uint32, userData uint64) {
	raw := s.Raw()
	raw.Opcode = uapi.IORING_OP_SENDMSG
	raw.Fd = int32(fd)
	raw.Addr = uint64(uintptr(unsafe.Pointer(msg)))
	raw.Len = 1
	raw.OpFlags = msgFlags
	raw.UserData = userData
}

// PrepCancelFd fills s as IORING_OP_ASYNC_CANCEL of every request in
// flight on fd (IORING_ASYNC_CANCEL_FD|IORING_ASYNC_CANCEL_ALL, 5.19). Its
// result is the number of requests cancelled (0 when there were none: the
// kernel reports -ENOENT only without CANCEL_ALL); each cancelled request
// still posts its own CQE, usually -ECANCELED, and one that was already
// completing posts its real result.
func PrepCancelFd(s SQE, fd int, userData uint64) {
	raw := s.Raw()
	raw.Opcode = uapi.IORING_OP_ASYNC_CANCEL
	raw.Fd = int32(fd)
	raw.OpFlags = uapi.IORING_ASYNC_CANCEL_FD | uapi.IORING_ASYNC_CANCEL_ALL
	raw.UserData = userData
}

// PrepCancel fills s as IORING_OP_ASYNC_CANCEL of the request whose
// user_data is target. Its result is 0 when it was cancelled, -ENOENT when
// no such request was in flight, -EALREADY when it was already running and
// may still complete.
func PrepCancel(s SQE, target uint64, userData uint64) {
	raw := s.Raw()
	raw.Opcode = uapi.IORING_OP_ASYNC_CANCEL
	raw.Fd = -1
	raw.Addr = target
	raw.UserData = userData
}
