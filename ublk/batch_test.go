package ublk

import (
	"encoding/binary"
	"errors"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/ublk/internal/uapi"
	"github.com/ublk-nvmeof/ublk-nvmeof/ublk/internal/uring"
)

// newBatchQueue is a bare queue in batch mode with a ring of its own (no
// device): enough to drive the batch bookkeeping with completions made up
// by the test, as the driver would post them.
func newBatchQueue(t *testing.T, depth int, zeroCopy bool) *queue {
	t.Helper()
	q := newBareQueue(t, depth)
	q.batch, q.zeroCopy = true, zeroCopy
	var err error
	if q.ring, err = uring.New(uint32(2 * depth)); err != nil {
		t.Fatal(err)
	}
	if err := q.setupBatch(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		q.closeFetchRing()
		q.ring.Close()
		q.teardownBatch()
	})
	return q
}

func fetchCQE(bid uint16, res int32, more bool) uring.CQE {
	c := uring.CQE{UserData: batchFetchData, Res: res, Flags: uapi.IORING_CQE_F_BUFFER | uint32(bid)<<uapi.IORING_CQE_BUFFER_SHIFT}
	if more {
		c.Flags |= uapi.IORING_CQE_F_MORE
	}
	return c
}

// putTags writes tags into fetch buffer bid as the driver does and returns
// the completion's byte count.
func putTags(q *queue, bid uint16, tags ...int) int32 {
	b := q.fetchBuf(bid)
	for i, tag := range tags {
		binary.NativeEndian.PutUint16(b[2*i:], uint16(tag))
	}
	return int32(2 * len(tags))
}

// Each element of a COMMIT_IO_CMDS carries the tag, its result, the tag
// as buffer slot, and in copy mode the tag's buffer, which the driver
// copies READ data from and the next request's WRITE data to.
func TestBatchCommitElements(t *testing.T) {
	for _, zeroCopy := range []bool{false, true} {
		q := newBatchQueue(t, 8, zeroCopy)
		wantBytes := 8
		if !zeroCopy {
			wantBytes = 16
		}
		if q.elemBytes != wantBytes {
			t.Fatalf("zero copy %v: %d-byte elements, want %d", zeroCopy, q.elemBytes, wantBytes)
		}
		done := []completion{{tag: 5, res: 4096}, {tag: 2, res: -int32(unix.EIO)}, {tag: 7, res: 0}}
		if err := q.commitBatch(done); err != nil {
			t.Fatal(err)
		}
		if len(q.unsent) != 0 || len(q.commitFree) != commitArrays-1 {
			t.Fatalf("after one commit: %d unsent, %d arrays free", len(q.unsent), len(q.commitFree))
		}
		i := int(q.ring.Pending()) // one SQE queued
		if i != 1 {
			t.Fatalf("%d SQEs queued, want one COMMIT_IO_CMDS", i)
		}
		arr := -1
		for a, n := range q.elemNr {
			if n != 0 {
				arr = a
			}
		}
		if arr < 0 || q.elemNr[arr] != len(done) {
			t.Fatalf("element counts %v, want one array of %d", q.elemNr, len(done))
		}
		elems := q.elemArray(arr)
		for j, c := range done {
			if got := q.elemAt(elems, j); got != c {
				t.Errorf("element %d = %+v, want %+v", j, got, c)
			}
			h := (*uapi.UblkElemHeader)(unsafe.Pointer(&elems[j*q.elemBytes]))
			if int(h.BufIndex) != c.tag {
				t.Errorf("element %d: buf_index %d, want the tag %d", j, h.BufIndex, c.tag)
			}
			if !zeroCopy {
				addr := *(*uint64)(unsafe.Pointer(&elems[j*q.elemBytes+8]))
				if want := uint64(uintptr(unsafe.Pointer(&q.bufs[c.tag*q.maxIO]))); addr != want {
					t.Errorf("element %d: buf_addr %#x, want tag %d's buffer %#x", j, addr, c.tag, want)
				}
			}
		}
		// The driver committed everything: the array is free again.
		if err := q.commitCompletion(uring.CQE{UserData: batchCommitData | uint64(arr), Res: int32(len(done) * q.elemBytes)}); err != nil {
			t.Fatal(err)
		}
		if len(q.commitFree) != commitArrays || q.batchErr != nil {
			t.Fatalf("after the commit's completion: %d arrays free, error %v", len(q.commitFree), q.batchErr)
		}
	}
}

