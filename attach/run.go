package attach

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle"
	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle/linkwatch"
	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle/nvmeofconn"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/auth"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
	"github.com/ublk-nvmeof/ublk-nvmeof/ublk"
)

// Errors Run wraps, so that the CLI can give each its own exit status.
var (
	// ErrUnreachable: no TCP connection to the target.
	ErrUnreachable = errors.New("target unreachable")
	// ErrRejected: the target refused the connection (unknown NQN, host
	// not allowed): a Connect that failed with a status.
	ErrRejected = errors.New("target rejected the connection")
	// ErrNoNamespace: the namespace is not there.
	ErrNoNamespace = errors.New("namespace not found")
	// ErrControllerLost: the controller went away for longer than
	// ctrl_loss_tmo (or a reconnect found another namespace).
	ErrControllerLost = errors.New("controller lost")
	// ErrDetachedImmediately: RunConfig.Hurry made the detach immediate.
	// The device, sockets and goroutines are gone as after any detach,
	// but I/O that was in flight or held was failed with EIO instead of
	// drained.
	ErrDetachedImmediately = errors.New("detached immediately: I/O in flight or held was failed with EIO")
	// ErrHandedOver: RunConfig.Handoff left the device to the next daemon
	// (attach --recover) instead of deleting it.
	ErrHandedOver = errors.New("device handed over to the next daemon")
)

// RunConfig is how Run reports and what it serves besides the device.
type RunConfig struct {
	Logger *slog.Logger // nil: slog.Default()
	// Ready is called once /dev/ublkbN serves I/O.
	Ready func(device string)
	// Notifier speaks to systemd; nil: no notifications.
	Notifier *ServiceNotifier
	// MetricsAddr, if set, serves Prometheus metrics at /metrics, and
	// nothing else.
	MetricsAddr string
	// PprofAddr, if set, serves the Go runtime's profiles at
	// /debug/pprof/ on a loopback address (ServePprof).
	PprofAddr string
	// TeardownHook, if set, is lifecycle.Options.TeardownHook: called on
	// the supervisor before and after every teardown step (tracing, and
	// the VM test that wedges a teardown to see the watchdog restart the
	// daemon).
	TeardownHook func(step lifecycle.Step, done bool)
	// Hurry, closed while detaching (a second SIGTERM), makes the detach
	// immediate: lifecycle.Controller.Hurry. Run then returns
	// ErrDetachedImmediately. nil: never.
	Hurry <-chan struct{}
	// Handoff, closed (SIGUSR2, the unit's RestartKillSignal), makes Run
	// hand the device to the next daemon instead of deleting it (see
	// handOff): `systemctl restart` pauses the applications' I/O instead of
	// failing it. Run then returns ErrHandedOver. nil: never.
	Handoff <-chan struct{}
}

// Run attaches: it connects to the controller, creates the ublk device for
// the namespace, and serves it until ctx ends, a client asks to detach, or
// the controller is lost; then it tears everything down in lifecycle's
// order. It returns nil after a requested detach; on any error, nothing is
// left behind: no device, socket, goroutine.
//
// Each phase is a method of run; each undoes itself in a deferred call, in
// the reverse order.
func Run(ctx context.Context, o Options, rc RunConfig) (err error) {
	r, err := setup(o, rc)
	if err != nil {
		return err
	}
	defer r.ctl.Close()
	stopHTTP, err := r.serveHTTP()
	if err != nil {
		return err
	}
	defer stopHTTP()
	if err := r.connect(ctx); err != nil {
		return err
	}
	// From here on the controller exists: cleanup deletes it, which
	// stops and removes the block device too once it is registered.
	defer r.cleanup(&err)
	r.watchSignals()
	if err := r.createDevice(ctx); err != nil {
		return err
	}
	if r.dev == nil {
		return nil // lost before it knew of the device; cleanup says why
	}
	stopControl, err := r.serveControl()
	if err != nil {
		return err
	}
	defer stopControl()
	stopWatchdog := r.startWatchdog()
	defer stopWatchdog()
	r.ready()
	return r.serve(ctx)
}

