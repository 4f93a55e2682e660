package nvmeof

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/internal/pdu"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// This file is the transport: one NVMe/TCP queue on one TCP connection
// (drivers/nvme/host/tcp.c).
//
// Goroutines: a queue owns three, started by newQueue and joined before
// Wait returns:
//   - the reader reads every PDU from the controller, completes commands
//     and, when the queue has failed, completes what is left in flight;
//   - the writer sends what submitters could not send themselves, and
//     the H2CData answering R2Ts, so that the reader never blocks on the
//     socket (it must not: the controller may be blocked writing to us).
//     A submitter sends its capsule itself when no one else is sending
//     (as the Linux host's nvme_tcp_queue_request does when it gets the
//     send mutex): one goroutine hand-off less per command;
//   - the timer fails the queue when a command outlives its deadline.
//
// Usage references (docs/design.md, rule 1): q.usage counts everything
// that may still touch the queue: each goroutine above, each Submit call
// in progress, and each accepted command until its done callback has
// returned. A reference is dropped only after the last touch. Wait returns
// when the count is zero after the queue stopped being live; no new
// reference can be taken then, so nothing touches the queue any more.

// NoTimeout as Request.Timeout exempts a command from the queue's timeout
// (Asynchronous Event Requests).
const NoTimeout time.Duration = -1

var (
	// ErrQueueShutdown is the cause of a queue failure requested with
	// Shutdown.
	ErrQueueShutdown = errors.New("nvmeof: queue shut down")
	// ErrCommandTimeout is the cause when a command outlived its timeout.
	ErrCommandTimeout = errors.New("nvmeof: command timed out")
	// ErrQueueFull is returned by Submit when every command identifier of
	// the queue is in use.
	ErrQueueFull = errors.New("nvmeof: queue full")
)

// QueueError is how commands fail when their queue failed, and what
// Queue.Err returns: the queue ID and the cause (a network error,
// *pdu.ProtocolError, *TermReqError, ErrCommandTimeout, ErrQueueShutdown).
// It is a path error: the command may succeed on another association.
type QueueError struct {
	QID uint16
	Err error
}

func (e *QueueError) Error() string { return fmt.Sprintf("nvmeof: queue %d: %v", e.QID, e.Err) }
func (e *QueueError) Unwrap() error { return e.Err }

// IsPathError reports whether err is a path error: the command failed
// because its queue failed (a *QueueError: retry it on a new association),
// or the controller completed it with a Path Related Status (SCT 3,
// nvme_is_path_error) without DNR: the path is at fault, the association
// works, and the command may succeed if retried (as the Linux host's
// nvme_retry_req does). A status of another type, or with DNR, is not a
// path error. lifecycle tells the two kinds apart by the status.
func IsPathError(err error) bool {
	var qe *QueueError
	if errors.As(err, &qe) {
		return true
	}
	var st nvme.Status
	return errors.As(err, &st) && st.PathRelated() && !st.DNR()
}

// TermReqError is a C2HTermReq received from the controller.
type TermReqError struct {
	FES uint16
	FEI uint32
}

func (e *TermReqError) Error() string {
	return fmt.Sprintf("controller terminated the connection (C2HTermReq fes %#x fei %d)", e.FES, e.FEI)
}

// Traffic counts commands for traffic-based keep-alive; it implements
// keepalive.Traffic. One Traffic is shared by all queues of a controller.
type Traffic struct {
	submitted atomic.Uint64
	// completedTo is one more than the highest sequence number completed.
	completedTo atomic.Uint64
}

// Submitted is the sequence number the next submitted command will get.
func (t *Traffic) Submitted() uint64 { return t.submitted.Load() }

// CompletedSince reports whether a command submitted at or after mark has
// completed.
func (t *Traffic) CompletedSince(mark uint64) bool { return t.completedTo.Load() > mark }

func (t *Traffic) completed(seq uint64) {
	for {
		cur := t.completedTo.Load()
		if cur > seq || t.completedTo.CompareAndSwap(cur, seq+1) {
			return
		}
	}
}

