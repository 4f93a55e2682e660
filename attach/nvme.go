package attach

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle"
	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle/nvmeofconn"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
	"github.com/ublk-nvmeof/ublk-nvmeof/ublk"
)

// blockBackend turns ublk requests into NVMe commands: the request of ublk
// queue i goes to I/O queue i (modulo the queues the controller granted).
//
// The fast path runs on the ublk queue thread and does not block: while
// the controller is LIVE, Serve takes a reference on the association
// (lifecycle.TryEnter), starts the command (Queue.Submit, deferred), and
// Commit sends the batch; the NVMe/TCP queue is driven by the same ublk
// queue's ring (ring.go), so the response is read and the ublk request
// completed, from the command's completion handler, on that thread too.
// Nothing is handed between goroutines, which is what a request costs
// most.
//
// The slow path is a goroutine per request through lifecycle.Do, which
// holds the request while the controller recovers: taken when the
// controller is not LIVE, when the NVMe queue has no free slot, and to
// retry a command that failed with the path (on the next association) or
// with a status without DNR (after its Command Retry Delay; lifecycle.Retry).
type blockBackend struct {
	lc      *lifecycle.Controller
	metrics *Metrics // nil: none
	// rings binds the NVMe/TCP queues to the ublk queue rings that
	// drive them (ring.go); empty (no rings) when not on a device.
	rings *ringDrivers

	// ios[queue][tag] is the state of the request a tag carries: a tag
	// is reused only after its request was completed, so the fast path
	// allocates nothing. A queue's row is made on first use by that
	// queue's goroutine, the only one serving its tags.
	ios   [][]blockIO
	depth int

	// wg counts every request from Serve to Complete, so a slow-path
	// goroutine started from a completion handler is counted before the
	// request's own count is dropped. Wait returns when none is left.
	wg       sync.WaitGroup
	inflight atomic.Int64
	// zeroCopied counts READs and WRITEs of a zero-copy device whose
	// data moved between the request's pages and the socket; bounced
	// those that went through a buffer of their own (submitWait).
	zeroCopied, bounced atomic.Int64
}

// newBlockBackend returns the backend for a device of queues queues of
// depth tags each.
func newBlockBackend(lc *lifecycle.Controller, metrics *Metrics, queues, depth int) *blockBackend {
	return &blockBackend{lc: lc, metrics: metrics, ios: make([][]blockIO, queues), depth: depth, rings: newRingDrivers(nil)}
}

// blockIO is one request on its way through the fast path.
type blockIO struct {
	b      *blockBackend
	r      *ublk.Request
	ref    lifecycle.Ref
	req    nvmeof.Request
	data   requestData // r's pages as the command's Fixed data (zero copy)
	start  time.Time
	doneFn func(error) // io.done, bound once
}

// requestData is a zero-copy ublk request's pages as nvmeof.FixedData:
// moved by the ring's fixed-buffer operations (boundDriver), and copied
// in small pieces with the request's user copy.
type requestData struct{ r *ublk.Request }

func (d *requestData) Len() int                                 { return d.r.Length }
func (d *requestData) ReadAt(p []byte, off int64) (int, error)  { return d.r.ReadAt(p, off) }
func (d *requestData) WriteAt(p []byte, off int64) (int, error) { return d.r.WriteAt(p, off) }

// slot returns the state of r's tag, reset for r.
func (b *blockBackend) slot(r *ublk.Request) *blockIO {
	row := b.ios[r.Queue]
	if row == nil {
		row = make([]blockIO, b.depth)
		for i := range row {
			row[i].b = b
			row[i].doneFn = row[i].done
		}
		b.ios[r.Queue] = row
	}
	io := &row[r.Tag]
	io.r, io.ref, io.req, io.start = r, lifecycle.Ref{}, nvmeof.Request{}, time.Now()
	io.data.r = r
	return io
}

func (b *blockBackend) Serve(r *ublk.Request) {
	b.wg.Add(1)
	b.inflight.Add(1)
	io := b.slot(r)
	if b.metrics != nil {
		b.metrics.IOStarted(r.Queue)
	}
	ref, ok := b.lc.TryEnter()
	if !ok {
		b.slow(io, nil)
		return
	}
	conn := ref.Conn().(*nvmeofconn.Conn)
	if err := prepare(conn.NS(), &io.req, r, r.Buf, &io.data); err != nil {
		ref.Exit()
		io.finish(err)
		return
	}
	io.ref = ref
	io.req.Defer = true // sent by Commit, with the rest of the batch
	err := conn.IOQueue(r.Queue).Submit(&io.req, io.doneFn)
	if err == nil {
		if io.req.Fixed != nil {
			b.zeroCopied.Add(1)
		}
		return
	}
	// Not started: the queue failed under us (a path error: retry on
	// the next association) or has no free slot (Do waits for one).
	ref.Exit()
	if nvmeof.IsPathError(err) {
		b.slow(io, err)
		return
	}
	// ErrQueueFull, or Fixed data the queue cannot move
	// (ErrFixedNotDriven: an association whose queues the rings do not
	// drive; ErrFixedDigest: a recovered zero-copy device, data digests
	// on): the slow path copies.
	b.slow(io, nil)
}

// Commit sends the commands Serve started for a batch of ublk queue i's
// requests, in one write if no one else is writing.
func (b *blockBackend) Commit(i int) {
	ref, ok := b.lc.TryEnter()
	if !ok {
		// The association is going: its Shutdown fails what Serve
		// left queued on it, and they are retried on the next.
		return
	}
	ref.Conn().(*nvmeofconn.Conn).IOQueue(i).Push()
	ref.Exit()
}