// run is one attach, from setup to cleanup: what the phases of Run share.
type run struct {
	o    Options
	rc   RunConfig
	logs runLoggers
	log  *slog.Logger
	host nvmeof.HostIdentity

	ctl      *ublk.Control
	feats    ublk.Features // the driver's
	recovery ublk.RecoveryMode

	metrics   *Metrics // nil without --metrics-addr
	status    *statusTracker
	connector *nvmeofconn.Connector
	rings     *ringDrivers // the NVMe/TCP queues the ublk queue rings drive
	lc        *lifecycle.Controller

	// hurried: rc.Hurry made the teardown immediate. The goroutine that
	// watches rc.Hurry ends with the controller; cleanup joins it.
	hurried atomic.Bool
	hurryWG sync.WaitGroup

	backend  *blockBackend
	ns       *nvmeof.Namespace // found by the first connect
	dev      *ublk.Device
	params   ublk.Params
	queues   int
	depth    int
	recorded int  // the device whose run record was written; -1: none
	lost     bool // the controller deleted itself, nobody asked it to

	detach     chan struct{} // closed by a detach request on the control socket
	detachOnce sync.Once
}

// setup checks the options, finds the host's identity, opens the ublk
// control device and picks the recovery mode the kernel supports. Nothing
// runs yet.
func setup(o Options, rc RunConfig) (*run, error) {
	base := rc.Logger
	if base == nil {
		base = slog.Default()
	}
	r := &run{o: o, rc: rc, logs: newRunLoggers(base, o), recorded: -1, detach: make(chan struct{})}
	r.log = r.logs.ctrl
	if err := o.Validate(); err != nil {
		return nil, err
	}
	if err := nvmeof.ValidateNQN(o.NQN); err != nil {
		return nil, fmt.Errorf("%w: --nqn: %w", ErrInvalidOptions, err)
	}
	host, err := hostIdentity(o)
	if err != nil {
		return nil, err
	}
	r.host = host
	ctl, err := ublk.OpenControl()
	if err != nil {
		return nil, err
	}
	ctl.Logger = r.log
	feats, err := ctl.Features()
	if err != nil {
		ctl.Close()
		return nil, err
	}
	r.recovery, err = recoveryMode(o, feats, r.log)
	if err != nil {
		ctl.Close()
		return nil, err
	}
	r.ctl, r.feats = ctl, feats
	return r, nil
}

// serveHTTP starts the metrics and profiling listeners that were asked for.
// Metrics exist from the start so that they see the first connect.
func (r *run) serveHTTP() (stop func(), err error) {
	var servers []*HTTPServer
	stop = func() {
		for _, s := range servers {
			_ = s.Close()
		}
	}
	if r.rc.MetricsAddr != "" {
		r.metrics = NewMetrics(r.o.Addr(), r.o.NQN)
		ms, err := ServeMetrics(r.rc.MetricsAddr, r.metrics)
		if err != nil {
			return nil, fmt.Errorf("%w: --metrics-addr: %w", ErrInvalidOptions, err)
		}
		servers = append(servers, ms)
	}
	if r.rc.PprofAddr != "" {
		ps, err := ServePprof(r.rc.PprofAddr)
		if err != nil {
			stop()
			if !errors.Is(err, ErrInvalidOptions) {
				err = fmt.Errorf("%w: --pprof-addr: %w", ErrInvalidOptions, err)
			}
			return nil, err
		}
		servers = append(servers, ps)
	}
	return stop, nil
}

