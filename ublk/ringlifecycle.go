package ublk

import (
	"errors"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/ublk/internal/uring"
)

// RingLifecycle is a RingBackend with operations of its own on the
// queue's ring that belong to no request: a network backend keeps a
// socket's receive armed there, and sends its capsules from there, so
// that the thread that commits a request to the driver is the one that
// reads its answer, with no other thread woken on the way.
//
// Its methods are called on the queue's goroutine, with the queue's
// QueueRing, and must not block. Other goroutines reach that goroutine
// with QueueRing.Post.
//
// The seed rule on the ring (docs/design.md, Data path): when the queue's
// loop ends (STOP_DEV, a forced stop, an error) it calls StopRing, in
// which the backend cancels every operation it has in flight (CancelFd),
// then goes on reaping completions, handing them to RingCompletion, until
// RingIdle reports true, and only then closes the ring. A backend frees a
// socket or a buffer an operation referenced only once that operation's
// completion was handed to it.
type RingLifecycle interface {
	RingBackend
	// RingEntries is the most operations of its own the backend has in
	// flight on one queue's ring at once; the ring is sized for them
	// beside the queue's, so that its completion queue cannot overflow.
	RingEntries() int
	// StartRing is called once the ring is set up, before any request
	// of the queue is served.
	StartRing(qr *QueueRing)
	// StopRing asks the backend to cancel everything it has in flight:
	// the ring is about to close. No request is served after it, and the
	// backend puts nothing new on the ring.
	StopRing(qr *QueueRing)
	// RingIdle reports whether the backend has nothing in flight.
	RingIdle(qr *QueueRing) bool
	// RingAbandoned is called, instead of waiting any longer, when the
	// ring closes while RingIdle is still false (not idle after
	// ringStopTimeout, or the ring failed while stopping): the
	// operations left may still run in the kernel. The backend lets go of
	// everything but the memory they may touch, which it leaks (never
	// unmaps), so that the daemon can exit.
	RingAbandoned(qr *QueueRing)
}

// ErrQueueStopped is returned by QueueRing.Post once the queue's loop has
// ended: nothing more runs on its goroutine. The ring's operations but
// CancelFd return it from StopRing on: the ring is closing.
var ErrQueueStopped = errors.New("ublk: queue stopped")

// ringStopTimeout bounds how long a stopping queue waits for a
// RingLifecycle's cancelled operations to complete; a variable for tests.
var ringStopTimeout = 10 * time.Second

func (q *queue) ringLifecycle() RingLifecycle {
	rl, _ := q.ringBackend.(RingLifecycle)
	return rl
}

// The socket operations below take memory whose address the kernel keeps
// until the completion (the buffer, a msghdr and its iovecs): mmap'd, or
// pinned, and left alone until the completion was handed to the backend.
// They may be used on the queue's goroutine only.

// sendFlags are the send(2) flags of Send and Sendmsg: MSG_WAITALL makes
// io_uring send the rest of a partial send itself once the socket has
// room again (Linux 5.18), so a send completes once, when all of it is
// in the socket or it failed, not once per piece the socket took; the
// result is then short only on an error.
const sendFlags = unix.MSG_NOSIGNAL | unix.MSG_WAITALL

// Send puts on the ring a send(2) of buf on the socket fd. The result is
// the number of bytes sent, fewer than len(buf) only if sending failed
// after some were.
func (qr *QueueRing) Send(fd int, buf []byte, userData uint64) error {
	s, err := qr.slot(userData)
	if err == nil {
		uring.PrepSend(s, fd, buf, sendFlags, userData|ringBackendData)
	}
	return err
}

// Sendmsg puts on the ring a sendmsg(2) of msg's iovecs on the socket fd,
// with Send's flags.
func (qr *QueueRing) Sendmsg(fd int, msg *unix.Msghdr, userData uint64) error {
	s, err := qr.slot(userData)
	if err == nil {
		uring.PrepSendmsg(s, fd, msg, sendFlags, userData|ringBackendData)
	}
	return err
}