// QueueConfig configures one queue.
type QueueConfig struct {
	// QID is 0 for the admin queue.
	QID uint16
	// Size is the number of queue entries (queue_size): Connect's SQSIZE
	// is Size-1, 0's based, and at most Size-1 commands are outstanding,
	// as with the Linux host (its tag depth is ctrl->sqsize; a queue of N
	// entries holds N-1 commands). 2..4096.
	Size int
	// HeaderDigest and DataDigest are requested in ICReq; the controller
	// must agree or the connection fails (as with the Linux host).
	HeaderDigest, DataDigest bool
	// Timeout is the default per-command timeout (Linux: 30 s for I/O,
	// 60 s for admin). Zero means 30 s.
	Timeout time.Duration
	// MaxData bounds the data of one command, and so of any C2HData PDU.
	// Zero means 1 MiB.
	MaxData int
	// OnFailure, if set, is called once when the queue fails for any
	// reason but Shutdown: a socket error, a protocol error, a C2HTermReq,
	// a command timeout. It runs on a queue goroutine and must not block.
	OnFailure func(q *Queue, err error)
	// Traffic, if set, counts submissions and completions.
	Traffic *Traffic
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// FixedData is a command's data held outside this process's memory
// (Request.Fixed). A driven queue moves large pieces of it with its
// Driver's fixed-buffer operations (FixedDriver) and copies small ones
// with ReadAt (a write command's data) and WriteAt (a read command's).
type FixedData interface {
	io.ReaderAt
	io.WriterAt
	Len() int
}

// Errors of a command with Fixed data on a queue that cannot move it.
var (
	ErrFixedNotDriven = errors.New("nvmeof: zero-copy data (Request.Fixed) needs a queue driven by a FixedDriver")
	ErrFixedDigest    = errors.New("nvmeof: zero-copy data (Request.Fixed) cannot carry data digests")
)

// Request is one command. The queue owns it from Submit until its done
// callback returns; only then may the caller reuse Cmd or Data.
type Request struct {
	// Cmd is the submission queue entry. The queue sets the command ID
	// and the SGL data descriptor.
	Cmd nvme.Command
	// Data is the data buffer: sent to the controller when Write is set,
	// filled from it otherwise. Its length is the transfer length.
	Data  []byte
	Write bool
	// Fixed, instead of Data, is data this process cannot address: a
	// ublk request's pages in the buffer table of the ring that drives
	// the queue (zero copy). Only a queue driven by a FixedDriver takes
	// it, and only without data digests.
	Fixed FixedData
	// Timeout overrides the queue's timeout; NoTimeout disables it.
	Timeout time.Duration
	// Defer leaves the command queued for the next Push (or whoever
	// sends next, which may be sooner): a submitter starts a batch of
	// commands and then pushes them once, in one write (blk-mq's
	// bd->last and commit_rqs). A deferred command may not be sent
	// before Push is called.
	Defer bool

	// Result is CQE dwords 0 and 1, valid in the done callback.
	Result uint64
	// Status is the CQE status, valid in the done callback.
	Status nvme.Status

	done      func(error)
	dataLen   int // len(Data), or Fixed.Len()
	cid       uint16
	seq       uint64
	deadline  time.Time // zero: none
	inCapsule bool
	received  int    // C2HData bytes received
	ddgstErr  bool   // a C2HData PDU of this command failed its data digest
	r2tNext   uint32 // next offset an R2T may ask for
	r2tActive bool   // an R2T's data is still being sent (MAXR2T 0: at most one)
	sending   int    // writer items still referencing the request
	responded bool   // response read while the writer still sent data
	respErr   error
}

// sendItem is one unit of work for the writer: a command capsule, or the
// H2CData answering one R2T.
type sendItem struct {
	req    *Request
	h2c    bool
	ttag   uint16
	offset uint32
	length uint32
	sent   chan struct{} // H2CTermReq: closed once written
}

type queueState int

const (
	queueLive queueState = iota
	queueFailed
	queueClosed
)

// Queue is one NVMe/TCP queue: a TCP connection to the controller with its
// command identifiers and in-flight commands.
type Queue struct {
	cfg  QueueConfig
	conn net.Conn
	log  *slog.Logger

	// Negotiated by ICReq/ICResp; immutable afterwards.
	sendOpts   pdu.Options // PDA is the controller's CPDA
	recvOpts   pdu.Options
	maxH2CData uint32

	inCapsuleMax atomic.Int64 // largest in-capsule write

	// minTimeout is the shortest command timeout seen, which sets how
	// often the timer looks; timeoutShortened tells the timer it dropped.
	minTimeout       atomic.Int64
	timeoutShortened chan struct{}

	mu        sync.Mutex
	state     queueState
	err       error // *QueueError once failed
	usage     int
	idle      chan struct{} // closed when usage reaches zero after failure
	failed    chan struct{} // closed when the queue stops being live
	slots     []*Request    // in flight, by slot (command ID low bits)
	gens      []uint8       // generation of each slot, in the command ID high bits
	free      []uint16
	sendq     []sendItem
	finishq   []*Request // fully sent and responded while a submitter sent: the writer completes them
	sendWake  chan struct{}
	slotFreed chan struct{} // closed when a slot frees; made by waiters in Do
	writerOut chan struct{} // closed when the writer has exited
	timerOut  chan struct{}

	completions atomic.Uint64
	lastDone    atomic.Int64 // unix nanoseconds of the last completion

	// sendMu is held by whoever writes to the socket: the writer, or a
	// submitter sending inline. It guards bw, hdr and batch.
	sendMu sync.Mutex
	bw     *bufio.Writer
	hdr    []byte
	batch  []sendItem
	// readerInDone is set while the reader runs a done callback.
	readerInDone atomic.Bool
	// closeExpected is set once the controller may close the queue on
	// its own: an I/O queue after the shutdown notification (SPDK's
	// nvmf_tgt disconnects them then). A failure is then no failure of
	// the association: logged at Info, not reported to OnFailure.
	closeExpected atomic.Bool

	// Driven mode (driven.go): handing is set once Drive starts taking
	// the queue off its reader and writer; driven once a Driver serves
	// it. readerOut is closed when the reader goroutine has exited.
	handing   atomic.Bool
	driven    atomic.Pointer[drivenState]
	br        *bufio.Reader
	readerOut chan struct{}
	// readerHanded: the reader stopped for Drive; set before readerOut
	// is closed.
	readerHanded bool
	kicked       atomic.Bool // a pump is posted to the Driver

	// driverStopped: StopDriving came before a Driver served the queue
	// (while, or before, Drive handed it over); Drive then fails.
	// Guarded by mu.
	driverStopped bool
}

// DialQueue connects to addr ("host:port") and performs the ICReq/ICResp
// exchange. It does not send the Fabrics Connect command; Controller does.
func DialQueue(ctx context.Context, addr string, cfg QueueConfig) (*Queue, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	q, err := NewQueue(ctx, conn, cfg)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return q, nil
}

// NewQueue performs the ICReq/ICResp exchange on conn and starts the
// queue. On error conn is left open for the caller to close.
func NewQueue(ctx context.Context, conn net.Conn, cfg QueueConfig) (*Queue, error) {
	if cfg.Size <= 1 || cfg.Size > 4096 {
		return nil, fmt.Errorf("nvmeof: queue size %d out of range 2..4096", cfg.Size)
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 30 * time.Second
	}
	if cfg.MaxData == 0 {
		cfg.MaxData = 1 << 20
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	q := &Queue{
		cfg:       cfg,
		conn:      conn,
		log:       cfg.Logger.With("qid", cfg.QID),
		idle:      make(chan struct{}),
		failed:    make(chan struct{}),
		slots:     make([]*Request, cfg.Size),
		gens:      make([]uint8, cfg.Size),
		sendWake:  make(chan struct{}, 1),
		writerOut: make(chan struct{}),
		readerOut: make(chan struct{}),
		timerOut:  make(chan struct{}),

		timeoutShortened: make(chan struct{}, 1),
	}
	q.bw = bufio.NewWriterSize(conn, 64<<10)
	q.minTimeout.Store(int64(cfg.Timeout))
	// One entry stays empty: at most SQSIZE (Size-1) commands outstanding.
	for i := cfg.Size - 2; i >= 0; i-- {
		q.free = append(q.free, uint16(i))
	}
	if cfg.QID == 0 {
		q.inCapsuleMax.Store(pdu.NVME_TCP_ADMIN_CCSZ - nvme.CommandSize)
	}
	br := bufio.NewReaderSize(conn, 64<<10)
	q.br = br
	rd := pdu.NewReader(br, pdu.ControllerToHost, uint32(cfg.MaxData))
	if err := q.initConnection(ctx, rd); err != nil {
		return nil, err
	}
	// Every goroutine holds a usage reference until it has exited.
	q.usage = 3
	go q.writer()
	go q.timer()
	go q.reader(rd)
	return q, nil
}

// initConnection sends ICReq and checks ICResp (nvme_tcp_init_connection).
func (q *Queue) initConnection(ctx context.Context, rd *pdu.Reader) error {
	deadline := time.Now().Add(q.cfg.Timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	q.conn.SetDeadline(deadline)
	defer q.conn.SetDeadline(time.Time{})
	stop := context.AfterFunc(ctx, func() { q.conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	var digest uint8
	if q.cfg.HeaderDigest {
		digest |= pdu.NVME_TCP_HDR_DIGEST_ENABLE
	}
	if q.cfg.DataDigest {
		digest |= pdu.NVME_TCP_DATA_DIGEST_ENABLE
	}
	req := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeICReq},
		ICReq: pdu.ICReq{PFV: pdu.NVME_TCP_PFV_1_0, HPDA: 0, Digest: digest, MaxR2T: 0}}
	if _, err := q.conn.Write(pdu.Append(nil, &req, nil, pdu.Options{})); err != nil {
		return fmt.Errorf("nvmeof: queue %d: send ICReq: %w", q.cfg.QID, err)
	}
	var h pdu.Header
	if err := rd.ReadHeader(&h); err != nil {
		if ctx.Err() != nil {
			err = ctx.Err()
		} else if errors.Is(err, os.ErrDeadlineExceeded) {
			err = fmt.Errorf("no answer before the connect deadline: %w", err)
		}
		return fmt.Errorf("nvmeof: queue %d: receive ICResp: %w", q.cfg.QID, err)
	}
	if h.Type == pdu.TypeC2HTermReq {
		return fmt.Errorf("nvmeof: queue %d: %w", q.cfg.QID, &TermReqError{FES: h.Term.FES, FEI: h.Term.FEI})
	}
	if h.Type != pdu.TypeICResp {
		return fmt.Errorf("nvmeof: queue %d: got %v instead of ICResp", q.cfg.QID, h.Type)
	}
	r := h.ICResp
	switch {
	case r.PFV != pdu.NVME_TCP_PFV_1_0:
		return fmt.Errorf("nvmeof: queue %d: unsupported PFV %#x", q.cfg.QID, r.PFV)
	case r.Digest&(pdu.NVME_TCP_HDR_DIGEST_ENABLE|pdu.NVME_TCP_DATA_DIGEST_ENABLE) != digest:
		// Each digest bit must match what was asked; the reserved bits
		// are ignored, as Linux's nvme_tcp_init_connection does.
		return fmt.Errorf("nvmeof: queue %d: controller digests %#x, requested %#x", q.cfg.QID, r.Digest, digest)
	case r.CPDA > 31:
		return fmt.Errorf("nvmeof: queue %d: CPDA %d out of range", q.cfg.QID, r.CPDA)
	case r.MaxH2CData%4 != 0 || r.MaxH2CData < pdu.NVME_TCP_MIN_MAXH2CDATA:
		return fmt.Errorf("nvmeof: queue %d: invalid MAXH2CDATA %d", q.cfg.QID, r.MaxH2CData)
	}
	q.sendOpts = pdu.Options{HeaderDigest: q.cfg.HeaderDigest, DataDigest: q.cfg.DataDigest, PDA: r.CPDA}
	q.recvOpts = pdu.Options{HeaderDigest: q.cfg.HeaderDigest, DataDigest: q.cfg.DataDigest}
	q.maxH2CData = r.MaxH2CData
	rd.Options = q.recvOpts
	return nil
}

// QID is the queue ID.
func (q *Queue) QID() uint16 { return q.cfg.QID }

// Size is the number of queue entries; Connect's SQSIZE is Size-1.
func (q *Queue) Size() int { return q.cfg.Size }

// Depth is how many commands may be outstanding at once: Size-1.
func (q *Queue) Depth() int { return q.cfg.Size - 1 }

// MaxH2CData is the controller's MAXH2CDATA.
func (q *Queue) MaxH2CData() uint32 { return q.maxH2CData }

// SetInCapsuleSize sets how many bytes of write data may travel inside the
// command capsule: IOCCSZ*16 - 64 for I/O queues (from Identify
// Controller); the admin queue uses NVME_TCP_ADMIN_CCSZ.
func (q *Queue) SetInCapsuleSize(n int) { q.inCapsuleMax.Store(int64(max(n, 0))) }

// Failed is closed when the queue stops being live: after Shutdown or a
// failure. Err then says why.
func (q *Queue) Failed() <-chan struct{} { return q.failed }

// Err is nil while the queue is live, then a *QueueError.
func (q *Queue) Err() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.err
}

// Completions is the number of commands completed with a response.
func (q *Queue) Completions() uint64 { return q.completions.Load() }

// LastCompletion is when a command last completed with a response.
func (q *Queue) LastCompletion() time.Time {
	n := q.lastDone.Load()
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}

// get takes a usage reference if the queue is live.
func (q *Queue) get() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.state != queueLive {
		return false
	}
	q.usage++
	return true
}

// put drops a usage reference, after its holder's last touch of q.
func (q *Queue) put() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.putLocked()
}

