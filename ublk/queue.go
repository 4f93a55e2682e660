package ublk

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/ublk/internal/uapi"
	"github.com/ublk-nvmeof/ublk-nvmeof/ublk/internal/uring"
)

// userData of the eventfd read; ublk commands use their tag (< 4096).
const wakeUserData = 1 << 32

// completion is one finished request waiting to be committed.
type completion struct {
	tag int
	res int32
}

// queue serves one hardware queue. Its loop runs on one goroutine locked to
// its OS thread, because the driver binds the queue to the task that issued
// the first FETCH_REQ (ubq_daemon) and rejects commands from other tasks.
type queue struct {
	id    int
	depth int
	maxIO int
	cdev  int // /dev/ublkcN, owned by the Device
	// userCopy: the device has UBLK_F_USER_COPY, a request's data is
	// read and written with pread and pwrite on cdev (Request.ReadAt).
	userCopy bool
	encode   bool // ioctl-encoded I/O opcodes
	backend  Backend
	log      *slog.Logger

	reqs []Request // one per tag

	ringState  // RingBackend and zero copy (ringbackend.go)
	batchState // UBLK_F_BATCH_IO (batch.go)

	// Owned by the loop goroutine (bufs: see teardown).
	ring       *uring.Ring
	descs      []byte       // read-only mmap of the queue's ublksrv_io_desc array
	bufs       []byte       // depth*maxIO bytes of anonymous mmap: the tag buffers
	wake       []byte       // 8-byte landing area of the eventfd read (mmap'd page)
	efd        int          // eventfd: other goroutines' doorbell
	spare      []completion // drained completion list, reused as the next one
	spareCalls []func()     // drained posted functions, reused as the next list

	// efdMu, taken after mu, is held shared while the eventfd is written
	// without mu, and exclusively to close it.
	efdMu sync.RWMutex

	mu          sync.Mutex
	done        []completion // completed by the Backend, not yet committed
	calls       []func()     // posted to run on the loop's thread (QueueRing.Post)
	dispatching bool         // loop is serving a batch; it drains done and calls afterwards
	ended       bool         // loop done running posted functions: Post fails
	closed      bool         // loop gone: drop completions, never touch efd
	stop        bool         // forced stop requested
	owned       int          // requests held by the Backend
}

func newQueue(id, depth, maxIO, cdev int, encode bool, b Backend, log *slog.Logger) *queue {
	q := &queue{id: id, depth: depth, maxIO: maxIO, cdev: cdev, encode: encode, backend: b, log: log, efd: -1}
	q.reqs = make([]Request, depth)
	for i := range q.reqs {
		q.reqs[i].q = q
		q.reqs[i].Queue = id
		q.reqs[i].Tag = i
	}
	return q
}

// descArraySize is the size of one queue's descriptor mapping, and
// descStride the distance between queues in /dev/ublkcN's mmap offsets: the
// driver lays queues out at UBLK_MAX_QUEUE_DEPTH descriptors each, whatever
// the actual depth (ublk_ch_mmap).
func descArraySize(depth int) int {
	return roundUp(depth*int(unsafe.Sizeof(uapi.UblksrvIODesc{})), os.Getpagesize())
}

func descStride() int {
	return roundUp(uapi.UBLK_MAX_QUEUE_DEPTH*int(unsafe.Sizeof(uapi.UblksrvIODesc{})), os.Getpagesize())
}

func roundUp(x, to int) int { return (x + to - 1) / to * to }

// queueRingFlags suit a ring that one thread both submits to and waits on:
// completions (ublk completes its commands through task work) are run when
// that thread enters the kernel to wait anyway, instead of interrupting it
// (COOP_TASKRUN 5.19, SINGLE_ISSUER 6.0, DEFER_TASKRUN 6.1). Measured in
// the VM with the null backend: about twice the 4 KiB IOPS of a plain ring.
const queueRingFlags = uapi.IORING_SETUP_COOP_TASKRUN | uapi.IORING_SETUP_SINGLE_ISSUER | uapi.IORING_SETUP_DEFER_TASKRUN

// newQueueRing creates a queue's ring on the calling (locked) thread, with
// queueRingFlags where the kernel knows them.
func newQueueRing(entries uint32) (*uring.Ring, error) {
	r, err := uring.New(entries, uring.WithFlags(queueRingFlags))
	if errors.Is(err, unix.EINVAL) {
		return uring.New(entries)
	}
	return r, err
}

