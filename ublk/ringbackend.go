package ublk

import (
	"errors"
	"fmt"

	"github.com/ublk-nvmeof/ublk-nvmeof/ublk/internal/uapi"
	"github.com/ublk-nvmeof/ublk-nvmeof/ublk/internal/uring"
)

// RingBackend is a Backend that does its I/O as operations on the queue's
// own io_uring, beside the ublk commands, instead of on goroutines of its
// own: Serve (or Commit) puts them on the ring through req.Ring(), and the
// queue's goroutine hands each of their completions to RingCompletion. It
// is what zero copy needs (Options.ZeroCopy): a request's pages are
// registered in that ring's buffer table, and only operations on that
// ring can reach them.
//
// The buffer rule (docs/design.md, Data path): every operation that
// touches a request's data must have completed, and its completion been
// handed to RingCompletion, before req.Complete is called. Complete
// commits the request, and with zero copy the commit unregisters its pages
// and the tag's next request takes the same buffer slot: an operation
// still in flight, or one started afterwards with the request's slot,
// would read or write another request's data. A SEND_ZC has completed
// only with its notification (CQEFlagNotif).
type RingBackend interface {
	Backend
	// RingCompletion is called on the queue's goroutine for each
	// completion of an operation the backend put on that queue's ring.
	// Like Serve, it must not block for long.
	RingCompletion(qr *QueueRing, c RingCQE)
}

// RingCQE is the completion of a RingBackend's operation: the UserData it
// was submitted with, its result (bytes, or a negative errno) and the
// io_uring CQE flags.
type RingCQE struct {
	UserData uint64
	Res      int32
	Flags    uint32
}

// CQE flags a RingBackend sees: a SEND_ZC completes first with its result
// and CQEFlagMore, then with CQEFlagNotif (Res 0) once the kernel no longer
// reads the pages; a failed send posts no notification.
const (
	CQEFlagMore  = uapi.IORING_CQE_F_MORE
	CQEFlagNotif = uapi.IORING_CQE_F_NOTIF
)

// ringBackendData marks the user_data of a RingBackend's operations; the
// ublk commands use their tag and the eventfd read wakeUserData.
const ringBackendData = 1 << 63

// ErrUserData is returned for a RingBackend operation whose UserData has
// the top bit set: the queue keeps that bit to tell them from its own.
var ErrUserData = errors.New("ublk: RingBackend user data must be below 1<<63")

// QueueRing is one queue's io_uring as its RingBackend uses it. It may be
// used only on that queue's goroutine: inside Serve, Commit and
// RingCompletion for a request of that queue.
type QueueRing struct{ q *queue }

// Queue is the index of the queue whose ring this is.
func (qr *QueueRing) Queue() int { return qr.q.id }

// ringState is what a queue keeps for a RingBackend and zero copy.
type ringState struct {
	ringBackend RingBackend // nil for other backends
	zeroCopy    bool        // UBLK_F_AUTO_BUF_REG: tag i's pages are slot i of the ring's buffer table
	qr          QueueRing
	// ringStopping is set on the queue's goroutine before StopRing: the
	// ring is about to close, and the only operation still put on it is
	// CancelFd.
	ringStopping bool
}

// Ring returns the ring of the request's queue, for a RingBackend's
// operations on this request; nil for a detached request or another kind
// of Backend.
func (r *Request) Ring() *QueueRing {
	if r.q == nil || r.q.ringBackend == nil {
		return nil
	}
	return &r.q.qr
}

// ZeroCopy reports whether the request's data is its own pages,
// registered in the queue ring's buffer table (and Buf is nil), rather
// than a copy in Buf.
func (r *Request) ZeroCopy() bool { return r.q != nil && r.q.zeroCopy && r.Buf == nil && r.hasData() }

func (r *Request) hasData() bool { return r.Op == OpRead || r.Op == OpWrite }

