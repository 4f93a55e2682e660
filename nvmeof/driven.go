package nvmeof

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/internal/pdu"
)

// This file is the driven transport: an I/O queue whose socket is driven
// by an event loop the queue does not own (a ublk queue's io_uring), with
// no goroutine of its own on the data path. The protocol engine is the
// reader's and the writer's (handlePDU, send, itemSent): the Driver only
// moves bytes.
//
// One receive lands in a per-queue buffer; complete PDUs are parsed from
// it, C2HData copied into the command's buffer. The data of a large
// C2HData PDU is received straight into the command's buffer instead
// (place), once its header is in: only the header (and data digest) goes
// through the per-queue buffer.
//
// Capsules and PDU headers are serialized into a per-queue send buffer;
// the data of a large H2CData PDU is sent from the command's buffer,
// gathered with them by one sendmsg, and the command is let go of only
// once that send is done. Capsules and H2CData are
// serialized into a per-queue send buffer and sent by one send at a time,
// resumed where a short send stopped. Both buffers are mmap'd: the kernel
// reads and writes them after the call that queued the operation returned.
//
// A command's Fixed data (zero copy: a ublk request's pages, registered in
// the ring, that this process cannot address) moves the same way with a
// FixedDriver's operations: a placed C2HData's data by RecvFixed, a large
// H2CData's by SendFixed, in order with the sends around it; the few
// bytes that are not worth an operation (small PDUs, in-capsule data, the
// start of a placed PDU's data that came in with its header) are copied
// with the Fixed data's ReadAt and WriteAt.
//
// Threads: every method with "on the Driver's thread" below runs only
// there. Submit, Shutdown and the timer may run anywhere: they queue work
// under q.mu and kick the Driver (Driver.Post). A failure shuts the socket
// down (shutdown(2), not close), so that the pending receive ends; the
// Driver's thread then cancels what it still has in flight, waits for
// those completions, completes the commands left, closes the socket and
// drops the usage reference the reader goroutine had: Wait returns only
// once nothing on the ring refers to the socket or the buffers (the seed
// rule on the ring, docs/design.md).

// Driver is the event loop that drives a queue's socket (Queue.Drive):
// ublk.QueueRing implements it. Send, Sendmsg (msg and its iovecs are
// read before the call returns; the bytes they point to until the
// completion), Recv and CancelFd queue an
// operation whose completion the Driver's owner passes to
// Queue.DriverCompletion with the same userData; they and
// DriverCompletion run on the Driver's thread. Post runs f there, from
// any goroutine, and fails once the Driver has stopped.
type Driver interface {
	Send(fd int, buf []byte, userData uint64) error
	Sendmsg(fd int, msg *unix.Msghdr, userData uint64) error
	Recv(fd int, buf []byte, userData uint64) error
	// RecvFull is Recv that completes only once buf is full, or with
	// fewer bytes at the end of the stream, on an error or when
	// cancelled (recv(2) with MSG_WAITALL): a PDU's data of known
	// length then costs one completion, not one per segment that
	// arrives.
	RecvFull(fd int, buf []byte, userData uint64) error
	CancelFd(fd int, userData uint64) error
	Post(f func()) error
}

// FixedDriver is a Driver that also moves data this process cannot
// address (Request.Fixed: a ublk request's pages registered in its ring):
// RecvFixed receives up to n bytes from fd into data from byte off on
// (READ_FIXED on the socket), SendFixed sends n bytes of data from off on
// fd (WRITE_FIXED: one copy into the socket). Like Recv and Send, each
// completes through Queue.DriverCompletion with its userData.
type FixedDriver interface {
	Driver
	RecvFixed(fd int, data FixedData, off, n int, userData uint64) error
	SendFixed(fd int, data FixedData, off, n int, userData uint64) error
}

// DriverReleaser is a Driver told when a queue it drives is released
// (DriverIdle turns true), wherever that happens: in DriverCompletion, in
// a function it ran for the queue (one that failed before its first
// operation), in StopDriving or DriverAbandoned. On the Driver's thread.
type DriverReleaser interface {
	Driver
	DriverReleased(q *Queue)
}

// DriverUserDataSpan is how many user_data values one driven queue uses:
// base, given to Drive, and the ones after it.
const DriverUserDataSpan = 4

const (
	opRecv = iota
	opSend
	opCancel
)

// errHandedOver ends the reader goroutine when Drive takes its place.
var errHandedOver = errors.New("nvmeof: queue handed over to a driver")