// A short COMMIT_IO_CMDS result committed the elements before the one the
// driver refused: that request is reported, and those after it are
// committed again by the next iteration, with their results.
func TestBatchCommitShort(t *testing.T) {
	q := newBatchQueue(t, 8, false)
	done := []completion{{1, 10}, {3, 11}, {4, 12}, {6, 13}, {0, 14}}
	if err := q.commitBatch(done); err != nil {
		t.Fatal(err)
	}
	arr := commitArrays - 1 // taken from the end of the free list
	if err := q.commitCompletion(uring.CQE{UserData: batchCommitData | uint64(arr), Res: int32(2 * q.elemBytes)}); err != nil {
		t.Fatal(err)
	}
	if q.batchErr == nil || !strings.Contains(q.batchErr.Error(), "tag 4") {
		t.Fatalf("error %v, want one naming tag 4, the refused element", q.batchErr)
	}
	if want := done[3:]; len(q.unsent) != len(want) || q.unsent[0] != want[0] || q.unsent[1] != want[1] {
		t.Fatalf("to commit again: %+v, want %+v", q.unsent, want)
	}
	// A negative result committed nothing: the first element is the one
	// refused, the rest go again.
	if err := q.commitBatch(nil); err != nil {
		t.Fatal(err)
	}
	arr = commitArrays - 1
	q.batchErr = nil
	if err := q.commitCompletion(uring.CQE{UserData: batchCommitData | uint64(arr), Res: -int32(unix.EBUSY)}); err != nil {
		t.Fatal(err)
	}
	if q.batchErr == nil || !strings.Contains(q.batchErr.Error(), "tag 6") || len(q.unsent) != 1 || q.unsent[0] != done[4] {
		t.Fatalf("after -EBUSY: error %v, to commit again %+v", q.batchErr, q.unsent)
	}
	// A completion for an array not in flight is the driver's mistake, or
	// ours: never a silent reuse.
	if err := q.commitCompletion(uring.CQE{UserData: batchCommitData | 200}); err == nil {
		t.Fatal("completion of array 200 accepted")
	}
}

// The fetch's completions are read within what the queue gave the driver:
// a buffer id, a byte count or a tag out of range is an error, not an
// index.
func TestBatchFetchBounded(t *testing.T) {
	q := newBatchQueue(t, 8, false)
	q.fetching = fetchSlots
	res := putTags(q, 3, 7, 0, 5)
	fetched, err := q.fetchCompletion(fetchCQE(3, res, true), nil)
	if err != nil || len(fetched) != 3 || fetched[0] != 7 || fetched[1] != 0 || fetched[2] != 5 {
		t.Fatalf("fetched %v, %v; want [7 0 5]", fetched, err)
	}
	if q.fetching != fetchSlots {
		t.Fatal("a completion with IORING_CQE_F_MORE ended the fetch")
	}
	// Handed over: marked owned at once, before dispatch.
	for _, tag := range fetched {
		if !q.reqs[tag].owned.Load() {
			t.Fatalf("tag %d handed over but not marked owned", tag)
		}
	}
	q.reqs[2].owned.Store(true)
	for _, c := range []struct {
		what string
		bid  uint16
		res  int32
		tags []int // written into the buffer first
	}{
		{"buffer id past the ring", uint16(fetchBufCount), 2, nil},
		{"odd byte count", 1, 3, nil},
		{"more bytes than a buffer", 1, fetchBufSize + 2, nil},
		{"negative byte count with a buffer", 1, -2, nil},
		{"tag past the depth", 1, 2, []int{8}},
		{"tag the backend holds", 1, 2, []int{2}},
		{"tag handed over before, not yet dispatched", 1, 2, []int{7}},
		{"same tag twice in one completion", 1, 4, []int{4, 4}},
	} {
		putTags(q, 1, c.tags...)
		if got, err := q.fetchCompletion(fetchCQE(c.bid, c.res, true), nil); err == nil {
			t.Errorf("%s: accepted, tags %v", c.what, got)
		}
	}
}

// How a fetch ends decides what the loop does: out of buffers, it is
// armed again once the buffers are back; -ENODEV, the queue is going
// away; anything else is an error.
func TestBatchFetchEnds(t *testing.T) {
	q := newBatchQueue(t, 8, false)
	q.fetching = fetchSlots
	for _, res := range []int32{-int32(unix.ENOBUFS), -int32(unix.ENOMEM)} {
		if _, err := q.fetchCompletion(uring.CQE{UserData: batchFetchData, Res: res}, nil); err != nil {
			t.Fatal(err)
		}
		if q.fetching != fetchSlots-1 || q.fetchEnded {
			t.Fatalf("after %v: %d fetches armed, ended %v", unix.Errno(-res), q.fetching, q.fetchEnded)
		}
		before := q.ring.Pending()
		if err := q.endReap(); err != nil {
			t.Fatal(err)
		}
		if q.fetching != fetchSlots || q.ring.Pending() != before+1 {
			t.Fatalf("the fetch was not armed again after %v", unix.Errno(-res))
		}
	}
	// The last completion may carry tags too.
	res := putTags(q, 0, 4)
	fetched, err := q.fetchCompletion(fetchCQE(0, res, false), nil)
	if err != nil || len(fetched) != 1 || q.fetching != fetchSlots-1 {
		t.Fatalf("final completion with a tag: %v, %v, %d armed", fetched, err, q.fetching)
	}
	q.reqs[4].owned.Store(false)
	if _, err := q.fetchCompletion(uring.CQE{UserData: batchFetchData, Res: uapi.UBLK_IO_RES_ABORT}, nil); err != nil || !q.fetchEnded {
		t.Fatalf("-ENODEV: %v, ended %v", err, q.fetchEnded)
	}
	before := q.ring.Pending()
	if err := q.endReap(); err != nil || q.ring.Pending() != before {
		t.Fatal("the fetch was armed again after -ENODEV")
	}
	if !q.batchDone() {
		t.Fatal("fetch ended, nothing held, nothing to commit: the loop should end")
	}
	hand(q, 1, OpRead, 512)
	if q.batchDone() {
		t.Fatal("the loop would end while the backend holds a request")
	}
}