// Recv puts on the ring a recv(2) into buf from the socket fd; it waits
// for data whether or not the socket is O_NONBLOCK, and 0 is the end of
// the stream.
func (qr *QueueRing) Recv(fd int, buf []byte, userData uint64) error {
	s, err := qr.slot(userData)
	if err == nil {
		uring.PrepRecv(s, fd, buf, 0, userData|ringBackendData)
	}
	return err
}

// RecvFull puts on the ring a recv(2) of MSG_WAITALL into buf from the
// socket fd: io_uring receives again by itself until buf is full (Linux
// 5.18), so the completion comes once, with len(buf) bytes, or with
// fewer at the end of the stream, on an error or a cancel.
func (qr *QueueRing) RecvFull(fd int, buf []byte, userData uint64) error {
	s, err := qr.slot(userData)
	if err == nil {
		uring.PrepRecv(s, fd, buf, unix.MSG_WAITALL, userData|ringBackendData)
	}
	return err
}

// CancelFd puts on the ring the cancellation of every operation in flight
// on fd (Linux 5.19). Its own completion carries userData and the number
// cancelled; each cancelled operation completes with -ECANCELED (or its
// result, if it was already completing).
// It is the one operation still accepted once the queue is stopping.
func (qr *QueueRing) CancelFd(fd int, userData uint64) error {
	if userData&ringBackendData != 0 {
		return ErrUserData
	}
	s, err := qr.anySQE()
	if err == nil {
		uring.PrepCancelFd(s, fd, userData|ringBackendData)
	}
	return err
}

func (qr *QueueRing) slot(userData uint64) (uring.SQE, error) {
	if userData&ringBackendData != 0 {
		return nil, ErrUserData
	}
	return qr.getSQE()
}

// Post runs f on the queue's goroutine, after the batch in progress; it
// may be called from any goroutine and never blocks. It returns
// ErrQueueStopped, and f is not run, once the loop has ended. A function
// posted before that runs even while the queue stops (after StopRing).
func (qr *QueueRing) Post(f func()) error { return qr.q.post(f) }

// stopRing ends a RingLifecycle's use of the ring before it is closed
// (the seed rule on the ring): StopRing cancels what the backend has in
// flight, and completions are reaped and handed to it until it reports
// none left. Functions posted until then still run; Post fails afterwards.
// Bounded by ringStopTimeout: a backend that never goes idle is reported,
// and abandons what is left (RingAbandoned).
func (q *queue) stopRing(rl RingLifecycle) {
	// Before StopRing: what it, the completions and the posted functions
	// would start from here on could outlive the ring.
	q.ringStopping = true
	rl.StopRing(&q.qr)
	deadline := time.Now().Add(ringStopTimeout)
	for !rl.RingIdle(&q.qr) {
		if time.Now().After(deadline) {
			q.log.Error("ublk: ring backend still busy after its operations were cancelled; closing the ring", "queue", q.id)
			break
		}
		if _, err := q.ring.Submit(0); err != nil {
			q.log.Error("ublk: submit while stopping", "queue", q.id, "err", err)
			break
		}
		if _, err := q.ring.WaitCQE(100 * time.Millisecond); err != nil {
			q.log.Error("ublk: wait while stopping", "queue", q.id, "err", err)
			break
		}
		for {
			cqe, ok := q.ring.ReapCQE()
			if !ok {
				break
			}
			if cqe.UserData&ringBackendData != 0 {
				q.ringCompletion(cqe)
			}
			// The eventfd read is left spent: posted functions run
			// on every round here anyway.
		}
		q.runPosted()
	}
	q.mu.Lock()
	q.ended = true
	q.mu.Unlock()
	q.runPosted()
	if !rl.RingIdle(&q.qr) {
		rl.RingAbandoned(&q.qr)
	}
}