// ZeroCopyBackend is a RingBackend that serves zero-copy requests
// (Request.ZeroCopy: Buf is nil, and the data is moved by ReadInto,
// WriteFrom or SendZC on the request's registered pages). Only such a
// backend serves a device with AUTO_BUF_REG: one that reads Buf would
// find it nil.
type ZeroCopyBackend interface {
	RingBackend
	// ServesZeroCopy reports whether it does (a wrapper answers for
	// what it wraps).
	ServesZeroCopy() bool
}

// ringBackendOf checks b against a device's flags: a device with
// AUTO_BUF_REG (created with ZeroCopy, or recovered) needs a
// ZeroCopyBackend.
func ringBackendOf(b Backend, flags Features) (RingBackend, bool, error) {
	rb, _ := b.(RingBackend)
	zeroCopy := flags.Has(FeatureAutoBufReg)
	if !zeroCopy {
		return rb, false, nil
	}
	if rb == nil {
		return nil, false, fmt.Errorf("ublk: zero copy (UBLK_F_AUTO_BUF_REG) needs a RingBackend; %T is not one", b)
	}
	if zb, ok := b.(ZeroCopyBackend); !ok || !zb.ServesZeroCopy() {
		return nil, false, fmt.Errorf("ublk: zero copy (UBLK_F_AUTO_BUF_REG) needs a backend that serves it (ZeroCopyBackend); %T copies through Buf", b)
	}
	return rb, zeroCopy, nil
}

// ringEntries is the queue ring's SQ size: one ublk command per tag and
// the eventfd read, and for a RingBackend one operation per tag beside
// them (its CQ, twice that, then also holds a SEND_ZC's notification).
func (q *queue) ringEntries() uint32 {
	n := q.depth + 1
	if q.batch {
		// A loop iteration may queue every fetch and every commit
		// beside the eventfd read.
		n += fetchSlots + commitArrays
	}
	if q.ringBackend != nil {
		n += q.depth
	}
	if rl := q.ringLifecycle(); rl != nil {
		// Its own operations, bounded: the kernel caps the ring.
		n += min(max(rl.RingEntries(), 0), 2*uapi.UBLK_MAX_QUEUE_DEPTH)
	}
	return uint32(n)
}

// setupRingBackend prepares the ring for zero copy: a sparse buffer table
// with a slot per tag, for the driver to register each request's pages in
// before its fetch completes. On the queue's thread (SINGLE_ISSUER).
func (q *queue) setupRingBackend() error {
	q.qr.q = q
	if !q.zeroCopy {
		return nil
	}
	if err := q.ring.RegisterSparseBuffers(uint32(q.depth)); err != nil {
		return fmt.Errorf("queue %d: buffer table for zero copy: %w", q.id, err)
	}
	return nil
}

// autoBufReg is the sqe->addr of a FETCH_REQ or COMMIT_AND_FETCH_REQ for
// tag with UBLK_F_AUTO_BUF_REG: its request's pages go to slot tag. No
// UBLK_AUTO_BUF_REG_FALLBACK: the slot is this ring's and always free when
// the tag is fetched, so registration fails only when the kernel cannot
// register at all, and the driver then fails the request itself.
func autoBufReg(tag int) uint64 {
	return uapi.UblkAutoBufReg{Index: uint16(tag)}.SQEAddr()
}

// ringCompletion hands a RingBackend's completion over. Requests it
// completes there are committed by this loop iteration (the loop is
// dispatching while it reaps): no doorbell.
func (q *queue) ringCompletion(c uring.CQE) {
	q.ringBackend.RingCompletion(&q.qr, RingCQE{UserData: c.UserData &^ ringBackendData, Res: c.Res, Flags: c.Flags})
}

// getSQE is the SQE of an operation that starts I/O: refused once the
// queue is stopping, for an operation started then would outlive the ring
// (ErrQueueStopped).
func (qr *QueueRing) getSQE() (uring.SQE, error) {
	if qr.q.ringStopping {
		return nil, ErrQueueStopped
	}
	return qr.anySQE()
}