// done is the command's completion handler, on the thread that drives the
// NVMe queue (the ublk queue ring's, or the queue's reader goroutine). It
// must not block.
func (io *blockIO) done(err error) {
	io.ref.Exit() // the last touch of the association was the queue's, before this call
	if err != nil && (nvmeofconn.IsPathError(err) || lifecycle.RetryableStatus(err)) {
		// Retried by lifecycle: on the next association (a path error,
		// or the namespace no longer active: nvmeofconn.IsPathError),
		// or on this one after the status's Command Retry Delay.
		io.b.slow(io, err)
		return
	}
	io.finish(err)
}

// slow serves the request on a goroutine through lifecycle: with Do, or, if
// pathErr is set (it failed on io.ref's association with a path error or a
// status without DNR), with Retry.
func (b *blockBackend) slow(io *blockIO, pathErr error) {
	b.wg.Add(1) // before the request's own count can drop
	go func() {
		defer b.wg.Done()
		// No deadline of our own: each command has the queue's command
		// timeout, and held I/O ends with the controller
		// (fast_io_fail_tmo, ctrl_loss_tmo, delete).
		fn := func(c lifecycle.Conn) error { return b.submitWait(c.(*nvmeofconn.Conn), io.r) }
		var err error
		if pathErr != nil {
			err = b.lc.Retry(context.Background(), io.ref, pathErr, fn)
		} else {
			err = b.lc.Do(context.Background(), fn)
		}
		io.finish(err)
	}()
}

// submitWait runs the request on conn and waits for it. A zero-copy
// request's data goes through a buffer of its own here, copied with the
// request's user copy: any queue can then carry it, driven or not,
// digests or not.
func (b *blockBackend) submitWait(conn *nvmeofconn.Conn, r *ublk.Request) error {
	buf := r.Buf
	if r.ZeroCopy() {
		b.bounced.Add(1)
		buf = make([]byte, r.Length)
		if r.Op == ublk.OpWrite {
			if _, err := r.ReadAt(buf, 0); err != nil {
				return err
			}
		}
	}
	var req nvmeof.Request
	if err := prepare(conn.NS(), &req, r, buf, nil); err != nil {
		return err
	}
	if err := conn.IOQueue(r.Queue).Do(context.Background(), &req); err != nil {
		return err
	}
	if r.ZeroCopy() && r.Op == ublk.OpRead {
		if _, err := r.WriteAt(buf, 0); err != nil {
			return err
		}
	}
	return nil
}

// finish completes the ublk request: its last step.
func (io *blockIO) finish(err error) {
	b, r := io.b, io.r
	if b.metrics != nil {
		b.metrics.IODone(r.Queue, r.Op.String(), r.Length, time.Since(io.start), err)
	}
	b.inflight.Add(-1)
	r.Complete(blockError(err))
	b.wg.Done()
}

// prepare builds the NVMe command for a ublk request: its data in buf,
// or, for a zero-copy request when fixed is set, in its pages.
func prepare(ns *nvmeof.Namespace, req *nvmeof.Request, r *ublk.Request, buf []byte, fixed nvmeof.FixedData) error {
	shift := ns.BlockShift
	if r.Offset&(int64(ns.BlockSize())-1) != 0 || r.Length&(ns.BlockSize()-1) != 0 {
		return syscall.EINVAL // the kernel honours the logical block size we set
	}
	lba := uint64(r.Offset) >> shift
	switch r.Op {
	case ublk.OpRead:
		if fixed != nil && r.ZeroCopy() {
			return ns.PrepareReadFixed(req, lba, fixed)
		}
		return ns.PrepareRead(req, lba, buf)
	case ublk.OpWrite:
		if fixed != nil && r.ZeroCopy() {
			return ns.PrepareWriteFixed(req, lba, fixed, r.FUA())
		}
		return ns.PrepareWrite(req, lba, buf, r.FUA())
	case ublk.OpFlush:
		ns.PrepareFlush(req)
		return nil
	case ublk.OpWriteZeroes:
		return ns.PrepareWriteZeroes(req, lba, uint32(r.Length>>shift), r.Flags&ublk.FlagNoUnmap == 0)
	case ublk.OpDiscard:
		return ns.PrepareDeallocate(req, []nvme.DSMRange{{SLBA: lba, NLB: uint32(r.Length >> shift)}})
	}
	return syscall.EOPNOTSUPP
}

// blockError maps an NVMe or lifecycle error to the errno the block layer
// gets, as the Linux host's nvme_error_status does for the common cases.
func blockError(err error) error {
	if err == nil {
		return nil
	}
	if nvmeof.IsPathError(err) {
		// Not the socket's errno (ECONNRESET, EPIPE): the block layer
		// and the application see an I/O error.
		return syscall.EIO
	}
	// The status first: after its retries lifecycle returns the last
	// status wrapped with ErrRetriesExhausted, which wraps EIO.
	var st nvme.Status
	if errors.As(err, &st) {
		switch st.Code() {
		case nvme.NVME_SC_INVALID_OPCODE, nvme.NVME_SC_INVALID_FIELD, nvme.NVME_SC_INVALID_NS:
			return syscall.EOPNOTSUPP
		case nvme.NVME_SC_LBA_RANGE, nvme.NVME_SC_CAP_EXCEEDED:
			return syscall.ENOSPC
		}
	}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno
	}
	return syscall.EIO
}
