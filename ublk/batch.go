package ublk

import (
	"encoding/binary"
	"fmt"
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/ublk/internal/uapi"
	"github.com/ublk-nvmeof/ublk-nvmeof/ublk/internal/uring"
)

// Batched I/O (UBLK_F_BATCH_IO, 7.0; docs/design.md, Data path). Instead
// of one FETCH_REQ per tag and one COMMIT_AND_FETCH_REQ per request:
//
//   - PREP_IO_CMDS readies every tag of the queue once, before the loop
//     starts (and before START_DEV or END_USER_RECOVERY can return);
//   - two multishot FETCH_IO_CMDS stay armed: each completion names the
//     tags of new requests (a __u16 each) in a buffer the queue provided
//     (a provided buffer ring of fetchBufCount buffers). The driver
//     serves one and keeps the other waiting; when the device stops it
//     ends every fetch but the one dispatching at that moment
//     (ublk_batch_cancel_queue), so with two, one end with -ENODEV always
//     reaches the loop: the queue is going away. A fetch that ends for
//     another reason (-ENOBUFS: no buffer was left) is armed again;
//   - one COMMIT_IO_CMDS per loop iteration completes every request the
//     backend finished since the last one and readies their tags again.
//
// The rules the driver imposes (ublk_drv.c, ublk_batch_*): PREP and
// COMMIT read their elements while they are issued, but the element
// array is kept until their completion all the same; a COMMIT whose
// result is short committed only the elements before the one that
// failed; with AUTO_BUF_REG the element's buf_index is both the slot the
// commit unregisters and the slot of the tag's next request (always the
// tag here), and the commit must come from the ring that fetched; a tag
// may come back in a fetch as soon as its commit was issued.

// User data of the batch commands; ublk tags are below 1<<32, the eventfd
// read is wakeUserData, a RingBackend's operations have ringBackendData.
const (
	batchFetchData  = 2 << 32
	batchPrepData   = 3 << 32
	batchCommitData = 4 << 32 // | the element array's index
	batchDataMask   = 0xff << 32
)

const (
	// fetchBufSize holds the most tags one fetch completion carries
	// (the driver's MAX_NR_TAG, 128).
	fetchBufSize = 128 * 2
	// fetchSlots fetches are kept armed (see above).
	fetchSlots = 2
	// commitArrays element arrays: one COMMIT per iteration, reaped by
	// the next; more only guard against a completion reaped late.
	commitArrays = 4
	// maxStarved bounds the fetch ends in a row that handed no tag over
	// (each is armed again): past it the queue fails instead of spinning.
	maxStarved = 64
)

// fetchBufCount buffers, one per fetch completion until the loop hands it
// back: a burst of more completions than that between two loop iterations
// ends a fetch with -ENOBUFS, and the loop arms it again (the requests
// wait in the driver meanwhile). A power of two; a variable for tests.
var fetchBufCount = 16

// batchState is what a queue keeps for UBLK_F_BATCH_IO; all of it is
// owned by the loop's goroutine.
type batchState struct {
	batch     bool
	elemFlags uint16 // UBLK_BATCH_F_* of PREP and COMMIT
	elemBytes int

	fetchRing *uring.BufRing
	fetchBufN int    // fetchBufCount when the queue was set up
	fetchBufs []byte // fetchBufN buffers of fetchBufSize bytes (mmap)
	fetching  int    // FETCH_IO_CMDS armed
	// fetchEnded: the driver ended a fetch with -ENODEV (STOP_DEV, the
	// device going away); the loop ends once every request the backend
	// holds was committed, and arms no fetch again.
	fetchEnded bool
	// starved counts the fetch ends since one last handed a tag over:
	// every buffer is back in the ring before a fetch is armed again, so
	// more than a few in a row (maxStarved) mean the ring lost them, or
	// the driver refuses the fetch.
	starved int
	rearmed atomic.Int64 // fetches armed again, for tests

	elems      []byte       // commitArrays arrays of depth elements (mmap)
	elemNr     []int        // elements submitted in each array
	commitFree []int        // arrays not in flight
	unsent     []completion // finished requests waiting for an array
	// commitsToSubmit: COMMIT_IO_CMDS queued since the last submission,
	// which the loop's wait does not count (queue.go).
	commitsToSubmit int
	batchErr        error // first request the driver refused to commit
}