func (q *Queue) putLocked() {
	q.usage--
	if q.usage < 0 {
		panic("nvmeof: queue usage reference dropped twice")
	}
	if q.usage == 0 && q.state != queueLive {
		close(q.idle)
	}
}

// Submit sends req; done is called exactly once with nil, an nvme.Status
// or a *QueueError, from a queue goroutine (never inside Submit) and
// without any queue lock held (so done may call Submit again). On an I/O
// queue Submit writes the command to the socket itself when no one else
// is writing, so it may block while the socket is full, at most until the
// queue fails; on the admin queue (QID 0) it never blocks. done must not block: it delays every
// other completion of the queue, and must not call Wait or Close (they
// wait for done to return). If Submit returns an error, done is not
// called.
func (q *Queue) Submit(req *Request, done func(error)) error {
	if !q.get() {
		return q.Err()
	}
	defer q.put() // the last touch of q by this call is below

	req.dataLen = len(req.Data)
	if req.Fixed != nil {
		if err := q.checkFixed(req); err != nil {
			return err
		}
		req.dataLen = req.Fixed.Len()
	}
	if req.dataLen > q.cfg.MaxData {
		return fmt.Errorf("nvmeof: %d bytes exceed the queue's %d byte transfer limit", req.dataLen, q.cfg.MaxData)
	}
	req.done = done
	req.received, req.ddgstErr, req.r2tNext, req.r2tActive = 0, false, 0, false
	req.sending, req.responded, req.respErr = 1, false, nil
	req.Result, req.Status = 0, 0
	req.inCapsule = req.Write && req.dataLen > 0 && int64(req.dataLen) <= q.inCapsuleMax.Load()
	switch {
	case req.inCapsule:
		req.Cmd.SetSGL(0, uint32(req.dataLen), nvme.SGLInCapsule)
	default:
		req.Cmd.SetSGL(0, uint32(req.dataLen), nvme.SGLTransport)
	}
	timeout := req.Timeout
	if timeout == 0 {
		timeout = q.cfg.Timeout
	}
	req.deadline = time.Time{}
	if timeout > 0 {
		req.deadline = time.Now().Add(timeout)
		for cur := q.minTimeout.Load(); int64(timeout) < cur; cur = q.minTimeout.Load() {
			if q.minTimeout.CompareAndSwap(cur, int64(timeout)) {
				select {
				case q.timeoutShortened <- struct{}{}:
				default:
				}
				break
			}
		}
	}

	q.mu.Lock()
	if q.state != queueLive {
		err := q.err
		q.mu.Unlock()
		return err
	}
	if len(q.free) == 0 {
		q.mu.Unlock()
		return ErrQueueFull
	}
	slot := q.free[len(q.free)-1]
	q.free = q.free[:len(q.free)-1]
	q.gens[slot]++
	// The generation in bits 15:12 makes a late or forged response for
	// an earlier user of the slot miss (as the Linux host's genctr).
	req.cid = slot | uint16(q.gens[slot]&0xf)<<12
	req.Cmd.SetCommandID(req.cid)
	if t := q.cfg.Traffic; t != nil {
		req.seq = t.submitted.Add(1) - 1
	}
	q.slots[slot] = req
	q.usage++ // held by the command until its done has returned
	q.sendq = append(q.sendq, sendItem{req: req})
	q.mu.Unlock()
	if !req.Defer {
		q.push()
	}
	if testHookSubmitted != nil {
		testHookSubmitted(q)
	}
	return nil
}