// ErrDriverStopped is the cause of a driven queue's failure when its
// Driver stopped (StopDriving): the ublk queue that drove it went away.
// Like ErrQueueShutdown it is not reported to OnFailure: the device is
// going, not the association.
var ErrDriverStopped = errors.New("nvmeof: the queue's driver stopped")

// placedMin is the least C2HData data received straight into its
// command's buffer: below it one copy out of the receive buffer costs
// less than the receive more it takes.
const placedMin = 16 << 10

// placedPeek bounds the receive after a placed PDU: the next PDU is
// likely another large one, whose data should land in place, so only its
// header (and the small PDUs before it) is read into the receive buffer.
const placedPeek = 512

// pduSlack bounds what one PDU adds to its data: header (at most 72
// bytes), header digest, padding to CPDA (at most 128 bytes) and data
// digest.
const pduSlack = 256

// drivenState is a driven queue's transport state. Fields but fd are
// touched on the Driver's thread only; fd is guarded by q.mu.
type drivenState struct {
	d     Driver
	fixed FixedDriver // d, when it moves Fixed data; nil otherwise
	base  uint64
	fd    int

	rbuf, sbuf     []byte // mmap'd receive and send buffers
	rstart, rend   int    // unparsed received bytes: rbuf[rstart:rend]
	sendOff, sendN int    // bytes sendOff to sendN of sbuf, or of the gathered segments, are being sent
	recvBusy       bool
	recvPlaced     bool // the receive in flight lands in placed
	sendBusy       bool
	ops            int // operations in flight on the Driver
	started        bool
	stopping       bool // cancelling: nothing new is queued on the Driver
	released       bool // socket closed, buffers freed, usage dropped

	// The C2HData PDU at rbuf[rstart:] whose placedLen data bytes are
	// received into its command's data (placedReq's, from byte
	// placedOff on) rather than rbuf: into placed, or, when placed is
	// nil, into placedReq.Fixed by RecvFixed; placedGot bytes of them so
	// far. placedLen 0: none.
	placed    []byte
	placedLen int
	placedOff int
	placedGot int
	placedReq *Request
	lastLarge bool // the last PDU parsed was a placed C2HData
	placedN   int  // PDUs placed (tests)
	peek      *pdu.Reader
	peekSrc   sliceReader
	peekH     pdu.Header

	// A gathered send: the segments of sbuf and of commands' data it
	// sends, in order, and the items whose data it references (let go
	// of once it is done).
	gathered bool
	gathers  int // gathered sends (tests)
	held     []sendItem
	iovs     []unix.Iovec
	msg      unix.Msghdr

	pend   []sendItem // taken from sendq, not yet serialized (sbuf full)
	batch  []sendItem
	src    sliceReader
	rd     *pdu.Reader
	h      pdu.Header
	hdr    []byte
	sw     sbufWriter
	pumpFn func()
}

// sliceReader reads one received PDU out of the receive buffer. Its data,
// when placed, is already where the Reader reads it to; when
// fixedPlaced, it is already in the command's Fixed data
// (fixedC2HData takes it).
type sliceReader struct {
	b, placed   []byte
	fixedPlaced bool
}

func (r *sliceReader) Read(p []byte) (int, error) {
	if len(r.placed) > 0 && len(p) == len(r.placed) && &p[0] == &r.placed[0] {
		r.placed = nil
		return len(p), nil
	}
	if len(r.b) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.b)
	r.b = r.b[n:]
	return n, nil
}

// sbufWriter appends to the send buffer; serialize checks the room first.
// Data of gatherMin bytes or more is not copied: it becomes a segment of
// its own, sent from where it is.
type sbufWriter struct {
	b        []byte
	n        int
	runStart int       // sbuf[runStart:n] is not in segs yet
	segs     []sendSeg // what to send, in order, once the run is flushed
	external int       // segments that are not sbuf's
}

// sendSeg is a piece of a gathered send: bytes in memory (sbuf's or a
// command's Data), or n bytes of a command's Fixed data from off on.
type sendSeg struct {
	b      []byte
	fixed  FixedData
	off, n int
}

func (s *sendSeg) len() int {
	if s.fixed != nil {
		return s.n
	}
	return len(s.b)
}

// fixedWriter takes Fixed data: the driven queue's sbufWriter.
type fixedWriter interface {
	writeFixed(d FixedData, off, n int) error
}

// gatherMin is the least data sent from a command's buffer rather than
// copied into the send buffer: below it the copy costs less than the
// longer system call.
const gatherMin = 16 << 10

func (w *sbufWriter) Write(p []byte) (int, error) {
	if len(p) >= gatherMin {
		w.flushRun()
		w.segs = append(w.segs, sendSeg{b: p})
		w.external++
		return len(p), nil
	}
	if len(p) > len(w.b)-w.n {
		return 0, errors.New("nvmeof: send buffer overflow")
	}
	w.n += copy(w.b[w.n:], p)
	return len(p), nil
}