// setup creates the queue's resources. On error, teardown releases what was
// created.
func (q *queue) setup() error {
	var err error
	// One SQE per tag plus the eventfd read; the CQ (2x by default) then
	// can never overflow.
	if q.ring, err = newQueueRing(q.ringEntries()); err != nil {
		return fmt.Errorf("queue %d: %w", q.id, err)
	}
	if err := q.setupRingBackend(); err != nil {
		return err
	}
	if q.batch {
		if err := q.setupBatch(); err != nil {
			return err
		}
	}
	off := int64(uapi.UBLKSRV_CMD_BUF_OFFSET + q.id*descStride())
	if q.descs, err = unix.Mmap(q.cdev, off, descArraySize(q.depth), unix.PROT_READ, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return fmt.Errorf("queue %d: mmap I/O descriptors: %w", q.id, err)
	}
	// Tag buffers: the kernel copies request data to and from these
	// addresses, so they must never move: anonymous mmap, not Go heap.
	// Zero copy has none: the data stays in the request's pages.
	if !q.zeroCopy {
		if q.bufs, err = unix.Mmap(-1, 0, q.depth*q.maxIO, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE|unix.MAP_NORESERVE); err != nil {
			return fmt.Errorf("queue %d: mmap %d-byte buffers: %w", q.id, q.depth*q.maxIO, err)
		}
	}
	if q.wake, err = unix.Mmap(-1, 0, os.Getpagesize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE); err != nil {
		return fmt.Errorf("queue %d: mmap: %w", q.id, err)
	}
	// Blocking eventfd on purpose: io_uring completes reads of O_NONBLOCK
	// files with -EAGAIN instead of waiting. Writers never block: the
	// counter cannot get near its limit.
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("queue %d: eventfd: %w", q.id, err)
	}
	q.mu.Lock() // forceStop reads it from other goroutines
	q.efd = efd
	q.mu.Unlock()
	return nil
}

// teardown releases the queue's resources. The ring goes first: closing it
// cancels the fetches still armed, so the driver lets go of the queue. The
// tag buffers are unmapped only once the Backend returned every request,
// because it may still be copying into them: if it holds some, the last
// Complete unmaps them (and if it never completes them, they stay mapped
// rather than risking a fault). teardown itself never waits for the Backend.
func (q *queue) teardown() {
	q.closeFetchRing()
	if q.ring != nil {
		q.ring.Close()
		q.ring = nil
	}
	q.teardownBatch()
	for _, m := range []*[]byte{&q.descs, &q.wake} {
		if *m != nil {
			unix.Munmap(*m)
			*m = nil
		}
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	q.closed = true
	if q.efd >= 0 {
		q.efdMu.Lock() // no doorbell in progress (they hold it shared)
		unix.Close(q.efd)
		q.efd = -1
		q.efdMu.Unlock()
	}
	if q.owned == 0 {
		q.unmapBufs()
	} else {
		q.log.Warn("ublk: queue stopped while the backend holds requests; their buffers are freed when it completes them",
			"queue", q.id, "requests", q.owned)
	}
}

// unmapBufs releases the tag buffers; q.mu held.
func (q *queue) unmapBufs() {
	if q.bufs != nil {
		unix.Munmap(q.bufs)
		q.bufs = nil
	}
}

// complete queues a finished request for commit and wakes the loop if it
// may be asleep. It never blocks on the loop.
func (q *queue) complete(tag int, res int32) {
	q.mu.Lock()
	q.owned--
	if q.closed {
		if q.owned == 0 {
			q.unmapBufs()
		}
		q.mu.Unlock()
		return
	}
	q.done = append(q.done, completion{tag, res})
	q.ringLocked()
}

// ringLocked wakes the loop for the work just queued (a completion or a
// posted function) unless it is already woken; q.mu held, released on
// return. One doorbell per batch: while done or calls held something
// before, the loop has already been (or is being) woken; while dispatching
// it drains both itself.
func (q *queue) ringLocked() {
	ring := len(q.done)+len(q.calls) == 1 && !q.dispatching
	if ring {
		// Rung after q.mu is let go, or the woken loop would at once
		// sleep on q.mu until the write returns. efdMu keeps the
		// eventfd open (and its number not reused) meanwhile.
		q.efdMu.RLock()
	}
	q.mu.Unlock()
	if ring {
		if q.efd >= 0 {
			q.doorbell()
		}
		q.efdMu.RUnlock()
	}
}

// post queues f to run on the loop's thread (QueueRing.Post).
func (q *queue) post(f func()) error {
	q.mu.Lock()
	if q.ended || q.closed {
		q.mu.Unlock()
		return ErrQueueStopped
	}
	q.calls = append(q.calls, f)
	q.ringLocked()
	return nil
}

// doorbell writes the eventfd; q.mu or efdMu held and efd open.
func (q *queue) doorbell() {
	var one = [8]byte{1}
	for {
		_, err := unix.Write(q.efd, one[:])
		if err != unix.EINTR {
			if err != nil {
				q.log.Error("ublk: eventfd write", "queue", q.id, "err", err)
			}
			return
		}
	}
}

// forceStop makes the loop exit without waiting for the kernel.
func (q *queue) forceStop() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed || q.stop {
		return
	}
	q.stop = true
	if q.efd >= 0 { // else the loop has not started: it sees stop
		q.doorbell()
	}
}

