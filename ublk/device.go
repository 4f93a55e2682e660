package ublk

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Device is a ublk device served by this process.
type Device struct {
	ctrl   *Control
	info   DeviceInfo
	params Params
	log    *slog.Logger

	cdev   int // /dev/ublkcN
	queues []*queue
	wg     sync.WaitGroup // the queue goroutines
	errs   []error        // per queue loop result, written before wg.Done
	done   chan struct{}  // closed when every queue loop returned

	// sizeMu orders Resize against Stop (resize.go); it guards size,
	// the device's size in bytes, and stopping.
	sizeMu   sync.Mutex
	size     uint64
	stopping bool

	// endMu orders Handoff against Stop and Close (handoff.go): the one
	// that begins first owns the device's end. stopBegun: Stop or Close
	// was called; handoff: non-nil once Handoff began, closed when it
	// returned.
	endMu     sync.Mutex
	stopBegun bool
	handoff   chan struct{}

	stopOnce  sync.Once
	stopErr   error
	closeOnce sync.Once
	closeErr  error
}

// Create adds a device, configures it, starts one serving goroutine per
// queue and starts the device; when it returns nil, /dev/ublkbN exists (or
// is being created by devtmpfs) and I/O flows to b. On error nothing is
// left behind: no device, fd, mapping or goroutine.
//
// ctx bounds the kernel calls (ADD_DEV ... START_DEV); without a deadline
// each gets DefaultCommandTimeout.
func (c *Control) Create(ctx context.Context, o Options, b Backend) (*Device, error) {
	o, err := o.normalize()
	if err != nil {
		return nil, err
	}
	if b == nil {
		return nil, errors.New("ublk: nil Backend")
	}
	if o.ZeroCopy {
		if _, _, err := ringBackendOf(b, FeatureAutoBufReg); err != nil {
			return nil, err
		}
	}
	info, err := c.addDev(ctx, o)
	if err != nil {
		return nil, err
	}
	d := &Device{ctrl: c, info: info, params: o.Params, cdev: -1, log: c.logger().With("ublk", info.ID)}
	undo := func(err error) (*Device, error) {
		// Best effort with a fresh budget: the caller's ctx may be what
		// ran out.
		cctx, cancel := context.WithTimeout(context.Background(), DefaultCommandTimeout)
		defer cancel()
		d.abort(cctx)
		return nil, err
	}
	// The kernel may have lowered the buffer size (it rounds to pages).
	d.params.MaxIOBytes = min(d.params.MaxIOBytes, info.MaxIOBytes)
	d.size = d.params.Size
	if err := c.setParams(ctx, info.ID, &d.params); err != nil {
		return undo(err)
	}
	if err := d.startQueues(ctx, b); err != nil {
		return undo(err)
	}
	if err := c.startDev(ctx, info.ID); err != nil {
		return undo(err)
	}
	d.info.State = StateLive
	d.info.DaemonPID = os.Getpid()
	waitNode(ctx, d.info.BlockDevice())
	return d, nil
}

// Recover takes over device id, whose daemon died, with a new backend
// (UBLK_U_CMD_START_USER_RECOVERY, a fetch of every tag by new queue
// goroutines, UBLK_U_CMD_END_USER_RECOVERY). The device must have been
// created with Recovery or RecoveryReissue. START_USER_RECOVERY is retried
// while the driver still tears down the dead daemon (EBUSY) until ctx ends.
func (c *Control) Recover(ctx context.Context, id int, b Backend) (*Device, error) {
	if b == nil {
		return nil, errors.New("ublk: nil Backend")
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultCommandTimeout)
		defer cancel()
	}
	info, err := c.DeviceInfo(ctx, id)
	if err != nil {
		return nil, err
	}
	if !info.Flags.Has(FeatureUserRecovery) {
		return nil, fmt.Errorf("ublk: device %d was not created with USER_RECOVERY: it cannot be recovered", id)
	}
	params, err := c.Params(ctx, id)
	if err != nil {
		return nil, err
	}
	var busy error
	for {
		err = c.startUserRecovery(ctx, id)
		if errors.Is(err, unix.EBUSY) {
			busy = err
		} else if err != nil && busy != nil && ctx.Err() != nil {
			// The deadline struck during a retry: the device was
			// busy all along, which is the useful part.
			err = busy
		} else {
			break
		}
		// The old daemon's /dev/ublkcN is still open or the queue is
		// not quiesced yet: both finish asynchronously after it died.
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w (device %d still busy: is its old daemon alive?)", busy, id)
		case <-time.After(50 * time.Millisecond):
		}
	}
	if err != nil {
		return nil, err
	}
	d := &Device{ctrl: c, info: info, params: params, size: params.Size, cdev: -1, log: c.logger().With("ublk", id)}
	d.params.MaxIOBytes = min(d.params.MaxIOBytes, info.MaxIOBytes)
	if err := d.startQueues(ctx, b); err != nil {
		// Leave the device for another attempt: it is still recoverable.
		d.stopQueues()
		d.closeCdev()
		return nil, err
	}
	if err := c.endUserRecovery(ctx, id); err != nil {
		d.stopQueues()
		d.closeCdev()
		return nil, err
	}
	d.info.State = StateLive
	d.info.DaemonPID = os.Getpid()
	return d, nil
}