// checkBatchFlags refuses a BATCH_IO device whose requests this package
// cannot commit in batches: one with USER_COPY or SUPPORT_ZERO_COPY but
// not AUTO_BUF_REG (its elements would name no buffer, and the driver
// refuses a buffer address), or a zoned one (zone append needs
// UBLK_BATCH_F_HAS_ZONE_LBA). Create makes neither; a device another
// daemon created and this one recovers may be one.
func checkBatchFlags(f Features) error {
	switch {
	case !f.Has(FeatureBatchIO), f.Has(FeatureAutoBufReg) && !f.Has(FeatureZoned):
		return nil
	case f.Has(FeatureZoned):
		return fmt.Errorf("%w: BATCH_IO with ZONED is not served", ErrNotSupported)
	case f&(FeatureUserCopy|FeatureSupportZeroCopy) != 0:
		return fmt.Errorf("%w: BATCH_IO with %v but without AUTO_BUF_REG is not served", ErrNotSupported, f&(FeatureUserCopy|FeatureSupportZeroCopy))
	}
	return nil
}

// setupBatch maps the fetch buffers and element arrays and registers the
// provided buffer ring, with every buffer in it.
func (q *queue) setupBatch() error {
	q.elemFlags = 0
	if !q.zeroCopy {
		// The driver copies through the tag buffers: each element
		// names its tag's.
		q.elemFlags = uapi.UBLK_BATCH_F_HAS_BUF_ADDR
	}
	q.elemBytes = uapi.UblkBatchElemBytes(q.elemFlags)
	var err error
	q.fetchBufN = fetchBufCount
	if q.fetchBufs, err = unix.Mmap(-1, 0, roundUp(q.fetchBufN*fetchBufSize, os.Getpagesize()), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE); err != nil {
		return fmt.Errorf("queue %d: mmap fetch buffers: %w", q.id, err)
	}
	arrays := roundUp(commitArrays*q.depth*q.elemBytes, os.Getpagesize())
	if q.elems, err = unix.Mmap(-1, 0, arrays, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE); err != nil {
		return fmt.Errorf("queue %d: mmap commit elements: %w", q.id, err)
	}
	q.elemNr = make([]int, commitArrays)
	q.commitFree = make([]int, 0, commitArrays)
	for i := range commitArrays {
		q.commitFree = append(q.commitFree, i)
	}
	q.unsent = make([]completion, 0, q.depth)
	if q.fetchRing, err = q.ring.RegisterBufRing(q.fetchBufN, 0); err != nil {
		return fmt.Errorf("queue %d: provided buffer ring for UBLK_F_BATCH_IO: %w", q.id, err)
	}
	for bid := range q.fetchBufN {
		q.fetchRing.Add(q.fetchBuf(uint16(bid)), uint16(bid))
	}
	q.fetchRing.Advance()
	return nil
}

// teardownBatch, with the ring closed: no fetch can write the buffers.
func (q *queue) teardownBatch() {
	for _, m := range []*[]byte{&q.fetchBufs, &q.elems} {
		if *m != nil {
			unix.Munmap(*m)
			*m = nil
		}
	}
}

// closeFetchRing unregisters the provided buffer ring before the ring
// closes: a fetch still armed then finds no buffer to write.
func (q *queue) closeFetchRing() {
	if q.fetchRing != nil {
		if err := q.fetchRing.Close(); err != nil {
			q.log.Debug("ublk: unregister fetch buffers", "queue", q.id, "err", err)
		}
		q.fetchRing = nil
	}
}

func (q *queue) fetchBuf(bid uint16) []byte {
	off := int(bid) * fetchBufSize
	return q.fetchBufs[off : off+fetchBufSize : off+fetchBufSize]
}

func (q *queue) elemArray(i int) []byte {
	n := q.depth * q.elemBytes
	return q.elems[i*n : (i+1)*n : (i+1)*n]
}

// putElem writes element j of arr: tag, its result, and the slot (zero
// copy) or buffer (copy) of the tag's next request.
func (q *queue) putElem(arr []byte, j, tag int, res int32) {
	e := arr[j*q.elemBytes : (j+1)*q.elemBytes]
	h := (*uapi.UblkElemHeader)(unsafe.Pointer(&e[0]))
	h.Tag = uint16(tag)
	h.BufIndex = uint16(tag)
	h.Result = res
	if q.elemFlags&uapi.UBLK_BATCH_F_HAS_BUF_ADDR != 0 {
		*(*uint64)(unsafe.Pointer(&e[8])) = uint64(uintptr(unsafe.Pointer(&q.bufs[tag*q.maxIO])))
	}
}