// writeFixed adds n bytes of d from off on: gatherMin bytes or more as a
// segment sent by SendFixed, fewer copied into sbuf (d.ReadAt: a system
// call that copies, cheaper than an operation more on the ring).
func (w *sbufWriter) writeFixed(d FixedData, off, n int) error {
	if n >= gatherMin {
		w.flushRun()
		w.segs = append(w.segs, sendSeg{fixed: d, off: off, n: n})
		w.external++
		return nil
	}
	if n > len(w.b)-w.n {
		return errors.New("nvmeof: send buffer overflow")
	}
	if _, err := d.ReadAt(w.b[w.n:w.n+n], int64(off)); err != nil {
		return fmt.Errorf("nvmeof: copy of zero-copy data to send: %w", err)
	}
	w.n += n
	return nil
}

// flushRun ends the run of bytes copied into sbuf as a segment.
func (w *sbufWriter) flushRun() {
	if w.n > w.runStart {
		w.segs = append(w.segs, sendSeg{b: w.b[w.runStart:w.n]})
		w.runStart = w.n
	}
}

// reset empties the writer for the next batch.
func (w *sbufWriter) reset() {
	clear(w.segs)
	w.segs = w.segs[:0]
	w.n, w.runStart, w.external = 0, 0, 0
}

// size is the number of bytes written, copied or not.
func (w *sbufWriter) size() int {
	n := w.n - w.runStart
	for i := range w.segs {
		n += w.segs[i].len()
	}
	return n
}

// Drive moves an I/O queue from its reader and writer goroutines onto d:
// from then on its socket is read and written only by operations on d,
// from d's thread. The queue must be live with no command in flight
// (right after the association's Connect, before I/O is let in); the
// connection must be a socket (net.TCPConn). base is the first of the
// DriverUserDataSpan user_data values the queue's operations carry
// (a multiple of DriverUserDataSpan). On error the queue is left as it
// was (still on its goroutines) or failed; either way Wait and Close work
// as usual.
func (q *Queue) Drive(d Driver, base uint64) error {
	if q.cfg.QID == 0 {
		return errors.New("nvmeof: the admin queue stays on its goroutines")
	}
	if base%DriverUserDataSpan != 0 {
		return fmt.Errorf("nvmeof: driver user_data base %#x not a multiple of %d", base, DriverUserDataSpan)
	}
	sc, ok := q.conn.(syscall.Conn)
	if !ok {
		return fmt.Errorf("nvmeof: queue %d: a %T cannot be driven", q.cfg.QID, q.conn)
	}
	q.mu.Lock()
	switch {
	case q.state != queueLive:
		q.mu.Unlock()
		return q.err
	case q.handing.Load():
		q.mu.Unlock()
		return errors.New("nvmeof: queue already driven")
	case len(q.free) != q.cfg.Size-1 || len(q.sendq) != 0:
		q.mu.Unlock()
		return fmt.Errorf("nvmeof: queue %d: commands in flight; a queue is driven only while idle", q.cfg.QID)
	}
	q.handing.Store(true) // Submit queues from here on; nothing sends
	q.mu.Unlock()

	// The writer, and any submitter sending inline, stop sending.
	q.wakeWriterChan()
	<-q.writerOut
	q.sendMu.Lock()
	q.sendMu.Unlock()
	// The reader stops between two PDUs.
	q.conn.SetReadDeadline(time.Unix(1, 0))
	<-q.readerOut
	if !q.readerHanded {
		// The reader stopped on a failure: it fails and finishes the
		// queue itself.
		<-q.failed
		return q.Err()
	}
	if err := q.Err(); err != nil {
		q.finishHandOver()
		return err
	}
	ds, err := q.newDriven(d, base, sc)
	if err != nil {
		q.fail(err)
		q.finishHandOver()
		return err
	}
	q.mu.Lock()
	if q.state != queueLive {
		q.mu.Unlock()
		ds.free(q)
		q.finishHandOver()
		return q.Err()
	}
	if q.driverStopped {
		// The Driver stopped meanwhile: nothing would release the
		// queue once its last operations were reaped.
		q.mu.Unlock()
		q.fail(ErrDriverStopped)
		ds.free(q)
		q.finishHandOver()
		return q.Err()
	}
	q.driven.Store(ds)
	q.mu.Unlock()
	if err := d.Post(q.startDriven); err != nil {
		q.fail(fmt.Errorf("%w: %v", ErrDriverStopped, err))
		q.mu.Lock()
		q.driven.Store(nil)
		q.mu.Unlock()
		ds.free(q)
		q.finishHandOver()
		return err
	}
	return nil
}