func (q *queue) ioOp(op uint32) uint32 {
	if q.encode {
		return op
	}
	return uapi.IOCNr(op)
}

// prepIOCmd queues FETCH_REQ or COMMIT_AND_FETCH_REQ for tag.
func (q *queue) prepIOCmd(op uint32, tag int, res int32) error {
	sqe, err := q.ring.GetSQE()
	if err != nil {
		return err
	}
	uring.PrepURingCmd(sqe, q.cdev, q.ioOp(op), uint64(tag))
	cmd := (*uapi.UblksrvIOCmd)(unsafe.Pointer(&sqe.Cmd()[0]))
	cmd.QID = uint16(q.id)
	cmd.Tag = uint16(tag)
	cmd.Result = res
	if q.zeroCopy {
		sqe.Raw().Addr = autoBufReg(tag)
	} else {
		cmd.Addr = uint64(uintptr(unsafe.Pointer(&q.bufs[tag*q.maxIO])))
	}
	return nil
}

func (q *queue) prepWake() error {
	sqe, err := q.ring.GetSQE()
	if err != nil {
		return err
	}
	uring.PrepRead(sqe, q.efd, q.wake[:8], 0, wakeUserData)
	return nil
}

// run is the queue's goroutine. It reports setup success or failure on
// ready, then serves until every tag was aborted by the driver (STOP_DEV,
// or the device is otherwise going away) or forceStop is called. The OS
// thread is never unlocked: it exits with the goroutine, which tells the
// driver this queue's daemon is gone.
func (q *queue) run(ready chan<- error, cpus *unix.CPUSet) (err error) {
	runtime.LockOSThread()
	if cpus != nil && cpus.Count() > 0 {
		// Run where blk-mq submits this queue's requests: the driver
		// hands them over through task work on this thread.
		if err := unix.SchedSetaffinity(0, cpus); err != nil {
			q.log.Debug("ublk: queue thread affinity", "queue", q.id, "err", err)
		}
	}
	defer q.teardown()
	if err := q.setup(); err != nil {
		ready <- err
		return err
	}
	if q.batch {
		// Before anything else is on the ring: it waits for its answer.
		if err := q.prepBatch(); err != nil {
			ready <- err
			return err
		}
	}
	if rl := q.ringLifecycle(); rl != nil {
		// Runs before teardown (deferred calls run last first): the
		// backend's operations end while the ring is still open.
		defer q.stopRing(rl)
		rl.StartRing(&q.qr)
	}
	if err := q.armFetches(); err != nil {
		ready <- err
		return err
	}
	if err := q.prepWake(); err != nil {
		ready <- err
		return err
	}
	if _, err := q.ring.Submit(0); err != nil {
		err = fmt.Errorf("queue %d: submit fetches: %w", q.id, err)
		ready <- err
		return err
	}
	ready <- nil
	return q.loop()
}

// armFetches puts the first fetches on the ring: the multishot
// FETCH_IO_CMDS of a batch queue, else a FETCH_REQ per tag.
func (q *queue) armFetches() error {
	if q.batch {
		return q.armBatchFetches()
	}
	for tag := range q.depth {
		if err := q.prepIOCmd(uapi.UBLK_U_IO_FETCH_REQ, tag, 0); err != nil {
			return err
		}
	}
	return nil
}

