package attach

import (
	"errors"
	"log/slog"
	"sync"

	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle/nvmeofconn"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/ublk"
)

// The socket on the ring (docs/design.md, Data path): NVMe/TCP I/O queue i
// is driven by ublk queue i's io_uring (nvmeof.Queue.Drive with the
// queue's ublk.QueueRing as the Driver), so a response is read, matched
// and committed to ublk by the queue's own thread. blockBackend is the
// ublk.RingLifecycle; ringDrivers keeps which NVMe queues each ring
// drives.

// ringDrivers is the binding between ublk queue rings and the NVMe/TCP
// queues they drive, across associations.
type ringDrivers struct {
	log *slog.Logger

	mu    sync.Mutex
	rings []queueRing     // by ublk queue; nil until StartRing, again after StopRing
	bound [][]ringBinding // by ublk queue: the NVMe queues its ring drives
	next  uint64          // next user_data base
}

// queueRing is what ringDrivers needs of a ublk queue's ring
// (*ublk.QueueRing): the Driver of the NVMe queues it drives, and its
// index.
type queueRing interface {
	nvmeof.Driver
	Queue() int
}

// ringBinding is one NVMe queue on a ring, with the user_data its
// operations carry.
type ringBinding struct {
	q    *nvmeof.Queue
	base uint64
}

// ringOpsPerQueue bounds a driven NVMe queue's operations in flight (a
// receive, a send, a cancel); a ring drives at most a few at once (one
// association's queue, the previous one's while it is released).
const ringOpsPerQueue = 3

func newRingDrivers(log *slog.Logger) *ringDrivers {
	if log == nil {
		log = slog.Default()
	}
	return &ringDrivers{log: log}
}

// setQueues sizes the tables for a device of n queues; before any ring
// starts.
func (d *ringDrivers) setQueues(n int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.rings = make([]queueRing, n)
	d.bound = make([][]ringBinding, n)
}

// started records a ring and drives the current association's I/O queue
// of the same index, if there is one; on the ring's goroutine, before it
// serves requests (the queue is idle: nothing was sent on it yet).
func (d *ringDrivers) started(qr queueRing, conn *nvmeofconn.Conn) {
	d.mu.Lock()
	if qr.Queue() >= len(d.rings) {
		d.mu.Unlock()
		return
	}
	d.rings[qr.Queue()] = qr
	d.mu.Unlock()
	if conn == nil {
		return
	}
	if qs := conn.Controller().IOQueues(); qr.Queue() < len(qs) && !d.shared(len(qs)) {
		if err := d.drive(qr.Queue(), qs[qr.Queue()].Queue); err != nil {
			// It stays on its goroutines, or failed: recovery.
			d.log.Warn("nvme-tcp queue not driven by the ublk ring", "queue", qr.Queue(), "err", err)
		}
	}
}

// driveAssociation hands an association's I/O queues to the rings
// (nvmeofconn.Connector.IOQueuesConnected): queue i to ring i, while the
// device's rings run.
func (d *ringDrivers) driveAssociation(ctrl *nvmeof.Controller) error {
	if d.shared(len(ctrl.IOQueues())) {
		d.log.Info("nvme-tcp I/O queues stay on their goroutines: fewer than the ublk queues, which share them",
			"nvme_queues", len(ctrl.IOQueues()))
		return nil
	}
	for i, q := range ctrl.IOQueues() {
		if err := d.drive(i, q.Queue); err != nil {
			return err
		}
	}
	return nil
}

// shared reports whether an association of n I/O queues has ublk queues
// share one (nvmeofconn.Conn.IOQueue: round robin). Such an association
// is not driven by the rings: a ring that stops fails the queue it drives
// (ErrDriverStopped) under the other ublk queues' commands, which then
// fail as on a broken path and reset the association.
func (d *ringDrivers) shared(n int) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return n < len(d.rings)
}

// drive binds q to ring i, if it runs.
func (d *ringDrivers) drive(i int, q *nvmeof.Queue) error {
	d.mu.Lock()
	if i >= len(d.rings) || d.rings[i] == nil {
		d.mu.Unlock()
		return nil
	}
	qr := d.rings[i]
	b := ringBinding{q: q, base: d.next}
	d.next += nvmeof.DriverUserDataSpan
	d.bound[i] = append(d.bound[i], b)
	d.mu.Unlock()
	if err := q.Drive(&boundDriver{queueRing: qr, d: d, i: i}, b.base); err != nil {
		d.unbind(i, q)
		return err
	}
	return nil
}

// boundDriver is ring i as the Driver of a queue bound to it (q). q may be released outside
// DriverCompletion (failed before the ring ran its start, or its receive
// could not be queued: released inside a posted function with nothing on
// the ring): it is unbound then too, or it would stay bound until the ring
// stops, scanned by every completion.
type boundDriver struct {
	queueRing
	d *ringDrivers
	i int
}

// fixedRing is the ring's side of zero copy (*ublk.QueueRing): fixed-buffer
// operations on a request's registered pages.
type fixedRing interface {
	ReadInto(req *ublk.Request, off, n int, fd int, fileOff int64, userData uint64) error
	WriteFrom(req *ublk.Request, off, n int, fd int, fileOff int64, userData uint64) error
}