// finishHandOver does the reader's part after a hand-over failed once
// the reader had stopped for it: Drive holds the reader's usage reference.
func (q *Queue) finishHandOver() { q.finishReader() }

// wakeWriterChan wakes the writer goroutine even in driven mode.
func (q *Queue) wakeWriterChan() {
	select {
	case q.sendWake <- struct{}{}:
	default:
	}
}

// newDriven takes the socket out of the net.Conn (a duplicate descriptor;
// the net.Conn is closed, so no netpoller touches it) and maps the
// buffers.
func (q *Queue) newDriven(d Driver, base uint64, sc syscall.Conn) (*drivenState, error) {
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil, err
	}
	fd := -1
	var dupErr error
	if err := rc.Control(func(s uintptr) { fd, dupErr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, err
	}
	if dupErr != nil {
		return nil, fmt.Errorf("nvmeof: queue %d: dup socket: %w", q.cfg.QID, dupErr)
	}
	q.conn.Close()
	ds := &drivenState{d: d, base: base, fd: fd}
	ds.fixed, _ = d.(FixedDriver)
	// One PDU of the largest data, whole, fits each buffer.
	maxPDU := q.cfg.MaxData + pduSlack
	sendSize := q.cfg.MaxData + (q.cfg.MaxData/pdu.NVME_TCP_MIN_MAXH2CDATA+2)*pduSlack
	const prot, flags = unix.PROT_READ | unix.PROT_WRITE, unix.MAP_ANON | unix.MAP_PRIVATE | unix.MAP_NORESERVE
	if ds.rbuf, err = unix.Mmap(-1, 0, maxPDU, prot, flags); err == nil {
		ds.sbuf, err = unix.Mmap(-1, 0, sendSize, prot, flags)
	}
	if err != nil {
		ds.free(q)
		return nil, fmt.Errorf("nvmeof: queue %d: map driven buffers: %w", q.cfg.QID, err)
	}
	ds.rd = pdu.NewReader(&ds.src, pdu.ControllerToHost, uint32(q.cfg.MaxData))
	ds.rd.Options = q.recvOpts
	ds.peek = pdu.NewReader(&ds.peekSrc, pdu.ControllerToHost, uint32(q.cfg.MaxData))
	ds.peek.Options = q.recvOpts
	ds.sw.b = ds.sbuf
	ds.pumpFn = q.pump
	return ds, nil
}

// free closes the socket and unmaps the buffers.
func (ds *drivenState) free(q *Queue) {
	q.mu.Lock()
	if ds.fd >= 0 {
		unix.Close(ds.fd)
		ds.fd = -1
	}
	q.mu.Unlock()
	for _, m := range []*[]byte{&ds.rbuf, &ds.sbuf} {
		if *m != nil {
			unix.Munmap(*m)
			*m = nil
		}
	}
}

// shutdownDriven shuts a driven queue's socket down so that its pending
// operations end, and kicks the Driver to finish the queue. Called by
// fail.
func (q *Queue) shutdownDriven() {
	ds := q.driven.Load()
	if ds == nil {
		return
	}
	q.mu.Lock()
	if ds.fd >= 0 {
		unix.Shutdown(ds.fd, unix.SHUT_RDWR)
	}
	q.mu.Unlock()
	q.kick()
}

// kick has the Driver's thread look at the queue: send what Submit
// queued, or finish a failed queue. At most one kick is pending.
func (q *Queue) kick() {
	ds := q.driven.Load()
	if ds == nil || !q.kicked.CompareAndSwap(false, true) {
		return
	}
	if err := ds.d.Post(ds.pumpFn); err != nil {
		q.kicked.Store(false)
	}
}

// startDriven arms the first receive and sends what is queued; on the
// Driver's thread.
func (q *Queue) startDriven() {
	ds := q.driven.Load()
	ds.started = true
	q.pump()
}

// pump sends what is queued, keeps a receive armed, and finishes a failed
// queue; on the Driver's thread.
func (q *Queue) pump() {
	q.kicked.Store(false)
	ds := q.driven.Load()
	if ds == nil || !ds.started || ds.released {
		return
	}
	if q.Err() != nil {
		q.stopDriven(ds)
		return
	}
	if !ds.recvBusy {
		placed, err := ds.postRecv()
		if err != nil {
			q.fail(err)
			q.stopDriven(ds)
			return
		}
		ds.recvBusy, ds.recvPlaced = true, placed
		ds.ops++
	}
	if !ds.sendBusy {
		q.fillSend(ds)
		if ds.sendN > 0 {
			q.sendBuffered(ds)
		}
	}
}