// startQueues opens /dev/ublkcN and starts every queue goroutine; it
// returns once each has armed its fetches, or the first setup error (with
// all queues stopped and joined).
func (d *Device) startQueues(ctx context.Context, b Backend) error {
	path := d.info.CharDevice()
	for {
		// The node appears asynchronously after ADD_DEV (devtmpfs).
		fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err == nil {
			d.cdev = fd
			break
		}
		if !errors.Is(err, unix.ENOENT) {
			return &os.PathError{Op: "open", Path: path, Err: err}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("ublk: %s did not appear: %w", path, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
	encode := d.ctrl.encode
	rb, zeroCopy, err := ringBackendOf(b, d.info.Flags)
	if err != nil {
		return err
	}
	if err := checkBatchFlags(d.info.Flags); err != nil {
		return fmt.Errorf("ublk: device %d: %w", d.info.ID, err)
	}
	n := d.info.Queues
	d.queues = make([]*queue, n)
	d.errs = make([]error, n)
	d.done = make(chan struct{})
	ready := make(chan error, n)
	cpus := make([]*unix.CPUSet, n)
	for i := range n {
		// Best effort: without it the queue threads run anywhere.
		if set, err := d.ctrl.QueueAffinity(ctx, d.info.ID, i); err == nil {
			cpus[i] = &set
		} else {
			d.log.Debug("ublk: GET_QUEUE_AFFINITY", "queue", i, "err", err)
		}
	}
	for i := range n {
		q := newQueue(i, d.info.Depth, int(d.params.MaxIOBytes), d.cdev, encode, b, d.log)
		q.ringBackend, q.zeroCopy = rb, zeroCopy
		q.userCopy = d.info.Flags.Has(FeatureUserCopy)
		q.batch = d.info.Flags.Has(FeatureBatchIO)
		d.queues[i] = q
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			d.errs[i] = q.run(ready, cpus[i])
			if err := d.errs[i]; err != nil && !errors.Is(err, errForced) {
				// This queue's requests can no longer be served:
				// end the others too, so that Done and Err tell
				// the device's owner, rather than serve some
				// requests and leave the rest waiting.
				for _, other := range d.queues {
					other.forceStop()
				}
			}
		}()
	}
	go func() {
		// Owned by the Device: it ends when the last queue goroutine
		// did, and every path that starts queues waits for d.done.
		d.wg.Wait()
		close(d.done)
	}()
	var errs []error
	for range n {
		if err := <-ready; err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		d.stopQueues()
		return errors.Join(errs...)
	}
	return nil
}

// stopQueues forces every queue loop out and waits for them.
func (d *Device) stopQueues() {
	for _, q := range d.queues {
		q.forceStop()
	}
	if d.done != nil {
		<-d.done
	}
}

func (d *Device) closeCdev() {
	if d.cdev >= 0 {
		unix.Close(d.cdev)
		d.cdev = -1
	}
}

// abort undoes a Create that failed after ADD_DEV.
func (d *Device) abort(ctx context.Context) {
	d.stopQueues()
	d.closeCdev()
	// STOP_DEV is needed if START_DEV got through; harmless otherwise.
	if err := d.ctrl.stopDev(ctx, d.info.ID); err != nil && !errors.Is(err, unix.ENODEV) {
		d.log.Warn("ublk: stop after failed create", "err", err)
	}
	if err := d.ctrl.delDev(ctx, d.info.ID); err != nil {
		d.log.Error("ublk: delete after failed create", "err", err)
	}
}

// waitNode polls briefly for a device node that devtmpfs creates
// asynchronously; its absence is not an error (udev-less /dev, or slow).
func waitNode(ctx context.Context, path string) {
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		if _, err := os.Stat(path); err == nil {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// ID is the device number N.
func (d *Device) ID() int { return d.info.ID }

// Info is the device as created (or found at recovery).
func (d *Device) Info() DeviceInfo { return d.info }

// Params are the device's parameters, with its size as Resize last set it.
func (d *Device) Params() Params {
	p := d.params
	p.Size = d.Size()
	return p
}

// BlockDevice is the block node, /dev/ublkbN.
func (d *Device) BlockDevice() string { return d.info.BlockDevice() }

// Done is closed when every queue stopped serving: after Close, or when
// the device was stopped by someone else.
func (d *Device) Done() <-chan struct{} { return d.done }

// Err returns why the queues stopped serving, after Done is closed: nil
// when they ended because the device was stopped (by Close or by someone
// else), otherwise the queues' errors.
func (d *Device) Err() error {
	select {
	case <-d.done:
	default:
		return nil
	}
	var errs []error
	for i, err := range d.errs {
		if err != nil && !errors.Is(err, errForced) {
			errs = append(errs, fmt.Errorf("queue %d: %w", i, err))
		}
	}
	return errors.Join(errs...)
}

// Stop ends serving without deleting the device: STOP_DEV while the queues
// still serve (it removes /dev/ublkbN and waits for in-flight I/O, so the
// Backend must keep completing requests until Stop returns), then the
// queue goroutines end and release their rings and mappings. If STOP_DEV
// does not return before ctx ends (or DefaultCommandTimeout without a
// deadline) the error wraps ErrTimeout and the queues are forced down, so
// nothing in this process hangs. Stop is idempotent; Close calls it.
//
// Stop lets a caller order teardown as docs/design.md does: quiesce the block
// device first, then shut the backend down, then Close to delete.
func (d *Device) Stop(ctx context.Context) error {
	if d.beginEnd() {
		return nil // handed over: no longer this process's to stop
	}
	d.stopOnce.Do(func() { d.stopErr = d.stop(ctx) })
	return d.stopErr
}

func (d *Device) stop(ctx context.Context) error {
	d.noMoreResize()
	var errs []error
	err := d.ctrl.stopDev(ctx, d.info.ID)
	if err != nil && !errors.Is(err, unix.ENODEV) {
		errs = append(errs, err)
	} else {
		// After STOP_DEV every fetch ends with -ENODEV (a batch
		// queue's: all but the one dispatching, batch.go) and the
		// loops return on their own.
		select {
		case <-d.done:
		case <-ctx.Done():
			errs = append(errs, fmt.Errorf("ublk: device %d: queues still serving after STOP_DEV: %w", d.info.ID, ctx.Err()))
		case <-time.After(DefaultCommandTimeout):
			errs = append(errs, fmt.Errorf("ublk: device %d: queues still serving %v after STOP_DEV", d.info.ID, DefaultCommandTimeout))
		}
	}
	// Force whatever still runs. A queue thread that exits also tells the
	// driver its daemon is gone, which fails the requests a stuck backend
	// holds and so unblocks a STOP_DEV still running in the kernel.
	d.stopQueues()
	if err := d.Err(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Close stops the device (see Stop) unless that was done, closes
// /dev/ublkcN and deletes the device (DEL_DEV, which waits until every
// opener of /dev/ublkbN closed it). The deadline rules are Stop's; DEL_DEV
// is attempted even when ctx has already ended, with a short budget of its
// own, because a device left behind is the worse outcome. Close is
// idempotent.
func (d *Device) Close(ctx context.Context) error {
	if d.beginEnd() {
		return nil // handed over: no longer this process's to delete
	}
	d.closeOnce.Do(func() { d.closeErr = d.close(ctx) })
	return d.closeErr
}

func (d *Device) close(ctx context.Context) error {
	var errs []error
	if err := d.Stop(ctx); err != nil {
		errs = append(errs, err)
	}
	d.closeCdev()
	dctx := ctx
	if ctx.Err() != nil {
		var cancel context.CancelFunc
		dctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
	}
	if err := d.ctrl.delDev(dctx, d.info.ID); err != nil && !errors.Is(err, unix.ENODEV) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