// connect makes the lifecycle controller and its first association. The
// status line, the metrics and systemd's STATUS= follow its states.
func (r *run) connect(ctx context.Context) error {
	o := r.o
	r.status = &statusTracker{st: Status{
		PID: os.Getpid(), TrAddr: o.TrAddr, TrSvcID: o.TrSvcID, NQN: o.NQN, HostNQN: r.host.NQN,
		NSID: o.NSID, QueueSize: o.QueueSize, Started: time.Now(), DevID: -1,
		UblkFeatures: r.feats.Names(),
	}}
	r.rings = newRingDrivers(r.log)
	r.connector = &nvmeofconn.Connector{
		Config: nvmeof.ControllerConfig{
			Addr: o.Addr(), SubsysNQN: o.NQN, Host: r.host,
			IOQueues: o.NrIOQueues, QueueSize: o.QueueSize,
			KATO: o.KeepAliveTmo, NoKeepAlive: o.KeepAliveTmo == 0,
			HeaderDigest: o.HdrDigest, DataDigest: o.DataDigest,
			Auth:   o.authConfig(),
			Logger: r.logs.nvme,
		},
		NSID:              o.NSID,
		IOQueuesConnected: r.rings.driveAssociation,
		KeepAliveRTT: func(rtt time.Duration) {
			r.status.keepAlive(rtt)
			if r.metrics != nil {
				r.metrics.KeepAliveDone(rtt)
			}
		},
	}
	lopts := lifecycle.DefaultOptions()
	lopts.ReconnectDelay = o.ReconnectDelay
	lopts.CtrlLossTmo = o.CtrlLossTmo
	lopts.FastIOFailTmo = o.FastIOFailTmo
	lopts.Logger = r.log
	lopts.TeardownHook = r.rc.TeardownHook
	if o.LinkWatch {
		addr, err := resolveTarget(ctx, o.TrAddr)
		if err != nil {
			return fmt.Errorf("%w: --link-watch: %w", ErrUnreachable, err)
		}
		lopts.LinkWatch = &linkwatch.Watcher{Addr: addr, Logger: r.log}
	}
	lc, err := lifecycle.New(r.connector, lopts)
	if err != nil {
		return err
	}
	lc.States().Observe(r.observe)
	r.log.Info("connecting", "hostnqn", r.host.NQN)
	if err := lc.Start(ctx); err != nil {
		return classifyConnectError(o, err)
	}
	r.lc = lc
	return nil
}

// observe follows a state transition in the status, the metrics and
// systemd's STATUS= line.
func (r *run) observe(tr lifecycle.Transition) {
	reconnected := r.status.state(tr)
	if r.metrics != nil {
		r.metrics.SetState(tr.To.String())
		if reconnected {
			r.metrics.Reconnected()
		}
	}
	if r.rc.Notifier != nil {
		_ = r.rc.Notifier.Status(serviceStatus(r.status.device(), fmt.Sprintf("%v (%s)", tr.To, tr.Reason)))
		if tr.To == lifecycle.StateDeleting {
			// The daemon is on its way out, asked to or not (ctrl_loss_tmo,
			// another namespace). STOPPING=1 ends systemd's watchdog
			// (TimeoutStopSec bounds the teardown from here): the
			// supervisor answers no health request while it tears down,
			// and a self-delete's STOP_DEV, shutdown notification and
			// DEL_DEV may together outlast WatchdogSec.
			_ = r.rc.Notifier.Stopping()
		}
	}
}

// watchSignals makes rc.Hurry (a second SIGTERM) turn whatever teardown is
// under way, or the next one, immediate.
func (r *run) watchSignals() {
	r.hurryWG.Add(1)
	go func() {
		defer r.hurryWG.Done()
		select {
		case <-r.rc.Hurry:
			r.hurried.Store(true)
			r.log.Warn("detaching immediately: failing the I/O in flight and held with EIO")
			r.lc.Hurry()
		case <-r.lc.Done():
		}
	}()
}

// createDevice creates the ublk device for the namespace (or takes over
// the one a dead daemon left) and hands it to lifecycle. It leaves r.dev
// nil if the controller was lost before it knew of the device.
func (r *run) createDevice(ctx context.Context) error {
	ns, queues := r.connector.First()
	r.ns = ns
	r.params = blockParams(ns)
	r.status.setQueues(queues)
	// One less than the negotiated queue size, as --queue-size gave
	// before the controller could lower it (a later association with
	// smaller queues holds what does not fit in the slow path).
	r.queues, r.depth = queues, min(r.connector.FirstQueueSize()-1, 4096)
	r.rings.setQueues(queues)
	r.backend = newBlockBackend(r.lc, r.metrics, queues, r.depth)
	r.backend.rings = r.rings

	dev, err := openDevice(ctx, r.ctl, r.o, ns, ublk.Options{
		ID: devID(r.o), Queues: queues, Depth: r.depth,
		Params: r.params, Recovery: r.recovery, ZeroCopy: zeroCopy(r.o, r.feats),
		BatchIO: batchIO(r.o, r.feats),
	}, r.backend, r.log)
	if err != nil {
		return err
	}
	if err := r.lc.SetBlock(ublkBlock{dev}); err != nil {
		// Deleted (or being deleted) before it knew of the device:
		// remove it here.
		_ = dev.Close(context.Background())
		r.lost = true
		return nil
	}
	r.dev = dev
	r.status.setDevice(dev.ID(), dev.BlockDevice(), r.feats, dev.Info().Flags)
	r.logs.setDevice(dev.BlockDevice())
	if r.metrics != nil {
		r.metrics.HeldFrom(r.lc.Held)
	}
	return nil
}