// postRecv queues the next receive: of the rest of a placed PDU's data
// (into placed, or into its command's Fixed data), or into the receive
// buffer's free space (at most placedPeek bytes of it after a placed
// PDU).
func (ds *drivenState) postRecv() (placed bool, err error) {
	if left := ds.placedLen - ds.placedGot; left > 0 {
		if ds.placed == nil {
			return true, ds.fixed.RecvFixed(ds.fd, ds.placedReq.Fixed, ds.placedOff+ds.placedGot, left, ds.base+opRecv)
		}
		return true, ds.d.RecvFull(ds.fd, ds.placed[ds.placedGot:], ds.base+opRecv)
	}
	buf := ds.rbuf[ds.rend:]
	if ds.lastLarge && len(buf) > placedPeek {
		buf = buf[:placedPeek]
	}
	return false, ds.d.Recv(ds.fd, buf, ds.base+opRecv)
}

// sendBuffered queues the send of what is left: sbuf[sendOff:sendN], or
// of the gathered segments from byte sendOff on.
func (q *Queue) sendBuffered(ds *drivenState) {
	var err error
	switch seg, inner := ds.segAt(ds.sendOff); {
	case !ds.gathered:
		err = ds.d.Send(ds.fd, ds.sbuf[ds.sendOff:ds.sendN], ds.base+opSend)
	case seg.fixed != nil:
		err = ds.fixed.SendFixed(ds.fd, seg.fixed, seg.off+inner, seg.n-inner, ds.base+opSend)
	default:
		err = ds.d.Sendmsg(ds.fd, ds.gatherMsg(), ds.base+opSend)
	}
	if err != nil {
		q.fail(err)
		q.stopDriven(ds)
		return
	}
	ds.sendBusy = true
	ds.ops++
}

// segAt is the gathered segment that byte off of the send is in, and
// the offset in it; nil past the end.
func (ds *drivenState) segAt(off int) (*sendSeg, int) {
	for i := range ds.sw.segs {
		seg := &ds.sw.segs[i]
		if off < seg.len() {
			return seg, off
		}
		off -= seg.len()
	}
	return nil, 0
}

// gatherMsg is the msghdr of the gathered segments' bytes from sendOff on,
// up to the first Fixed segment (SendFixed sends that).
func (ds *drivenState) gatherMsg() *unix.Msghdr {
	ds.iovs = ds.iovs[:0]
	skip := ds.sendOff
	for i := range ds.sw.segs {
		seg := &ds.sw.segs[i]
		if skip >= seg.len() {
			skip -= seg.len()
			continue
		}
		if seg.fixed != nil {
			break
		}
		b := seg.b[skip:]
		skip = 0
		v := unix.Iovec{Base: &b[0]}
		v.SetLen(len(b))
		ds.iovs = append(ds.iovs, v)
	}
	ds.msg = unix.Msghdr{Iov: &ds.iovs[0]}
	ds.msg.SetIovlen(len(ds.iovs))
	return &ds.msg
}

// itemRoom is the most bytes it serializes to.
func (q *Queue) itemRoom(it sendItem) int {
	switch {
	case it.req == nil:
		return pduSlack
	case !it.h2c:
		if it.req.inCapsule {
			return pduSlack + it.req.dataLen
		}
		return pduSlack
	default:
		return int(it.length) + (int(it.length/q.maxH2CData)+1)*pduSlack
	}
}

// fillSend serializes queued items into the (idle) send buffer while they
// fit; on the Driver's thread. The capsule and data are copied, so each
// item lets go of its request at once (itemSent).
func (q *Queue) fillSend(ds *drivenState) {
	q.mu.Lock()
	ds.batch = append(ds.batch[:0], ds.pend...)
	ds.batch = append(ds.batch, q.sendq...)
	clear(q.sendq)
	q.sendq = q.sendq[:0]
	q.mu.Unlock()
	clear(ds.pend)
	ds.pend = ds.pend[:0]
	ds.sendOff = 0
	ds.sw.reset()
	for i, it := range ds.batch {
		if ds.sw.n+q.itemRoom(it) > len(ds.sbuf) {
			ds.pend = append(ds.pend, ds.batch[i:]...)
			break
		}
		var err error
		external := ds.sw.external
		if ds.hdr, err = q.send(&ds.sw, ds.hdr[:0], it); err != nil {
			// Cannot happen: itemRoom bounds what send writes.
			q.fail(err)
			break
		}
		switch {
		case it.req != nil && ds.sw.external > external:
			ds.held = append(ds.held, it) // its data is sent from its buffer
		case it.req != nil:
			q.itemSent(it, true)
		case it.sent != nil:
			close(it.sent)
		}
	}
	clear(ds.batch)
	ds.sw.flushRun()
	ds.gathered = ds.sw.external > 0
	if ds.gathered {
		ds.gathers++
	}
	ds.sendN = ds.sw.size()
}