// testHookSubmitted, set only by tests, runs at the end of a successful
// Submit, still inside it: the command may already have completed.
var testHookSubmitted func(q *Queue)

// Do submits req and waits for its completion. If ctx ends first and req
// has no data buffer, Do returns ctx.Err() at once and the command stays
// accounted to the queue until it completes; with a data buffer Do always
// waits for the completion (bounded by the command timeout), because the
// queue may still write into or read from req.Data.
//
// When every command slot is in use, Do waits for one to free up (as a
// block layer waits for a tag); Submit returns ErrQueueFull instead.
func (q *Queue) Do(ctx context.Context, req *Request) error {
	ch := make(chan error, 1)
	for {
		err := q.Submit(req, func(err error) { ch <- err })
		if err == nil {
			break
		}
		if err != ErrQueueFull {
			return err
		}
		q.mu.Lock()
		if len(q.free) > 0 {
			q.mu.Unlock()
			continue
		}
		if q.slotFreed == nil {
			q.slotFreed = make(chan struct{})
		}
		freed := q.slotFreed
		q.mu.Unlock()
		select {
		case <-freed:
		case <-q.failed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if len(req.Data) > 0 || req.Fixed != nil {
		return <-ch
	}
	select {
	case err := <-ch:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (q *Queue) wakeWriter() {
	if q.driven.Load() != nil {
		q.kick()
		return
	}
	select {
	case q.sendWake <- struct{}{}:
	default:
	}
}

// Shutdown fails the queue: the socket is closed so the reader and writer
// stop, and every command still in flight completes with a *QueueError
// wrapping ErrQueueShutdown. It does not wait; see Wait.
func (q *Queue) Shutdown() { q.fail(ErrQueueShutdown) }

// Wait returns when the queue is no longer live and nothing touches it any
// more: its goroutines have exited, every done callback has returned and
// no Submit is in progress. Call it after Shutdown (or a failure).
func (q *Queue) Wait() { <-q.idle }

// Idle is closed when Wait would return.
func (q *Queue) Idle() <-chan struct{} { return q.idle }

// Close shuts the queue down if needed, waits for it and frees it.
func (q *Queue) Close() error {
	q.Shutdown()
	q.Wait()
	q.mu.Lock()
	defer q.mu.Unlock()
	q.state = queueClosed
	q.slots, q.gens, q.free, q.sendq = nil, nil, nil, nil
	return nil
}

// fail records the first failure and stops the queue's I/O.
func (q *Queue) fail(cause error) {
	q.mu.Lock()
	if q.state != queueLive {
		q.mu.Unlock()
		return
	}
	q.state = queueFailed
	q.err = &QueueError{QID: q.cfg.QID, Err: cause}
	close(q.failed)
	q.mu.Unlock()

	// Report before closing: the controller reacts to the closed socket
	// by failing the other queues, and the first report should be the
	// cause.
	switch {
	case errors.Is(cause, ErrQueueShutdown):
	case errors.Is(cause, ErrDriverStopped):
		// The driving ublk queue went away: the device is stopping
		// (or the daemon is), not the association.
		q.log.Info("nvme-tcp queue stopped with its driver")
	case q.closeExpected.Load():
		q.log.Info("nvme-tcp queue closed after the shutdown notification", "err", cause)
	default:
		q.log.Warn("nvme-tcp queue failed", "err", cause)
		if q.cfg.OnFailure != nil {
			q.cfg.OnFailure(q, &QueueError{QID: q.cfg.QID, Err: cause})
		}
	}
	// Closing the connection makes the reader's and writer's blocked
	// calls return. The descriptor itself is released by the runtime once
	// they have. A Driver's socket is shut down instead: its thread
	// cancels what it has in flight and closes it (driven.go).
	q.conn.Close()
	q.shutdownDriven()
	q.wakeWriter()
}

// lookup returns the in-flight request with command ID cid.
func (q *Queue) lookupLocked(cid uint16) *Request {
	slot := int(cid & 0x0fff)
	if slot >= len(q.slots) {
		return nil
	}
	r := q.slots[slot]
	if r == nil || r.cid != cid {
		return nil
	}
	return r
}

// forgetLocked takes r out of its slot and drops its usage reference
// without completing it, for good: a command whose buffer the kernel may
// still write (DriverAbandoned), so its owner must never reuse or free
// that buffer.
func (q *Queue) forgetLocked(r *Request) {
	if slot := int(r.cid & 0x0fff); slot < len(q.slots) && q.slots[slot] == r {
		q.slots[slot] = nil
		q.putLocked()
	}
}

func (q *Queue) releaseLocked(r *Request) {
	slot := r.cid & 0x0fff
	q.slots[slot] = nil
	q.free = append(q.free, slot)
	if q.slotFreed != nil {
		close(q.slotFreed)
		q.slotFreed = nil
	}
}

// complete calls the done callback of a request already removed from the
// table, then drops the request's usage reference: the callback is the
// last touch.
func (q *Queue) complete(r *Request, err error, responded bool) {
	if responded {
		q.completions.Add(1)
		q.lastDone.Store(time.Now().UnixNano())
		if t := q.cfg.Traffic; t != nil {
			t.completed(r.seq)
		}
	}
	done := r.done
	r.done = nil
	done(err)
	q.put()
}

// respond handles the end of a command: its response arrived (a
// CapsuleResp, or a C2HData with SUCCESS). If the writer still references
// the request, the writer completes it when done.
func (q *Queue) respond(r *Request, err error) {
	q.mu.Lock()
	if r.sending > 0 {
		r.responded, r.respErr = true, err
		q.mu.Unlock()
		return
	}
	q.releaseLocked(r)
	q.mu.Unlock()
	// A Submit from this done callback must not send inline: the reader
	// never blocks on the socket.
	q.readerInDone.Store(true)
	q.complete(r, err, true)
	q.readerInDone.Store(false)
}

func (q *Queue) reader(rd *pdu.Reader) {
	err := q.readLoop(rd)
	if err == errHandedOver {
		// Its usage reference is Drive's now.
		q.readerHanded = true
		close(q.readerOut)
		return
	}
	close(q.readerOut)
	q.fail(err)
	q.finishReader()
}

// finishReader is the end of the reader goroutine's work once the queue
// failed (also Drive's, when a hand-over fails after the reader stopped).
func (q *Queue) finishReader() {
	// Nothing else completes commands once the writer is gone: wait for
	// it, then complete everything still in flight.
	<-q.writerOut
	<-q.timerOut
	// A submitter sending inline may still be inside a request's data;
	// once it lets go of sendMu it sends nothing more (the queue is not
	// live).
	q.sendMu.Lock()
	q.sendMu.Unlock()
	q.completeLeft()
	q.put()
}

func (q *Queue) protocolError(format string, args ...any) error {
	return &pdu.ProtocolError{FES: pdu.NVME_TCP_FES_PDU_SEQ_ERR, Msg: fmt.Sprintf(format, args...)}
}

func (q *Queue) readLoop(rd *pdu.Reader) error {
	var h pdu.Header
	for {
		// Wait for the next PDU's first byte without consuming it: a
		// hand-over to a Driver (Drive) stops the reader here, between
		// PDUs, with nothing buffered.
		if _, err := q.br.Peek(1); err != nil {
			if q.handing.Load() && errors.Is(err, os.ErrDeadlineExceeded) && q.br.Buffered() == 0 {
				return errHandedOver
			}
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
		if err := q.readHeader(rd, &h); err != nil {
			return err
		}
		if err := q.handlePDU(rd, &h); err != nil {
			return err
		}
	}
}

// readHeader reads the next PDU header; a protocol error in it is reported
// to the controller (H2CTermReq) before the error is returned.
func (q *Queue) readHeader(rd *pdu.Reader, h *pdu.Header) error {
	if err := rd.ReadHeader(h); err != nil {
		var pe *pdu.ProtocolError
		if errors.As(err, &pe) {
			q.sendTermReq(pe)
		}
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return err
	}
	return nil
}

// handlePDU acts on one PDU from the controller whose header was read: it
// reads the PDU's data, if any, and completes, or queues the data an R2T
// asks for. It is the protocol engine of both transports: the reader
// goroutine's and a Driver's (driven.go). A non-nil error fails the queue.
func (q *Queue) handlePDU(rd *pdu.Reader, h *pdu.Header) error {
	switch h.Type {
	case pdu.TypeCapsuleResp:
		cid := h.Resp.CommandID()
		q.mu.Lock()
		r := q.lookupLocked(cid)
		if r != nil && r.responded {
			r = nil
		}
		q.mu.Unlock()
		if r == nil {
			return q.protocolError("CapsuleResp for unknown command ID %#x", cid)
		}
		if !r.Write && r.received != r.dataLen && h.Resp.Status().Code() == nvme.NVME_SC_SUCCESS {
			return q.protocolError("command %#x succeeded after %d of %d data bytes", cid, r.received, r.dataLen)
		}
		r.Result = h.Resp.Result()
		r.Status = h.Resp.Status()
		if r.ddgstErr && r.Status.Code() == nvme.NVME_SC_SUCCESS {
			r.Status = nvme.NVME_SC_DATA_XFER_ERROR
		}
		q.respond(r, r.Status.Err())

	case pdu.TypeC2HData:
		d := h.Data
		r, err := q.c2hTarget(d)
		if err != nil {
			return err
		}
		// Only the reader touches r.Data of a read command, and r
		// cannot complete while the reader is here.
		if r.Fixed != nil {
			if err := q.fixedC2HData(rd, r, d); err != nil {
				return err
			}
		} else if err := rd.ReadData(r.Data[d.DataOffset : d.DataOffset+d.DataLength]); err != nil {
			if !errors.Is(err, pdu.ErrDataDigest) {
				return err
			}
			// The PDU was read whole, so the stream is intact: fail
			// this command alone with a retryable status
			// (nvme_tcp_recv_ddgst: NVME_SC_DATA_XFER_ERROR, no DNR)
			// and go on reading.
			q.log.Warn("nvme-tcp data digest error", "cid", d.CommandID, "err", err)
			r.ddgstErr = true
		}
		r.received += int(d.DataLength)
		if h.Flags&pdu.NVME_TCP_F_DATA_SUCCESS != 0 {
			if r.received != r.dataLen {
				return q.protocolError("C2HData SUCCESS for %#x after %d of %d bytes", d.CommandID, r.received, r.dataLen)
			}
			r.Result, r.Status = 0, nvme.NVME_SC_SUCCESS
			if r.ddgstErr {
				r.Status = nvme.NVME_SC_DATA_XFER_ERROR
			}
			q.respond(r, r.Status.Err())
		}

	case pdu.TypeR2T:
		t := h.R2T
		q.mu.Lock()
		r := q.lookupLocked(t.CommandID)
		var err error
		switch {
		case r == nil || r.responded:
			err = q.protocolError("R2T for unknown command ID %#x", t.CommandID)
		case !r.Write || r.inCapsule:
			err = q.protocolError("R2T for command %#x that has no data to transfer", t.CommandID)
		case r.r2tActive:
			// ICReq said MAXR2T 0: one R2T outstanding per command
			// until its data is sent (nvme_tcp_handle_r2t).
			err = q.protocolError("R2T for %#x at %d+%d while the data of its previous R2T is still being sent (MAXR2T 0)", t.CommandID, t.Offset, t.Length)
		case t.Length == 0 || t.Offset != r.r2tNext || int64(t.Offset)+int64(t.Length) > int64(r.dataLen):
			err = &pdu.ProtocolError{FES: pdu.NVME_TCP_FES_DATA_OUT_OF_RANGE, Msg: fmt.Sprintf(
				"R2T for %#x at %d+%d, expected offset %d of %d", t.CommandID, t.Offset, t.Length, r.r2tNext, r.dataLen)}
		default:
			r.r2tNext += t.Length
			r.r2tActive = true
			r.sending++
			q.sendq = append(q.sendq, sendItem{req: r, h2c: true, ttag: t.TTag, offset: t.Offset, length: t.Length})
		}
		q.mu.Unlock()
		if err != nil {
			return err
		}
		q.wakeWriter()

	case pdu.TypeC2HTermReq:
		// The controller closes the connection after this.
		rd.DiscardData()
		return &TermReqError{FES: h.Term.FES, FEI: h.Term.FEI}

	default: // ICResp after the exchange
		return q.protocolError("unexpected %v", h.Type)
	}
	return nil
}

// sendTermReq tells the controller why we are closing the connection. It
// is best effort with a short deadline: the writer may hold the socket.
func (q *Queue) sendTermReq(pe *pdu.ProtocolError) {
	sent := make(chan struct{})
	q.mu.Lock()
	live := q.state == queueLive
	if live {
		q.sendq = append(q.sendq, sendItem{req: nil, offset: uint32(pe.FES), length: pe.FEI, sent: sent})
	}
	q.mu.Unlock()
	q.wakeWriter()
	if live {
		// Give the writer a moment to send it before the socket closes.
		t := time.NewTimer(50 * time.Millisecond)
		defer t.Stop()
		select {
		case <-sent:
		case <-t.C:
		case <-q.failed:
		}
	}
}

// Push sends the commands submitted with Defer. It may block while the
// socket is full, as Submit.
func (q *Queue) Push() {
	if !q.get() {
		return // failed: the deferred commands fail with the queue
	}
	q.push()
	q.put()
}

// push sends what is queued, on the calling goroutine, unless someone is
// already sending: then the writer is woken to send it (the one sending
// may be past the point where it looks at the queue). Never called by the
// reader.
func (q *Queue) push() {
	// The admin queue always hands over to its writer: a Keep Alive must
	// never block its sender on a full socket, because stopping the
	// keep-alive waits for that sender, before the sockets are shut
	// (docs/design.md, rule 4). Admin commands are rare; the hand-off costs
	// nothing that matters there.
	if q.handing.Load() {
		// A Driver sends (Drive): from its own thread.
		q.kick()
		return
	}
	if q.cfg.QID == 0 || q.readerInDone.Load() || !q.sendMu.TryLock() {
		q.wakeWriter()
		return
	}
	err := q.sendQueued(false)
	q.sendMu.Unlock()
	if err != nil {
		q.fail(err)
	}
}

func (q *Queue) writer() {
	defer q.put()
	defer close(q.writerOut)
	for {
		q.mu.Lock()
		for len(q.sendq) == 0 && len(q.finishq) == 0 && q.state == queueLive && !q.handing.Load() {
			q.mu.Unlock()
			<-q.sendWake
			q.mu.Lock()
		}
		if q.handing.Load() && q.state == queueLive {
			// Drive: a Driver sends from here on. Drive takes the
			// queue only while no command is in flight, so finishq
			// is empty.
			q.mu.Unlock()
			return
		}
		if q.state != queueLive {
			// The reader completes whatever is left, finishq
			// included: those requests are still in their slots.
			q.finishq = nil
			q.mu.Unlock()
			return
		}
		q.mu.Unlock()
		q.sendMu.Lock()
		err := q.sendQueued(true)
		q.sendMu.Unlock()
		if err != nil {
			q.fail(err)
			return
		}
		q.finishHandedOver()
	}
}

// sendQueued writes everything queued and flushes; sendMu held. A request
// whose response arrived while it was being sent is completed here when
// called from the writer; a submitter sending inline hands it to the
// writer instead, because done callbacks run on queue goroutines only,
// never inside Submit.
func (q *Queue) sendQueued(writer bool) error {
	for {
		q.mu.Lock()
		if len(q.sendq) == 0 || q.state != queueLive || q.handing.Load() {
			// Handing over (Drive): the Driver sends what is left.
			q.mu.Unlock()
			return q.bw.Flush()
		}
		q.batch = append(q.batch[:0], q.sendq...)
		clear(q.sendq)
		q.sendq = q.sendq[:0]
		q.mu.Unlock()

		for i, it := range q.batch {
			q.batch[i] = sendItem{}
			var err error
			q.hdr, err = q.send(q.bw, q.hdr[:0], it)
			if err != nil {
				return err
			}
			if it.req == nil {
				if err := q.bw.Flush(); err != nil {
					return err
				}
				close(it.sent)
				continue
			}
			q.itemSent(it, writer)
		}
	}
}

// itemSent drops an item's reference on its request once the item no
// longer needs it (its bytes are written, or copied into a Driver's send
// buffer). A request whose response arrived meanwhile is completed here
// when onQueueGoroutine (the writer, or a Driver's thread); a submitter
// sending inline hands it to the writer instead, because done callbacks
// run on queue goroutines only, never inside Submit.
func (q *Queue) itemSent(it sendItem, onQueueGoroutine bool) {
	q.mu.Lock()
	it.req.sending--
	finish := it.req.sending == 0 && it.req.responded
	if finish && !onQueueGoroutine {
		q.finishq = append(q.finishq, it.req)
		q.mu.Unlock()
		q.wakeWriter()
		return
	}
	if finish {
		q.releaseLocked(it.req)
	}
	q.mu.Unlock()
	if finish {
		q.complete(it.req, it.req.respErr, true)
	}
}

// finishHandedOver completes the requests submitters handed to the writer.
func (q *Queue) finishHandedOver() {
	q.mu.Lock()
	rs := q.finishq
	q.finishq = nil
	for _, r := range rs {
		q.releaseLocked(r)
	}
	q.mu.Unlock()
	for _, r := range rs {
		q.complete(r, r.respErr, true)
	}
}

// send writes one item. The request's fields it reads are not changed by
// anyone else while the item is queued (sending > 0 keeps it alive).
func (q *Queue) send(w io.Writer, hdr []byte, it sendItem) ([]byte, error) {
	o := q.sendOpts
	r := it.req
	switch {
	case r == nil: // H2CTermReq: offset holds FES, length FEI
		h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeH2CTermReq},
			Term: pdu.TermReq{FES: uint16(it.offset), FEI: it.length}}
		hdr = pdu.Append(hdr, &h, nil, o)
		_, err := w.Write(hdr)
		return hdr, err

	case !it.h2c:
		n := 0
		if r.inCapsule {
			n = r.dataLen
		}
		h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeCapsuleCmd}, Cmd: r.Cmd}
		hdr = pdu.AppendHeader(hdr, &h, n, o)
		return hdr, q.writeData(w, hdr, r, 0, n, o)

	default:
		end := it.offset + it.length
		for off := it.offset; off < end; {
			n := min(end-off, q.maxH2CData)
			h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeH2CData},
				Data: pdu.DataHeader{CommandID: r.cid, TTag: it.ttag, DataOffset: off}}
			if off+n == end {
				h.Flags = pdu.NVME_TCP_F_DATA_LAST
				// The R2T is done once this PDU's last byte is out,
				// and the controller may send the next one at once:
				// the reader must see it done before that can
				// arrive, so before the write, not after it.
				q.mu.Lock()
				r.r2tActive = false
				q.mu.Unlock()
			}
			hdr = pdu.AppendHeader(hdr[:0], &h, int(n), o)
			if err := q.writeData(w, hdr, r, int(off), int(n), o); err != nil {
				return hdr, err
			}
			off += n
		}
		return hdr, nil
	}
}