func (q *queue) loop() error {
	live := q.depth // tags whose fetch the driver has not aborted
	var fetched []int
	var tagErr error // first command the driver refused
	for {
		// Wait for one completion besides those of the commits this
		// submits: a COMMIT_IO_CMDS completes inside the submission,
		// and waking for it alone would cost another io_uring_enter
		// to wait (a COMMIT_AND_FETCH_REQ posts nothing until the
		// tag's next request).
		wait := uint32(1 + q.commitsToSubmit)
		q.commitsToSubmit = 0
		if _, err := q.ring.Submit(wait); err != nil {
			return fmt.Errorf("queue %d: %w", q.id, err)
		}
		fetched = fetched[:0]
		// Completions from here until drain (a RingBackend's, Serve's,
		// posted functions') are committed by this iteration: no
		// doorbell for them.
		q.mu.Lock()
		q.dispatching = true
		q.mu.Unlock()
		for {
			cqe, ok := q.ring.ReapCQE()
			if !ok {
				break
			}
			if cqe.UserData == wakeUserData {
				if cqe.Res < 0 && cqe.Res != -int32(unix.EINTR) {
					return fmt.Errorf("queue %d: eventfd read: %w", q.id, unix.Errno(-cqe.Res))
				}
				if err := q.prepWake(); err != nil {
					return fmt.Errorf("queue %d: %w", q.id, err)
				}
				continue
			}
			if cqe.UserData&ringBackendData != 0 {
				q.ringCompletion(cqe)
				continue
			}
			if q.batch {
				var err error
				if fetched, err = q.batchCompletion(cqe, fetched); err != nil {
					return err
				}
				continue
			}
			tag := int(cqe.UserData)
			switch {
			case cqe.Res == uapi.UBLK_IO_RES_OK:
				fetched = append(fetched, tag)
			case cqe.Res == uapi.UBLK_IO_RES_ABORT:
				live--
			default:
				// E.g. -EINVAL for a command the driver did not
				// accept. The tag is lost to us; the device can
				// only be stopped.
				q.log.Error("ublk: I/O command failed", "queue", q.id, "tag", tag, "err", unix.Errno(-cqe.Res))
				if tagErr == nil {
					tagErr = fmt.Errorf("queue %d tag %d: %w", q.id, tag, unix.Errno(-cqe.Res))
				}
				live--
			}
		}
		if q.batch {
			if err := q.endReap(); err != nil {
				return fmt.Errorf("queue %d: %w", q.id, err)
			}
		}
		q.dispatch(fetched)
		done, stop := q.drain()
		if err := q.commit(done); err != nil {
			return err
		}
		q.spare = done
		if stop {
			// Hand back what the backend already finished, so those
			// requests complete rather than wait for the driver to
			// notice the thread is gone.
			q.ring.Submit(0)
			return errForced
		}
		if q.batch && q.batchDone() {
			return q.batchErr
		}
		if !q.batch && live == 0 {
			return tagErr
		}
	}
}

// commit queues the commits of the finished requests: one
// COMMIT_IO_CMDS for a batch queue, else a COMMIT_AND_FETCH_REQ each.
func (q *queue) commit(done []completion) error {
	if q.batch {
		return q.commitBatch(done)
	}
	for _, c := range done {
		if err := q.prepIOCmd(uapi.UBLK_U_IO_COMMIT_AND_FETCH_REQ, c.tag, c.res); err != nil {
			return fmt.Errorf("queue %d: %w", q.id, err)
		}
	}
	return nil
}

var errForced = errors.New("queue stopped without the driver")

// drain runs the posted functions, then takes the completion list (the
// spare one, drained by the previous iteration, takes its place: no
// allocation per batch) and ends the batch: completions after it ring the
// doorbell. The last check that no function is queued and the end of the
// batch are one critical section: a function posted between them would
// have seen dispatching and rung no doorbell, and the loop would sleep
// with it queued.
func (q *queue) drain() (done []completion, stop bool) {
	q.mu.Lock()
	q.runPostedLocked()
	done = q.done
	q.done, q.spare = q.spare[:0], nil
	stop = q.stop
	q.dispatching = false
	q.mu.Unlock()
	return done, stop
}

// runPosted runs the functions posted so far, and those they post.
func (q *queue) runPosted() {
	q.mu.Lock()
	q.runPostedLocked()
	q.mu.Unlock()
}

// runPostedLocked runs posted functions until none is queued; q.mu held,
// let go while they run, and held again on return with calls empty.
func (q *queue) runPostedLocked() {
	for len(q.calls) > 0 {
		calls := q.calls
		q.calls, q.spareCalls = q.spareCalls[:0], nil
		q.mu.Unlock()
		for i, f := range calls {
			f()
			calls[i] = nil
		}
		q.mu.Lock()
		q.spareCalls = calls[:0]
	}
}

// dispatch hands fetched requests to the Backend. Completions that happen
// inside Serve are collected without ringing the eventfd.
func (q *queue) dispatch(tags []int) {
	if len(tags) == 0 {
		return
	}
	q.mu.Lock()
	q.owned += len(tags)
	q.mu.Unlock()
	for _, tag := range tags {
		r := &q.reqs[tag]
		off := tag * uapi.UBLKSRV_IO_DESC_SIZE
		d, err := decodeDesc(q.descs[off:off+uapi.UBLKSRV_IO_DESC_SIZE], q.maxIO)
		r.Op, r.Flags = d.op, d.flags
		r.Offset = int64(d.startSector << 9)
		r.Length = int(d.nrSectors) << 9
		r.Buf = nil
		if err == nil && (d.op == OpRead || d.op == OpWrite) && !q.zeroCopy {
			r.Buf = q.bufs[tag*q.maxIO : tag*q.maxIO+r.Length : tag*q.maxIO+r.Length]
		}
		r.owned.Store(true)
		if err != nil {
			q.log.Warn("ublk: rejecting request", "queue", q.id, "tag", tag, "err", err)
			r.Complete(unix.EOPNOTSUPP)
			continue
		}
		q.backend.Serve(r)
	}
	if c, ok := q.backend.(Committer); ok {
		c.Commit(q.id)
	}
}