// DriverCompletion is the completion of an operation the queue put on its
// Driver, with the user_data it gave and the result; on the Driver's
// thread.
func (q *Queue) DriverCompletion(userData uint64, res int32) {
	ds := q.driven.Load()
	if ds == nil || ds.released {
		return
	}
	ds.ops--
	switch userData - ds.base {
	case opRecv:
		ds.recvBusy = false
		q.received(ds, res)
	case opSend:
		ds.sendBusy = false
		q.sent(ds, res)
	}
	if ds.stopping {
		q.releaseDriven(ds)
		return
	}
	q.pump()
}

// received handles a receive's result.
func (q *Queue) received(ds *drivenState, res int32) {
	if ds.stopping {
		return
	}
	switch {
	case res == 0:
		q.fail(io.ErrUnexpectedEOF)
		return
	case res < 0:
		q.fail(os.NewSyscallError("recv", unix.Errno(-res)))
		return
	case ds.recvPlaced && int(res) > ds.placedLen-ds.placedGot:
		q.fail(fmt.Errorf("nvmeof: receive of %d bytes into %d", res, ds.placedLen-ds.placedGot))
		return
	case ds.recvPlaced:
		ds.placedGot += int(res)
	case int(res) > len(ds.rbuf)-ds.rend:
		q.fail(fmt.Errorf("nvmeof: receive of %d bytes into %d", res, len(ds.rbuf)-ds.rend))
		return
	default:
		ds.rend += int(res)
	}
	if err := q.parse(ds); err != nil {
		q.driveFailed(ds, err)
	}
}

// parse runs the protocol engine on every complete PDU received, and makes
// room for the rest of a partial one.
func (q *Queue) parse(ds *drivenState) error {
	for {
		avail := ds.rend - ds.rstart
		if avail < pdu.CommonHeaderSize {
			break
		}
		ch := pdu.ParseCommonHeader(ds.rbuf[ds.rstart:])
		if _, err := ch.Check(pdu.ControllerToHost, q.recvOpts, uint32(q.cfg.MaxData)); err != nil {
			return err
		}
		plen := int(ch.PLen)
		if plen < pdu.CommonHeaderSize || plen > len(ds.rbuf) {
			return q.protocolError("PDU length %d out of range", plen)
		}
		if ds.placedLen == 0 && avail < plen && q.place(ds, ch) {
			avail = ds.rend - ds.rstart
		}
		need := plen - ds.placedLen // what of it is in rbuf
		if avail < need || ds.placedGot < ds.placedLen {
			if ds.rstart+need > len(ds.rbuf) {
				// The rest will not fit behind it: move it to the
				// front (each byte moves at most once).
				copy(ds.rbuf, ds.rbuf[ds.rstart:ds.rend])
				ds.rstart, ds.rend = 0, avail
			}
			return nil
		}
		ds.src.b, ds.src.placed = ds.rbuf[ds.rstart:ds.rstart+need], ds.placed
		ds.src.fixedPlaced = ds.placedLen > 0 && ds.placed == nil
		ds.lastLarge = ds.placedLen > 0
		ds.placed, ds.placedLen, ds.placedOff, ds.placedGot, ds.placedReq = nil, 0, 0, 0, nil
		if err := ds.rd.ReadHeader(&ds.h); err != nil {
			return err
		}
		if err := q.handlePDU(ds.rd, &ds.h); err != nil {
			return err
		}
		if len(ds.src.b) != 0 || ds.src.placed != nil || ds.src.fixedPlaced {
			return q.protocolError("%v PDU with %d bytes beyond its data", ds.h.Type, len(ds.src.b))
		}
		ds.rstart += need
	}
	if ds.rstart == ds.rend {
		ds.rstart, ds.rend = 0, 0
	} else if len(ds.rbuf)-ds.rstart < pdu.CommonHeaderSize {
		copy(ds.rbuf, ds.rbuf[ds.rstart:ds.rend])
		ds.rend -= ds.rstart
		ds.rstart = 0
	}
	return nil
}