func (q *queue) elemAt(arr []byte, j int) completion {
	h := (*uapi.UblkElemHeader)(unsafe.Pointer(&arr[j*q.elemBytes]))
	return completion{tag: int(h.Tag), res: h.Result}
}

// prepBatchCmd fills an SQE with PREP_IO_CMDS or COMMIT_IO_CMDS of the
// first n elements of arr.
func (q *queue) prepBatchCmd(op uint32, arr []byte, n int, userData uint64) error {
	sqe, err := q.ring.GetSQE()
	if err != nil {
		return err
	}
	// The batch commands exist only ioctl-encoded.
	uring.PrepURingCmd(sqe, q.cdev, op, userData)
	raw := sqe.Raw()
	raw.Addr = uint64(uintptr(unsafe.Pointer(&arr[0])))
	raw.Len = uint32(n * q.elemBytes)
	cmd := (*uapi.UblkBatchIO)(unsafe.Pointer(&sqe.Cmd()[0]))
	cmd.QID = uint16(q.id)
	cmd.Flags = q.elemFlags
	cmd.NrElem = uint16(n)
	cmd.ElemBytes = uint8(q.elemBytes)
	return nil
}

// prepBatch readies every tag of the queue (PREP_IO_CMDS) and waits for
// the driver's answer: nothing else is on the ring yet. START_DEV and
// END_USER_RECOVERY wait until every queue did this.
func (q *queue) prepBatch() error {
	arr := q.elemArray(0)
	for tag := range q.depth {
		q.putElem(arr, tag, tag, 0)
	}
	if err := q.prepBatchCmd(uapi.UBLK_U_IO_PREP_IO_CMDS, arr, q.depth, batchPrepData); err != nil {
		return fmt.Errorf("queue %d: %w", q.id, err)
	}
	if _, err := q.ring.Submit(1); err != nil {
		return fmt.Errorf("queue %d: submit PREP_IO_CMDS: %w", q.id, err)
	}
	c, ok := q.ring.ReapCQE()
	switch {
	case !ok || c.UserData != batchPrepData:
		return fmt.Errorf("queue %d: PREP_IO_CMDS: unexpected completion %+v", q.id, c)
	case c.Res != 0:
		return fmt.Errorf("queue %d: PREP_IO_CMDS: %w", q.id, unix.Errno(-c.Res))
	}
	return nil
}

// armFetches puts fetchSlots multishot FETCH_IO_CMDS on the ring.
func (q *queue) armBatchFetches() error {
	for q.fetching < fetchSlots {
		if err := q.armFetch(); err != nil {
			return err
		}
	}
	return nil
}

// armFetch puts a multishot FETCH_IO_CMDS on the ring.
func (q *queue) armFetch() error {
	sqe, err := q.ring.GetSQE()
	if err != nil {
		return err
	}
	uring.PrepURingCmdMultishot(sqe, q.cdev, uapi.UBLK_U_IO_FETCH_IO_CMDS, q.fetchRing.Group(), batchFetchData)
	cmd := (*uapi.UblkBatchIO)(unsafe.Pointer(&sqe.Cmd()[0]))
	cmd.QID = uint16(q.id)
	cmd.ElemBytes = 2
	q.fetching++
	return nil
}

// batchCompletion handles the completion of a batch command, appending
// the tags a fetch handed over to fetched.
func (q *queue) batchCompletion(c uring.CQE, fetched []int) ([]int, error) {
	switch c.UserData & batchDataMask {
	case batchFetchData:
		return q.fetchCompletion(c, fetched)
	case batchCommitData:
		return fetched, q.commitCompletion(c)
	}
	return fetched, fmt.Errorf("queue %d: completion with unknown user data %#x", q.id, c.UserData)
}