// A fetch that keeps ending for want of a buffer although every buffer
// was given back fails the queue instead of spinning; one that hands a
// tag over in between is fine.
func TestBatchFetchStarved(t *testing.T) {
	q := newBatchQueue(t, 8, false)
	enobufs := uring.CQE{UserData: batchFetchData, Res: -int32(unix.ENOBUFS)}
	for i := range 3 * maxStarved {
		q.fetching = fetchSlots
		if _, err := q.fetchCompletion(enobufs, nil); err != nil {
			t.Fatalf("end %d for want of a buffer, with tags between: %v", i, err)
		}
		if i%maxStarved == maxStarved-1 {
			if _, err := q.fetchCompletion(fetchCQE(0, putTags(q, 0, 1), true), nil); err != nil {
				t.Fatal(err)
			}
			q.reqs[1].owned.Store(false) // served and committed
		}
	}
	var err error
	for i := 0; i <= maxStarved && err == nil; i++ {
		q.fetching = fetchSlots
		_, err = q.fetchCompletion(enobufs, nil)
	}
	if err == nil || !strings.Contains(err.Error(), "no tag handed over") {
		t.Fatalf("after %d ends in a row for want of a buffer: %v", maxStarved+1, err)
	}
}

// FuzzBatchFetch feeds the fetch completion handler what a driver could
// write: any buffer contents, byte count, buffer id and flags. It never
// panics, and every tag it hands on is below the depth and not held.
func FuzzBatchFetch(f *testing.F) {
	f.Add([]byte{1, 0, 2, 0}, int32(4), uint16(0), true)
	f.Add([]byte{0xff, 0xff}, int32(2), uint16(15), false)
	f.Add([]byte{}, int32(-105), uint16(0), false)
	f.Fuzz(func(t *testing.T, data []byte, res int32, bid uint16, more bool) {
		q := newBatchQueue(t, 8, false)
		copy(q.fetchBuf(bid%uint16(fetchBufCount)), data)
		q.reqs[3].owned.Store(true)
		q.fetching = fetchSlots
		fetched, err := q.fetchCompletion(fetchCQE(bid, res, more), nil)
		seen := map[int]bool{}
		for _, tag := range fetched {
			if tag < 0 || tag >= q.depth || tag == 3 || seen[tag] {
				t.Fatalf("handed on tag %d (err %v), fetched %v", tag, err, fetched)
			}
			seen[tag] = true
		}
		if err == nil && !more && q.fetching != fetchSlots-1 {
			t.Fatalf("a final completion left %d fetches armed", q.fetching)
		}
		if err == nil && int(res) > fetchBufSize {
			t.Fatalf("%d bytes accepted", res)
		}
	})
}

// A recovered BATCH_IO device whose requests the queue cannot commit in
// batches is refused before any queue starts, naming why.
func TestCheckBatchFlags(t *testing.T) {
	for _, c := range []struct {
		f    Features
		want string // "" for accepted
	}{
		{FeatureUserRecovery, ""},
		{FeatureBatchIO, ""},
		{FeatureBatchIO | FeatureAutoBufReg | FeatureUserCopy, ""},
		{FeatureBatchIO | FeatureUserCopy, "USER_COPY"},
		{FeatureBatchIO | FeatureSupportZeroCopy, "SUPPORT_ZERO_COPY"},
		{FeatureBatchIO | FeatureZoned | FeatureUserCopy, "ZONED"},
		{FeatureUserCopy | FeatureZoned, ""}, // not batch: the per-tag path's business
	} {
		err := checkBatchFlags(c.f)
		if (err == nil) != (c.want == "") || (err != nil && (!strings.Contains(err.Error(), c.want) || !errors.Is(err, ErrNotSupported))) {
			t.Errorf("flags %v: %v, want an error naming %q", c.f, err, c.want)
		}
	}
}