// place starts receiving the data of the incomplete C2HData PDU at
// rbuf[rstart:] straight into its command's buffer, if it is large and its
// header is in: the data already received moves there, and what followed
// it (part of a data digest) moves down behind the header. False leaves
// the PDU to be received whole into rbuf: not a large C2HData, a header
// not yet complete, or one the usual path is to refuse (its header digest,
// or a command it does not match).
func (q *Queue) place(ds *drivenState, ch pdu.CommonHeader) bool {
	pdo := int(ch.PDO)
	if ch.Type != pdu.TypeC2HData || pdo == 0 || ds.rend-ds.rstart < pdo {
		return false
	}
	ds.peekSrc.b = ds.rbuf[ds.rstart : ds.rstart+pdo]
	err := ds.peek.ReadHeader(&ds.peekH)
	ds.peek.Reset()
	if err != nil || ds.peekH.DataLen < placedMin {
		return false
	}
	d := ds.peekH.Data
	r, err := q.c2hTarget(d)
	if err != nil {
		return false
	}
	start := ds.rstart + pdo
	var n int
	if r.Fixed != nil {
		// No data digest (Submit): the bytes after the header are
		// data (the PDU is incomplete, so fewer than DataLength).
		n = min(ds.rend-start, int(d.DataLength))
		if _, err := r.Fixed.WriteAt(ds.rbuf[start:start+n], int64(d.DataOffset)); err != nil {
			return false // received whole into rbuf; fixedC2HData fails it
		}
		ds.placed = nil
	} else {
		ds.placed = r.Data[d.DataOffset : d.DataOffset+d.DataLength]
		n = copy(ds.placed, ds.rbuf[start:ds.rend])
	}
	ds.rend = start + copy(ds.rbuf[start:], ds.rbuf[start+n:ds.rend])
	ds.placedLen, ds.placedOff, ds.placedGot, ds.placedReq = int(d.DataLength), int(d.DataOffset), n, r
	ds.placedN++
	return true
}

// fixedC2HData takes the data of a C2HData PDU for a command with Fixed
// data, after its header: already received into the command's pages
// (placed), or in the receive buffer, copied there by WriteAt (a
// system call that copies, cheaper for a few bytes than a receive more).
func (q *Queue) fixedC2HData(rd *pdu.Reader, r *Request, d pdu.DataHeader) error {
	ds := q.driven.Load()
	if ds == nil {
		return ErrFixedNotDriven // Submit let it in only on a driven queue
	}
	if err := rd.TakeData(); err != nil {
		return err
	}
	if ds.src.fixedPlaced {
		ds.src.fixedPlaced = false
		return nil
	}
	n := int(d.DataLength)
	if len(ds.src.b) < n {
		return io.ErrUnexpectedEOF // parse hands over whole PDUs
	}
	if _, err := r.Fixed.WriteAt(ds.src.b[:n], int64(d.DataOffset)); err != nil {
		return fmt.Errorf("nvmeof: copy of received data into zero-copy data: %w", err)
	}
	ds.src.b = ds.src.b[n:]
	return nil
}

// checkFixed tells whether req's Fixed data can go on this queue: driven
// by a FixedDriver, without data digests.
func (q *Queue) checkFixed(req *Request) error {
	if ds := q.driven.Load(); ds == nil || ds.fixed == nil {
		return ErrFixedNotDriven
	}
	if q.sendOpts.DataDigest || q.recvOpts.DataDigest {
		return ErrFixedDigest
	}
	return nil
}

// driveFailed fails the queue after a receive error. A protocol error is
// told to the controller first (H2CTermReq) when the socket is free for
// it, with one non-blocking write: best effort, as the reader's 50 ms.
func (q *Queue) driveFailed(ds *drivenState, err error) {
	var pe *pdu.ProtocolError
	if errors.As(err, &pe) && !ds.sendBusy {
		h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeH2CTermReq},
			Term: pdu.TermReq{FES: pe.FES, FEI: pe.FEI}}
		ds.hdr = pdu.Append(ds.hdr[:0], &h, nil, q.sendOpts)
		q.mu.Lock()
		if ds.fd >= 0 {
			unix.SendmsgN(ds.fd, ds.hdr, nil, nil, unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL)
		}
		q.mu.Unlock()
	}
	q.fail(err)
}

// sent handles a send's result: a short send is resumed where it stopped.
func (q *Queue) sent(ds *drivenState, res int32) {
	if ds.stopping {
		return
	}
	if res < 0 {
		q.fail(os.NewSyscallError("send", unix.Errno(-res)))
		return
	}
	if int(res) > ds.sendN-ds.sendOff {
		q.fail(fmt.Errorf("nvmeof: send of %d bytes reported %d", ds.sendN-ds.sendOff, res))
		return
	}
	ds.sendOff += int(res)
	if ds.sendOff < ds.sendN {
		q.sendBuffered(ds)
		return
	}
	ds.sendOff, ds.sendN = 0, 0
	q.releaseHeld(ds)
}