// serveControl opens the device's control socket (status, detach) and
// writes its run record, which tells a restarted daemon what to recover.
func (r *run) serveControl() (stop func(), err error) {
	cs, err := ListenControl(r.dev.ID(), func() Status {
		return r.status.snapshot(r.lc, r.backend)
	}, func() { r.detachOnce.Do(func() { close(r.detach) }) })
	if err != nil {
		return nil, err
	}
	if err := writeRecord(newRecord(r.dev.ID(), r.o, r.ns)); err != nil {
		cs.Close()
		return nil, fmt.Errorf("run record: %w", err)
	}
	r.recorded = r.dev.ID()
	return func() { cs.Close() }, nil
}

// startWatchdog feeds systemd's watchdog while the controller's supervisor
// answers its health check (supervisorHealth).
func (r *run) startWatchdog() (stop func()) {
	if r.rc.Notifier == nil {
		return func() {}
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	health := newSupervisorHealth(r.lc, r.log)
	go func() {
		defer wg.Done()
		_ = r.rc.Notifier.Watchdog(ctx, health.check)
	}()
	return func() {
		cancel()
		wg.Wait()
	}
}

// ready says the device serves I/O: on stdout (rc.Ready) and to systemd.
func (r *run) ready() {
	r.log.Info("attached", "namespace", r.o.NSID, "size", r.params.Size, "block_size", r.params.LogicalBlockSize,
		"queues", r.queues, "depth", r.depth)
	device := r.dev.BlockDevice()
	if r.rc.Ready != nil {
		r.rc.Ready(device)
	}
	if r.rc.Notifier != nil {
		_ = r.rc.Notifier.Ready(device, r.lc.State().String())
	}
}

// serve waits until the daemon is signalled, asked to detach, or the
// controller is lost (r.lost; cleanup reports it). A hand-over (rc.Handoff)
// returns ErrHandedOver.
func (r *run) serve(ctx context.Context) error {
	select {
	case <-r.rc.Handoff:
		err := handOff(r.dev, r.log)
		if errors.Is(err, ublk.ErrStopping) {
			// The controller is deleting itself (only its teardown
			// stops the device while serve waits here): that delete
			// removes the device; report the controller lost.
			r.log.Warn("hand-over refused: the controller is being deleted, and the device with it", "err", err)
			r.lost = true
			return nil
		}
		return err
	case <-ctx.Done():
		r.log.Info("detaching: signalled")
	case <-r.detach:
		r.log.Info("detaching: requested")
	case <-r.lc.Done():
		r.lost = true
		return nil
	case <-r.dev.Done():
		// lifecycle stops the device itself when the controller is lost
		// (ctrl_loss_tmo, another namespace): that is not a detach.
		if st := r.lc.State(); st == lifecycle.StateDeleting || st == lifecycle.StateDead {
			r.lost = true
			return nil
		}
		if err := r.dev.Err(); err != nil {
			// A queue that failed ends the device's others (ublk).
			r.log.Error("the ublk device's queues failed; detaching", "err", err)
		} else {
			r.log.Warn("the ublk device was stopped from outside")
		}
	}
	if r.rc.Notifier != nil {
		_ = r.rc.Notifier.Stopping()
	}
	return nil
}

// cleanup deletes the controller (and with it the device, in lifecycle's
// teardown order), joins what watched it, and removes the run record once
// the device is gone. A controller that deleted itself makes *err
// ErrControllerLost; rc.Hurry makes a nil *err ErrDetachedImmediately.
func (r *run) cleanup(err *error) {
	if r.lost {
		<-r.lc.Done()
		if *err == nil {
			*err = fmt.Errorf("%w: %w", ErrControllerLost, r.lc.Err())
		}
	}
	// Idempotent; waits until DEAD. After an early error it tears the
	// controller (and the device, once registered) down.
	r.lc.Delete()
	r.hurryWG.Wait()
	if r.hurried.Load() && *err == nil {
		*err = ErrDetachedImmediately
	}
	if r.backend != nil {
		r.backend.wg.Wait() // every request was completed by the teardown
	}
	// The record goes with the device; after a crash it stays and tells
	// the next daemon which device to take over.
	if r.recorded >= 0 {
		if _, infoErr := r.ctl.DeviceInfo(context.Background(), r.recorded); errors.Is(infoErr, syscall.ENODEV) {
			_ = removeRecord(r.recorded)
		}
	}
}

// ublkBlock is the ublk device as lifecycle stops and removes it: Stop is
// docs/design.md's teardown step 3 (STOP_DEV, serving until it returns),
// Remove its step 9 (rings, mappings, /dev/ublkcN, DEL_DEV), after the
// queues.
type ublkBlock struct{ dev *ublk.Device }

func (b ublkBlock) Stop(ctx context.Context) error   { return b.dev.Stop(ctx) }
func (b ublkBlock) Remove(ctx context.Context) error { return b.dev.Close(ctx) }

// Size and Resize make the device follow its namespace's size
// (lifecycle.Resizer): UBLK_U_CMD_UPDATE_SIZE where the kernel has it.
func (b ublkBlock) Size() uint64                                  { return b.dev.Size() }
func (b ublkBlock) Resize(ctx context.Context, size uint64) error { return b.dev.Resize(ctx, size) }

// openDevice takes over the device a dead daemon left for this target
// (with Recover), if it served namespace ns, or creates one.
func openDevice(ctx context.Context, ctl *ublk.Control, o Options, ns *nvmeof.Namespace, uo ublk.Options, b ublk.Backend, log *slog.Logger) (*ublk.Device, error) {
	if o.Recover || o.MustRecover {
		r, found, err := findRecoverable(ctx, ctl, o)
		if err != nil {
			return nil, err
		}
		if found {
			if err := r.checkNamespace(ns); err != nil {
				return nil, err
			}
			log.Info("recovering the device a dead daemon left", "device", fmt.Sprintf("/dev/ublkb%d", r.DevID))
			return ctl.Recover(ctx, r.DevID, b)
		}
		if o.MustRecover {
			return nil, fmt.Errorf("%w: no device left by a dead daemon for %s namespace %d", ErrNoSuchDevice, o.NQN, o.NSID)
		}
		log.Info("no device to recover; creating one")
	}
	return ctl.Create(ctx, uo, b)
}

// resolveTarget returns traddr's IP address (the first one, for a name).
func resolveTarget(ctx context.Context, traddr string) (netip.Addr, error) {
	if a, err := netip.ParseAddr(traddr); err == nil {
		return a.Unmap(), nil
	}
	addrs, err := net.DefaultResolver.LookupNetIP(ctx, "ip", traddr)
	if err != nil {
		return netip.Addr{}, err
	}
	if len(addrs) == 0 {
		return netip.Addr{}, fmt.Errorf("%s has no address", traddr)
	}
	return addrs[0].Unmap(), nil
}

func devID(o Options) int {
	if o.DevID < 0 {
		return ublk.AutoID
	}
	return o.DevID
}

// blockParams derives the ublk device's properties from the namespace.
func blockParams(ns *nvmeof.Namespace) ublk.Params {
	bs := uint32(ns.BlockSize())
	p := ublk.Params{
		Size:             ns.Blocks << ns.BlockShift,
		LogicalBlockSize: bs,
		// A tag's buffer is one command's transfer at most.
		MaxIOBytes:    uint32(min(ns.MaxTransfer, 1<<20)) &^ (uint32(os.Getpagesize()) - 1),
		VolatileCache: ns.VolatileWriteCache,
		FUA:           ns.VolatileWriteCache,
	}
	if p.MaxIOBytes == 0 {
		p.MaxIOBytes = uint32(os.Getpagesize())
	}
	if ns.SupportsDeallocate() || ns.SupportsWriteZeroes() {
		d := &ublk.DiscardParams{Granularity: bs}
		// One request is one command: a discard one DSM range of at most
		// DMRSL blocks (and 65536, as Write Zeroes: a range is 32 bits
		// but keep requests in one command's reach), a write zeroes at
		// most WZSL (or MDTS) blocks.
		sectors := func(blocks uint32) uint32 {
			return uint32(min(uint64(blocks)<<ns.BlockShift>>9, 1<<22))
		}
		if ns.SupportsDeallocate() {
			d.MaxDiscardSectors = sectors(min(ns.MaxDeallocateBlocks, 65536))
		}
		if ns.SupportsWriteZeroes() {
			d.MaxWriteZeroesSectors = sectors(ns.MaxWriteZeroesBlocks)
		}
		p.Discard = d
	}
	return p
}

func hostIdentity(o Options) (nvmeof.HostIdentity, error) {
	h, err := nvmeof.LoadHostIdentity()
	if err != nil && o.HostNQN == "" {
		return h, err
	}
	if o.HostNQN != "" {
		if err := nvmeof.ValidateNQN(o.HostNQN); err != nil {
			return h, fmt.Errorf("%w: --hostnqn: %w", ErrInvalidOptions, err)
		}
		h.NQN = o.HostNQN
	}
	if o.HostID != "" {
		id, err := nvmeof.ParseUUID(o.HostID)
		if err != nil {
			return h, fmt.Errorf("%w: --hostid: %w", ErrInvalidOptions, err)
		}
		h.ID = id
	}
	return h, nil
}

// classifyConnectError wraps the first connect's error with the sentinel
// that says what went wrong.
func classifyConnectError(o Options, err error) error {
	var op *net.OpError
	var st nvme.Status
	var nse *nvmeofconn.NamespaceError
	var ae *auth.Error // DH-HMAC-CHAP failed, either way
	switch {
	case errors.As(err, &nse):
		return fmt.Errorf("%w: %d: %w", ErrNoNamespace, nse.NSID, nse.Err)
	case errors.As(err, &op) && op.Op == "dial":
		return fmt.Errorf("%w: %s: %w", ErrUnreachable, o.Addr(), err)
	case errors.As(err, &st), errors.As(err, &ae), errors.Is(err, nvmeof.ErrAuthRequired):
		return fmt.Errorf("%w: %s at %s: %w", ErrRejected, o.NQN, o.Addr(), err)
	}
	return fmt.Errorf("connect to %s: %w", o.Addr(), err)
}

// zeroCopy chooses the device's data path (Options.ZeroCopy): on where
// asked (ublk refuses it on a kernel without AUTO_BUF_REG, naming it), and
// by default where the kernel has AUTO_BUF_REG and no data digest needs
// the bytes in the daemon.
func zeroCopy(o Options, feats ublk.Features) bool {
	return o.ZeroCopy.choose(feats.Has(ublk.FeatureAutoBufReg) && !o.DataDigest)
}

// batchIO chooses whether ublk batches its commands (Options.BatchIO): on
// where asked (ublk refuses it on a kernel without BATCH_IO, naming it),
// and by default where the kernel has it.
func batchIO(o Options, feats ublk.Features) bool {
	return o.BatchIO.choose(feats.Has(ublk.FeatureBatchIO))
}

// choose is on and off as asked, and for auto (or "") whether the
// feature is usable here.
func (u FeatureUse) choose(usable bool) bool {
	switch u {
	case UseOn:
		return true
	case UseOff:
		return false
	}
	return usable
}

// recoveryMode chooses the device's ublk recovery from the options and the
// kernel's features: reissue where the kernel has it (applications see no
// error across a daemon restart), plain recovery before that, none without
// user recovery (a warning); --recovery-fail-io on a kernel without
// USER_RECOVERY_FAIL_IO is an error, since its user asked for EIO.
func recoveryMode(o Options, feats ublk.Features, log *slog.Logger) (ublk.RecoveryMode, error) {
	switch {
	case !o.Recovery:
		return ublk.RecoveryNone, nil
	case o.RecoveryFailIO && !feats.Has(ublk.FeatureUserRecoveryFailIO):
		return 0, fmt.Errorf("%w: --recovery-fail-io: this kernel's ublk driver lacks UBLK_F_USER_RECOVERY_FAIL_IO (Linux 6.13)", ublk.ErrNotSupported)
	case o.RecoveryFailIO:
		return ublk.RecoveryFailIO, nil
	case feats.Has(ublk.FeatureUserRecoveryReissue):
		return ublk.RecoveryReissue, nil
	case feats.Has(ublk.FeatureUserRecovery):
		return ublk.Recovery, nil
	}
	log.Warn("ublk user recovery not supported by this kernel (needs Linux 6.0); continuing without")
	return ublk.RecoveryNone, nil
}

// statusTracker keeps what Status reports.
type statusTracker struct {
	mu      sync.Mutex
	st      Status
	wasLive bool
}

// state records a transition and reports whether it was a reconnect (LIVE
// again after the first time).
func (s *statusTracker) state(tr lifecycle.Transition) (reconnected bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.st.State, s.st.StateSince = tr.To.String(), tr.Time
	if tr.To == lifecycle.StateLive {
		reconnected = s.wasLive
		if reconnected {
			s.st.Reconnects++
		}
		s.wasLive = true
	}
	return reconnected
}

func (s *statusTracker) keepAlive(rtt time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.st.KeepAliveRTT = rtt
}

func (s *statusTracker) setQueues(n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.st.Queues = n
}

func (s *statusTracker) device() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.st.Device
}