// anySQE is an SQE whether or not the queue is stopping.
func (qr *QueueRing) anySQE() (uring.SQE, error) {
	s, err := qr.q.ring.GetSQE()
	if errors.Is(err, uring.ErrSQFull) {
		// Hand the kernel what is queued (it copies SQEs at
		// submission) to free the slots.
		if _, err := qr.q.ring.Submit(0); err != nil {
			return nil, err
		}
		s, err = qr.q.ring.GetSQE()
	}
	return s, err
}

// dataRange checks an operation's range of req's data and its user data.
func (qr *QueueRing) dataRange(req *Request, off, n int, userData uint64) error {
	if req.q != qr.q {
		return fmt.Errorf("ublk: request of queue %d on the ring of queue %d", req.Queue, qr.q.id)
	}
	if !req.hasData() {
		return fmt.Errorf("ublk: %v carries no data", req.Op)
	}
	if off < 0 || n <= 0 || off > req.Length || n > req.Length-off {
		return fmt.Errorf("ublk: bytes %d+%d outside the %d-byte request", off, n, req.Length)
	}
	if userData&ringBackendData != 0 {
		return ErrUserData
	}
	return nil
}

// ReadInto puts on the ring a read of n bytes from fd at fileOff into the
// request's data at off: with zero copy IORING_OP_READ_FIXED straight into
// the request's pages, else IORING_OP_READ into Buf. On a socket (fileOff
// 0) it is a receive. A short read completes with fewer bytes.
func (qr *QueueRing) ReadInto(req *Request, off, n int, fd int, fileOff int64, userData uint64) error {
	return qr.rw(req, off, n, fd, fileOff, userData, false)
}

// WriteFrom puts on the ring a write of n bytes of the request's data at
// off to fd at fileOff: IORING_OP_WRITE_FIXED from the request's pages
// with zero copy, else IORING_OP_WRITE from Buf. On a socket (fileOff 0)
// it is a copying send from the pages, one completion: IORING_OP_SEND
// takes no registered buffer (EINVAL), only SEND_ZC does (see SendZC).
func (qr *QueueRing) WriteFrom(req *Request, off, n int, fd int, fileOff int64, userData uint64) error {
	return qr.rw(req, off, n, fd, fileOff, userData, true)
}

func (qr *QueueRing) rw(req *Request, off, n int, fd int, fileOff int64, userData uint64, write bool) error {
	if err := qr.dataRange(req, off, n, userData); err != nil {
		return err
	}
	s, err := qr.getSQE()
	if err != nil {
		return err
	}
	ud := userData | ringBackendData
	switch {
	case req.ZeroCopy() && write:
		uring.PrepWriteFixed(s, fd, uint16(req.Tag), uint64(off), uint32(n), uint64(fileOff), ud)
	case req.ZeroCopy():
		uring.PrepReadFixed(s, fd, uint16(req.Tag), uint64(off), uint32(n), uint64(fileOff), ud)
	case write:
		uring.PrepWriteBuf(s, fd, req.Buf[off:off+n], uint64(fileOff), ud)
	default:
		uring.PrepRead(s, fd, req.Buf[off:off+n], uint64(fileOff), ud)
	}
	return nil
}

// SendZC puts on the ring a zero-copy send (IORING_OP_SEND_ZC) of n bytes
// of the request's data at off on the socket fd: from the request's
// registered pages with zero copy, else from Buf. It completes twice (see
// CQEFlagMore); the request may be completed only after the second.
func (qr *QueueRing) SendZC(req *Request, off, n int, fd int, msgFlags uint32, userData uint64) error {
	if err := qr.dataRange(req, off, n, userData); err != nil {
		return err
	}
	s, err := qr.getSQE()
	if err != nil {
		return err
	}
	ud := userData | ringBackendData
	if req.ZeroCopy() {
		uring.PrepSendZCFixed(s, fd, uint16(req.Tag), uint64(off), uint32(n), msgFlags, ud)
		return nil
	}
	uring.PrepSendZCFixed(s, fd, 0, uring.FixedAddr(req.Buf, off), uint32(n), msgFlags, ud)
	raw := s.Raw()
	raw.Ioprio, raw.BufIndex = 0, 0 // a plain address, not a registered buffer
	return nil
}