// releaseHeld lets go of the items whose data the finished send took
// from their commands' buffers.
func (q *Queue) releaseHeld(ds *drivenState) {
	for _, it := range ds.held {
		q.itemSent(it, true)
	}
	clear(ds.held)
	ds.held = ds.held[:0]
	ds.sw.reset()
	ds.gathered = false
}

// stopDriven starts finishing a failed queue: cancel what is in flight on
// the Driver; releaseDriven does the rest once it has all completed.
func (q *Queue) stopDriven(ds *drivenState) {
	if ds.stopping {
		return
	}
	ds.stopping = true
	if ds.ops > 0 {
		if err := ds.d.CancelFd(ds.fd, ds.base+opCancel); err == nil {
			ds.ops++
		} else {
			q.log.Error("nvme-tcp: cancel on the driver", "err", err)
		}
	}
	q.releaseDriven(ds)
}

// releaseDriven ends a stopping driven queue once no operation is in
// flight: the commands left are completed with the queue's error, the
// socket is closed, the buffers unmapped, and the reader's usage
// reference dropped.
func (q *Queue) releaseDriven(ds *drivenState) {
	if ds.released || ds.ops > 0 {
		return
	}
	ds.released = true
	ds.free(q)
	q.finishDriven(ds)
}

// finishDriven completes the commands left with the queue's error, tells
// a DriverReleaser, and drops the reader's usage reference: the end of a
// released queue.
func (q *Queue) finishDriven(ds *drivenState) {
	q.completeLeft()
	if dr, ok := ds.d.(DriverReleaser); ok {
		dr.DriverReleased(q)
	}
	q.put()
}

// StopDriving fails a driven queue because its Driver is stopping (the
// ublk queue's ring is about to close), and starts cancelling; on the
// Driver's thread. DriverIdle reports when the Driver may close. A queue
// not given to the Driver yet (attach binds it to a ring, then calls
// Drive) is marked instead: Drive fails it, and releases it, itself.
func (q *Queue) StopDriving() {
	q.mu.Lock()
	ds := q.driven.Load()
	if ds == nil {
		q.driverStopped = true
	}
	q.mu.Unlock()
	if ds == nil {
		return
	}
	q.fail(ErrDriverStopped)
	q.stopDriven(ds)
}

// DriverAbandoned releases a driven queue whose Driver closes with its
// operations still in flight (they did not complete in time after the
// cancel, or the Driver failed): the queue fails with ErrDriverStopped,
// its commands complete, its socket is closed (an operation in the
// kernel holds its own reference) and the usage reference is dropped, so
// Wait returns. The buffers, which those operations may still write, are
// leaked, never unmapped. On the Driver's thread.
func (q *Queue) DriverAbandoned() {
	ds := q.driven.Load()
	if ds == nil || ds.released {
		return
	}
	q.fail(ErrDriverStopped)
	q.log.Error("nvme-tcp queue released with operations in flight on its stopped driver; its buffers are leaked",
		"operations", ds.ops, "bytes", len(ds.rbuf)+len(ds.sbuf))
	ds.stopping, ds.released = true, true
	q.mu.Lock()
	if ds.fd >= 0 {
		unix.Close(ds.fd)
		ds.fd = -1
	}
	if ds.sendBusy {
		// Its send may still read the commands' buffers: those
		// commands are never completed, so their owner never puts other
		// data there for it to send.
		for _, it := range ds.held {
			q.forgetLocked(it.req)
		}
		if len(ds.held) > 0 {
			q.log.Error("nvme-tcp commands left uncompleted: a send from their buffers is still in flight on the stopped driver", "commands", len(ds.held))
		}
	}
	if ds.recvBusy && ds.recvPlaced {
		// Its receive may still write the command's buffer: the
		// command is never completed, so its owner never reuses or
		// frees that buffer.
		q.forgetLocked(ds.placedReq)
		q.log.Error("nvme-tcp command left uncompleted: a receive into its buffer is still in flight on the stopped driver", "cid", ds.placedReq.cid)
	}
	q.mu.Unlock()
	ds.rbuf, ds.sbuf = nil, nil
	q.finishDriven(ds)
}

// DriverIdle reports whether a driven queue has nothing in flight on its
// Driver any more (it was released); true for a queue never driven.
func (q *Queue) DriverIdle() bool {
	ds := q.driven.Load()
	return ds == nil || ds.released
}
