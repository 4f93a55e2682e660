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
	// Hurry, closed while detaching (a second SIGTERM), makes the detach
	// immediate: lifecycle.Controller.Hurry. Run then returns
	// ErrDetachedImmediately. nil: never.
	Hurry <-chan struct{}
}

// teardownTimeout bounds a graceful teardown (drain, disconnect, delete).
const teardownTimeout = 60 * time.Second

// Run attaches: it connects to the controller, creates the ublk device for
// the namespace, and serves it until ctx ends, a client asks to detach, or
// the controller is lost; then it tears everything down in lifecycle's
// order. It returns nil after a requested detach; on any error, nothing is
// left behind: no device, socket, goroutine.
func Run(ctx context.Context, o Options, rc RunConfig) (err error) {
	base := rc.Logger
	if base == nil {
		base = slog.Default()
	}
	logs := newRunLoggers(base, o)
	log := logs.ctrl
	if err := o.Validate(); err != nil {
		return err
	}
	if err := nvmeof.ValidateNQN(o.NQN); err != nil {
		return fmt.Errorf("%w: --nqn: %w", ErrInvalidOptions, err)
	}
	host, err := hostIdentity(o)
	if err != nil {
		return err
	}

	ctl, err := ublk.OpenControl()
	if err != nil {
		return err
	}
	defer ctl.Close()
	ctl.Logger = log
	feats, err := ctl.Features()
	if err != nil {
		return err
	}
	recovery, err := recoveryMode(o, feats, log)
	if err != nil {
		return err
	}

	// Metrics exist from the start so that they see the first connect.
	var metrics *Metrics
	if rc.MetricsAddr != "" {
		metrics = NewMetrics(o.Addr(), o.NQN)
		ms, err := ServeMetrics(rc.MetricsAddr, metrics)
		if err != nil {
			return fmt.Errorf("%w: --metrics-addr: %w", ErrInvalidOptions, err)
		}
		defer ms.Close()
	}
	if rc.PprofAddr != "" {
		ps, err := ServePprof(rc.PprofAddr)
		if err != nil {
			if !errors.Is(err, ErrInvalidOptions) {
				err = fmt.Errorf("%w: --pprof-addr: %w", ErrInvalidOptions, err)
			}
			return err
		}
		defer ps.Close()
	}
	status := &statusTracker{st: Status{
		PID: os.Getpid(), TrAddr: o.TrAddr, TrSvcID: o.TrSvcID, NQN: o.NQN, HostNQN: host.NQN,
		NSID: o.NSID, QueueSize: o.QueueSize, Started: time.Now(), DevID: -1,
		UblkFeatures: feats.Names(),
	}}
	connector := &nvmeofconn.Connector{
		Config: nvmeof.ControllerConfig{
			Addr: o.Addr(), SubsysNQN: o.NQN, Host: host,
			IOQueues: o.NrIOQueues, QueueSize: o.QueueSize,
			KATO: o.KeepAliveTmo, NoKeepAlive: o.KeepAliveTmo == 0,
			HeaderDigest: o.HdrDigest, DataDigest: o.DataDigest,
			Auth:   o.authConfig(),
			Logger: logs.nvme,
		},
		NSID: o.NSID,
		KeepAliveRTT: func(rtt time.Duration) {
			status.keepAlive(rtt)
			if metrics != nil {
				metrics.KeepAliveDone(rtt)
			}
		},
	}
	lopts := lifecycle.DefaultOptions()
	lopts.ReconnectDelay = o.ReconnectDelay
	lopts.CtrlLossTmo = o.CtrlLossTmo
	lopts.FastIOFailTmo = o.FastIOFailTmo
	lopts.Logger = log
	if o.LinkWatch {
		addr, err := resolveTarget(ctx, o.TrAddr)
		if err != nil {
			return fmt.Errorf("%w: --link-watch: %w", ErrUnreachable, err)
		}
		lopts.LinkWatch = &linkwatch.Watcher{Addr: addr, Logger: log}
	}
	lc, err := lifecycle.New(connector, lopts)
	if err != nil {
		return err
	}
	lc.States().Observe(func(tr lifecycle.Transition) {
		reconnected := status.state(tr)
		if metrics != nil {
			metrics.SetState(tr.To.String())
			if reconnected {
				metrics.Reconnected()
			}
		}
		if rc.Notifier != nil {
			_ = rc.Notifier.Status(serviceStatus(status.device(), fmt.Sprintf("%v (%s)", tr.To, tr.Reason)))
		}
	})
	log.Info("connecting", "hostnqn", host.NQN)
	if err := lc.Start(ctx); err != nil {
		return classifyConnectError(o, err)
	}
	// From here on the controller exists: every return deletes it, which
	// stops and removes the block device too once it is registered. A
	// controller that died on its own (ctrl_loss_tmo) is an error.
	var backend *blockBackend
	recorded := -1 // the device whose run record we wrote
	lost := false  // set when the controller deleted itself, not asked to
	// rc.Hurry makes whatever teardown is under way, or the next one,
	// immediate. The goroutine ends with the controller; the deferred
	// teardown below joins it.
	var hurried atomic.Bool
	var hurryWG sync.WaitGroup
	hurryWG.Add(1)
	go func() {
		defer hurryWG.Done()
		select {
		case <-rc.Hurry:
			hurried.Store(true)
			log.Warn("detaching immediately: failing the I/O in flight and held with EIO")
			lc.Hurry()
		case <-lc.Done():
		}
	}()
	defer func() {
		if lost {
			<-lc.Done()
			if err == nil {
				err = fmt.Errorf("%w: %w", ErrControllerLost, lc.Err())
			}
		}
		// Idempotent; waits until DEAD. After an early error it tears the
		// controller (and the device, once registered) down.
		lc.Delete()
		hurryWG.Wait()
		if hurried.Load() && err == nil {
			err = ErrDetachedImmediately
		}
		if backend != nil {
			backend.wg.Wait() // every request was completed by the teardown
		}
		// The record goes with the device; after a crash it stays and
		// tells the next daemon which device to take over.
		if recorded >= 0 {
			if _, infoErr := ctl.DeviceInfo(context.Background(), recorded); errors.Is(infoErr, syscall.ENODEV) {
				_ = removeRecord(recorded)
			}
		}
	}()

	ns, queues := connector.First()
	params := blockParams(ns)
	status.setQueues(queues)
	// One less than the negotiated queue size, as --queue-size gave
	// before the controller could lower it (a later association with
	// smaller queues holds what does not fit in the slow path).
	depth := min(connector.FirstQueueSize()-1, 4096)
	backend = newBlockBackend(lc, metrics, queues, depth)

	dev, err := openDevice(ctx, ctl, o, ns, ublk.Options{
		ID: devID(o), Queues: queues, Depth: depth,
		Params: params, Recovery: recovery,
	}, backend, log)
	if err != nil {
		return err
	}
	lc.SetBlock(ublkBlock{dev})
	select {
	case <-lc.Done():
		// Deleted before it knew of the device: remove it here.
		_ = dev.Close(context.Background())
		return nil // the deferred check reports why
	default:
	}
	device := dev.BlockDevice()
	status.setDevice(dev.ID(), device, dev.Info().Flags)
	logs.setDevice(device)

	if metrics != nil {
		metrics.HeldFrom(lc.Held)
	}
	detach := make(chan struct{})
	var detachOnce sync.Once
	cs, err := ListenControl(dev.ID(), func() Status {
		return status.snapshot(lc, backend)
	}, func() { detachOnce.Do(func() { close(detach) }) })
	if err != nil {
		return err
	}
	defer cs.Close()
	if err := writeRecord(newRecord(dev.ID(), o, ns)); err != nil {
		return fmt.Errorf("run record: %w", err)
	}
	recorded = dev.ID()
	if rc.Notifier != nil {
		wdCtx, stopWatchdog := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Healthy while the lifecycle answers and the controller is
			// not dead: a wedged state machine blocks this check, and the
			// missed watchdog makes systemd restart the service.
			_ = rc.Notifier.Watchdog(wdCtx, func(context.Context) bool {
				return lc.State() != lifecycle.StateDead
			})
		}()
		defer func() {
			stopWatchdog()
			wg.Wait()
		}()
	}

	log.Info("attached", "namespace", o.NSID, "size", params.Size, "block_size", params.LogicalBlockSize,
		"queues", queues, "depth", depth)
	if rc.Ready != nil {
		rc.Ready(device)
	}
	if rc.Notifier != nil {
		_ = rc.Notifier.Ready(device, lc.State().String())
	}

	select {
	case <-ctx.Done():
		log.Info("detaching: signalled")
	case <-detach:
		log.Info("detaching: requested")
	case <-lc.Done():
		lost = true // the deferred check reports why
		return nil
	case <-dev.Done():
		// lifecycle stops the device itself when the controller is lost
		// (ctrl_loss_tmo, another namespace): that is not a detach.
		if st := lc.State(); st == lifecycle.StateDeleting || st == lifecycle.StateDead {
			lost = true
			return nil
		}
		log.Warn("the ublk device was stopped from outside")
	}
	if rc.Notifier != nil {
		_ = rc.Notifier.Stopping()
	}
	return nil
}

// ublkBlock is the ublk device as lifecycle stops and removes it: Stop is
// docs/design.md's teardown step 3 (STOP_DEV, serving until it returns),
// Remove its step 8 (rings, mappings, /dev/ublkcN, DEL_DEV), after the
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

func (s *statusTracker) setDevice(id int, path string, flags ublk.Features) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.st.DevID, s.st.Device, s.st.UblkFlags = id, path, flags.Names()
}

func (s *statusTracker) snapshot(lc *lifecycle.Controller, b *blockBackend) Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.st
	st.InFlight = int(b.inflight.Load())
	st.Held = lc.Held()
	return st
}