// fetchCompletion takes the tags out of the fetch's buffer, bounding what
// the driver wrote, and gives the buffer back (published by endReap). A
// tag handed over is marked owned at once, so that the same tag twice
// before dispatch is refused too.
func (q *queue) fetchCompletion(c uring.CQE, fetched []int) ([]int, error) {
	if bid, ok := uring.CQEBuffer(c); ok {
		if int(bid) >= q.fetchBufN || c.Res < 0 || c.Res > fetchBufSize || c.Res%2 != 0 {
			return fetched, fmt.Errorf("queue %d: fetch completion with %d bytes in buffer %d", q.id, c.Res, bid)
		}
		buf := q.fetchBuf(bid)
		for i := 0; i < int(c.Res); i += 2 {
			tag := int(binary.NativeEndian.Uint16(buf[i:]))
			if tag >= q.depth || !q.reqs[tag].owned.CompareAndSwap(false, true) {
				return fetched, fmt.Errorf("queue %d: fetch handed over tag %d (depth %d), not the driver's to hand", q.id, tag, q.depth)
			}
			fetched = append(fetched, tag)
		}
		q.fetchRing.Add(buf, bid)
		if c.Res > 0 {
			q.starved = 0
		}
	}
	if c.Flags&uapi.IORING_CQE_F_MORE != 0 {
		return fetched, nil
	}
	q.fetching--
	if c.Res == uapi.UBLK_IO_RES_ABORT {
		q.fetchEnded = true
		return fetched, nil
	}
	// Out of buffers (-ENOBUFS), or refused for the moment (-ENOMEM):
	// endReap arms it again once the buffers are back.
	if c.Res < 0 && c.Res != -int32(unix.ENOBUFS) {
		q.log.Warn("ublk: fetch ended; arming it again", "queue", q.id, "err", unix.Errno(-c.Res))
	}
	if q.starved++; q.starved > maxStarved {
		return fetched, fmt.Errorf("queue %d: FETCH_IO_CMDS ended %d times in a row with no tag handed over, every buffer given back (last: %v)", q.id, q.starved, unix.Errno(-min(c.Res, 0)))
	}
	return fetched, nil
}

// endReap publishes the fetch buffers handed back while reaping and arms
// again the fetches that ended for want of them.
func (q *queue) endReap() error {
	q.fetchRing.Advance()
	if q.fetchEnded || q.fetching == fetchSlots {
		return nil
	}
	q.rearmed.Add(int64(fetchSlots - q.fetching))
	return q.armBatchFetches()
}

// commitBatch puts the finished requests on the ring as COMMIT_IO_CMDS,
// as many as element arrays are free for (the rest wait for the next
// iteration). done is not kept.
func (q *queue) commitBatch(done []completion) error {
	q.unsent = append(q.unsent, done...)
	for len(q.unsent) > 0 && len(q.commitFree) > 0 {
		i := q.commitFree[len(q.commitFree)-1]
		arr := q.elemArray(i)
		n := min(len(q.unsent), q.depth)
		for j, c := range q.unsent[:n] {
			q.putElem(arr, j, c.tag, c.res)
		}
		if err := q.prepBatchCmd(uapi.UBLK_U_IO_COMMIT_IO_CMDS, arr, n, batchCommitData|uint64(i)); err != nil {
			return fmt.Errorf("queue %d: %w", q.id, err)
		}
		q.commitFree = q.commitFree[:len(q.commitFree)-1]
		q.elemNr[i] = n
		q.commitsToSubmit++
		q.unsent = q.unsent[:copy(q.unsent, q.unsent[n:])]
	}
	return nil
}

// commitCompletion frees the element array. A short result committed
// the elements before the one that failed: that request is lost to us
// (the driver fails it when the device goes away, as with a refused
// COMMIT_AND_FETCH_REQ), and those after it are committed again.
func (q *queue) commitCompletion(c uring.CQE) error {
	i := int(c.UserData &^ batchDataMask)
	if i >= commitArrays || q.elemNr[i] == 0 {
		return fmt.Errorf("queue %d: completion of commit array %d, not in flight", q.id, i)
	}
	n := q.elemNr[i]
	q.elemNr[i] = 0
	q.commitFree = append(q.commitFree, i)
	if int(c.Res) == n*q.elemBytes {
		return nil
	}
	arr := q.elemArray(i)
	ok, why := 0, "the driver does not say why"
	if c.Res < 0 {
		why = unix.Errno(-c.Res).Error()
	} else {
		ok = min(int(c.Res)/q.elemBytes, n-1)
	}
	lost := q.elemAt(arr, ok)
	err := fmt.Errorf("queue %d tag %d: COMMIT_IO_CMDS refused it (%d of %d elements committed): %s", q.id, lost.tag, ok, n, why)
	q.log.Error("ublk: I/O command failed", "queue", q.id, "tag", lost.tag, "err", err)
	if q.batchErr == nil {
		q.batchErr = err
	}
	for j := ok + 1; j < n; j++ {
		q.unsent = append(q.unsent, q.elemAt(arr, j))
	}
	return nil
}

// batchDone reports whether a batch queue's loop may end: the driver
// ended the fetch, and every request was committed.
func (q *queue) batchDone() bool {
	if !q.fetchEnded || len(q.unsent) > 0 || len(q.commitFree) < commitArrays {
		return false
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.owned == 0 && len(q.done) == 0
}