func (s *statusTracker) setDevice(id int, path string, offered, flags ublk.Features) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.st.DevID, s.st.Device, s.st.UblkFlags = id, path, flags.Names()
	s.st.UblkDataPath = ublk.DataPath(offered, flags)
}

func (s *statusTracker) snapshot(lc *lifecycle.Controller, b *blockBackend) Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.st
	st.InFlight = int(b.inflight.Load())
	st.Held = lc.Held()
	st.ZeroCopyIOs, st.ZeroCopyBounced = b.zeroCopied.Load(), b.bounced.Load()
	return st
}

// handoffTimeout bounds the wait for the I/O in flight at a hand-over.
const handoffTimeout = 30 * time.Second

// exitProcess is os.Exit; handOff's way out on kernels without QUIESCE.
var exitProcess = os.Exit

// ExitHandedOver is the exit status after a hand-over (ErrHandedOver, or
// the exit without QUIESCE); the unit lists it in SuccessExitStatus.
const ExitHandedOver = 12

// handOff leaves the device to the next daemon, which takes it over with
// attach --recover; applications see a pause, not an error.
//
// With UBLK_F_QUIESCE (Linux 6.16) ublk.Device.Handoff quiesces it: the
// driver holds new I/O, the requests in flight are served to the end, and
// the device is left QUIESCED; Run's teardown then disconnects from the
// target, its ublk steps doing nothing (the device is no longer ours).
//
// Without QUIESCE (6.12), or on a BATCH_IO device (where QUIESCE_DEV
// would fail the I/O that comes before the next daemon), the process exits at once,
// as after a crash, with the device's rings still open, so that the driver
// keeps the device for user recovery once this process is gone and
// reissues the requests that were in flight to the next daemon
// (USER_RECOVERY_REISSUE; with plain USER_RECOVERY they fail, and
// without recovery the device goes away). The target may still execute a
// write this process had sent; the reissued copy of it comes after.
func handOff(dev *ublk.Device, log *slog.Logger) error {
	ctx, cancel := context.WithTimeout(context.Background(), handoffTimeout)
	defer cancel()
	abandoned, err := dev.Handoff(ctx)
	if errors.Is(err, ublk.ErrNotSupported) {
		log.Warn("handing over by exiting: the device cannot be quiesced for the next daemon; it recovers the device and the driver reissues the I/O in flight", "err", err)
		exitProcess(ExitHandedOver)
	}
	if errors.Is(err, ublk.ErrStopping) {
		return err // not handed over: a delete under way removes the device
	}
	if err != nil {
		log.Warn("hand-over: quiesce failed; the requests left in flight are reissued to the next daemon", "err", err, "requests", abandoned)
	} else {
		log.Info("handed over: device quiesced for the next daemon", "requests_left", abandoned)
	}
	return ErrHandedOver
}