var errNoFixedRing = errors.New("attach: zero-copy data on a ring without fixed-buffer operations")

// RecvFixed is nvmeof.FixedDriver's: READ_FIXED from the socket into the
// request's registered pages.
func (b *boundDriver) RecvFixed(fd int, data nvmeof.FixedData, off, n int, userData uint64) error {
	fr, r, err := b.fixed(data)
	if err != nil {
		return err
	}
	return fr.ReadInto(r, off, n, fd, 0, userData)
}

// SendFixed is nvmeof.FixedDriver's: WRITE_FIXED from the request's
// registered pages to the socket (one copy, into the socket).
func (b *boundDriver) SendFixed(fd int, data nvmeof.FixedData, off, n int, userData uint64) error {
	fr, r, err := b.fixed(data)
	if err != nil {
		return err
	}
	return fr.WriteFrom(r, off, n, fd, 0, userData)
}

// fixed is the ring's fixed-buffer side and the ublk request data names.
func (b *boundDriver) fixed(data nvmeof.FixedData) (fixedRing, *ublk.Request, error) {
	fr, ok := b.queueRing.(fixedRing)
	d, isReq := data.(*requestData)
	if !ok || !isReq {
		return nil, nil, errNoFixedRing
	}
	return fr, d.r, nil
}

// ServesZeroCopy is ublk.ZeroCopyBackend's: a zero-copy request's data
// moves by the rings that drive the NVMe queues, or through a buffer of
// its own on the slow path (submitWait).
func (b *blockBackend) ServesZeroCopy() bool { return true }

// DriverReleased is nvmeof.DriverReleaser's; on the ring's goroutine.
func (b *boundDriver) DriverReleased(q *nvmeof.Queue) { b.d.unbind(b.i, q) }

func (d *ringDrivers) unbind(i int, q *nvmeof.Queue) {
	d.mu.Lock()
	defer d.mu.Unlock()
	kept := d.bound[i][:0]
	for _, b := range d.bound[i] {
		if b.q != q {
			kept = append(kept, b)
		}
	}
	clear(d.bound[i][len(kept):])
	d.bound[i] = kept
}

// completion routes a completion on ring i to the NVMe queue whose
// operation it is; a queue released by it is unbound. On the ring's
// goroutine.
func (d *ringDrivers) completion(i int, userData uint64, res int32) {
	base := userData - userData%nvmeof.DriverUserDataSpan
	d.mu.Lock()
	var q *nvmeof.Queue
	if i < len(d.bound) {
		for _, b := range d.bound[i] {
			if b.base == base {
				q = b.q
				break
			}
		}
	}
	d.mu.Unlock()
	if q == nil {
		return
	}
	q.DriverCompletion(userData, res)
	if q.DriverIdle() {
		d.unbind(i, q)
	}
}

// stop fails every NVMe queue ring i drives: the ring is closing. On the
// ring's goroutine.
func (d *ringDrivers) stop(i int) {
	d.mu.Lock()
	if i < len(d.rings) {
		d.rings[i] = nil
	}
	var qs []*nvmeof.Queue
	if i < len(d.bound) {
		for _, b := range d.bound[i] {
			qs = append(qs, b.q)
		}
	}
	d.mu.Unlock()
	for _, q := range qs {
		q.StopDriving()
		if q.DriverIdle() {
			d.unbind(i, q)
		}
	}
}

// abandoned lets go of the NVMe queues ring i still drives: it closes
// with their operations in flight. On the ring's goroutine.
func (d *ringDrivers) abandoned(i int) {
	d.mu.Lock()
	var qs []*nvmeof.Queue
	if i < len(d.bound) {
		for _, b := range d.bound[i] {
			qs = append(qs, b.q)
		}
	}
	d.mu.Unlock()
	for _, q := range qs {
		q.DriverAbandoned()
		d.unbind(i, q)
	}
}

// idle reports whether ring i drives nothing any more.
func (d *ringDrivers) idle(i int) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return i >= len(d.bound) || len(d.bound[i]) == 0
}

// blockBackend as a ublk.RingLifecycle.

func (b *blockBackend) RingEntries() int { return 2 * ringOpsPerQueue }

func (b *blockBackend) StartRing(qr *ublk.QueueRing) {
	var conn *nvmeofconn.Conn
	ref, ok := b.lc.TryEnter()
	if ok {
		conn = ref.Conn().(*nvmeofconn.Conn)
		defer ref.Exit()
	}
	b.rings.started(qr, conn)
}

func (b *blockBackend) RingCompletion(qr *ublk.QueueRing, c ublk.RingCQE) {
	b.rings.completion(qr.Queue(), c.UserData, c.Res)
}

func (b *blockBackend) StopRing(qr *ublk.QueueRing) { b.rings.stop(qr.Queue()) }

func (b *blockBackend) RingIdle(qr *ublk.QueueRing) bool { return b.rings.idle(qr.Queue()) }

func (b *blockBackend) RingAbandoned(qr *ublk.QueueRing) { b.rings.abandoned(qr.Queue()) }

var _ ublk.RingLifecycle = (*blockBackend)(nil)