// writeData writes a PDU header and n bytes of r's data from off on.
func (q *Queue) writeData(w io.Writer, hdr []byte, r *Request, off, n int, o pdu.Options) error {
	if _, err := w.Write(hdr); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	if r.Fixed != nil {
		fw, ok := w.(fixedWriter)
		if !ok {
			return ErrFixedNotDriven // Submit let it in only on a driven queue
		}
		return fw.writeFixed(r.Fixed, off, n)
	}
	data := r.Data[off : off+n]
	if _, err := w.Write(data); err != nil {
		return err
	}
	if o.DataDigest {
		// hdr is written (a Writer keeps no slice it was given): its
		// array holds the digest; an array of its own passed to the
		// io.Writer would escape, an allocation per PDU.
		_, err := w.Write(pdu.AppendDataDigest(hdr[:0], data))
		return err
	}
	return nil
}

func (q *Queue) timer() {
	defer q.put()
	defer close(q.timerOut)
	// Check at an eighth of the shortest timeout in use, so a command
	// with a short timeout (a Keep Alive bounded by KATO on an admin queue
	// with a long default) is not late by more than that.
	period := func() time.Duration {
		return min(max(time.Duration(q.minTimeout.Load())/8, 10*time.Millisecond), time.Second)
	}
	cur := period()
	t := time.NewTicker(cur)
	defer t.Stop()
	for {
		select {
		case <-q.failed:
			return
		case <-q.timeoutShortened:
			if p := period(); p != cur {
				cur = p
				t.Reset(cur)
			}
		case now := <-t.C:
			q.mu.Lock()
			var expired *Request
			for _, r := range q.slots {
				if r != nil && !r.deadline.IsZero() && now.After(r.deadline) {
					expired = r
					break
				}
			}
			var cid uint16
			var op uint8
			if expired != nil {
				cid, op = expired.cid, expired.Cmd.Opcode()
			}
			q.mu.Unlock()
			if expired != nil {
				q.fail(fmt.Errorf("%w: command ID %#x opcode %#x", ErrCommandTimeout, cid, op))
				return
			}
		}
	}
}

// c2hTarget returns the read command a C2HData PDU's data belongs to,
// checked against what the command expects next.
func (q *Queue) c2hTarget(d pdu.DataHeader) (*Request, error) {
	q.mu.Lock()
	r := q.lookupLocked(d.CommandID)
	if r != nil && r.responded {
		r = nil
	}
	q.mu.Unlock()
	switch {
	case r == nil:
		return nil, q.protocolError("C2HData for unknown command ID %#x", d.CommandID)
	case r.Write:
		return nil, q.protocolError("C2HData for write command %#x", d.CommandID)
	case int64(d.DataOffset) != int64(r.received) || int64(d.DataOffset)+int64(d.DataLength) > int64(r.dataLen):
		return nil, &pdu.ProtocolError{FES: pdu.NVME_TCP_FES_DATA_OUT_OF_RANGE, Msg: fmt.Sprintf(
			"C2HData for %#x at %d+%d, expected offset %d of %d", d.CommandID, d.DataOffset, d.DataLength, r.received, r.dataLen)}
	}
	return r, nil
}

// completeLeft completes every command still in flight with the queue's
// error: the last step of a failed queue, once nothing can answer them.
func (q *Queue) completeLeft() {
	q.mu.Lock()
	var left []*Request
	for i, r := range q.slots {
		if r != nil {
			left = append(left, r)
			q.slots[i] = nil
		}
	}
	qerr := q.err
	q.mu.Unlock()
	for _, r := range left {
		q.complete(r, qerr, false)
	}
}
