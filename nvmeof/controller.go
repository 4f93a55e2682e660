package nvmeof

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// This file is the core (drivers/nvme/host/core.c): a controller with its
// admin queue and I/O queues, enable and shutdown, Identify, features,
// Keep Alive, log pages and asynchronous events.

// Defaults as the Linux host (drivers/nvme/host/fabrics.h, core.c).
const (
	DefaultQueueSize    = 128 // NVMF_DEF_QUEUE_SIZE
	AdminQueueSize      = 32  // NVME_AQ_DEPTH
	DefaultKATO         = 5 * time.Second
	DefaultIOTimeout    = 30 * time.Second
	DefaultAdminTimeout = 60 * time.Second
	DefaultPort         = "4420"
)

// ControllerConfig says what to connect to and how.
type ControllerConfig struct {
	// Addr is the target's "host:port".
	Addr string
	// SubsysNQN is the subsystem to connect to; the discovery NQN makes a
	// discovery controller (admin queue only).
	SubsysNQN string
	// Host is the host identity; LoadHostIdentity if zero.
	Host HostIdentity
	// IOQueues is how many I/O queues to ask for [1]; the controller may
	// grant fewer.
	IOQueues int
	// QueueSize is the I/O queue size [128].
	QueueSize int
	// KATO is the keep-alive timeout sent in Connect [5 s]; NoKeepAlive
	// sends zero. The caller sends the Keep Alive commands (keepalive/).
	KATO        time.Duration
	NoKeepAlive bool
	// Auth holds DH-HMAC-CHAP secrets: every queue authenticates after
	// Connect when the controller requires it (auth.go). Nil: none.
	Auth *AuthConfig
	// HeaderDigest and DataDigest enable NVMe/TCP digests on every queue.
	HeaderDigest, DataDigest bool
	// IOTimeout and AdminTimeout are per-command timeouts [30 s, 60 s].
	IOTimeout, AdminTimeout time.Duration
	// MaxData bounds one transfer per command [1 MiB], at least 4096;
	// MDTS may lower it.
	MaxData int
	// Dial opens each queue's connection to Addr [TCP]. Tests put a
	// scripted controller behind it.
	Dial func(ctx context.Context, addr string) (net.Conn, error)
	// OnFailure is called (once per queue, on a queue goroutine, must not
	// block) when a queue fails for any reason but Shutdown: socket error,
	// protocol error, C2HTermReq, command timeout. lifecycle starts
	// recovery from it.
	OnFailure func(err error)
	// OnEvent is called for each asynchronous event, on the controller's
	// event goroutine (it may issue admin commands). Optional.
	OnEvent func(AsyncEvent)
	Logger  *slog.Logger
}

// AsyncEvent is a completed Asynchronous Event Request.
type AsyncEvent struct {
	Type    uint8 // NVME_AER_TYPE_*
	Info    uint8 // NVME_AER_NOTICE_* for notices
	LogPage uint8
	// ChangedNamespaces is the Changed Namespace List read (and so
	// cleared) for a Namespace Attribute Changed notice.
	ChangedNamespaces []uint32
}

func (e AsyncEvent) String() string {
	switch {
	case e.Type == nvme.NVME_AER_TYPE_NOTICE && e.Info == nvme.NVME_AER_NOTICE_NS_CHANGED:
		return fmt.Sprintf("namespace attribute changed %v", e.ChangedNamespaces)
	case e.Type == nvme.NVME_AER_TYPE_NOTICE && e.Info == nvme.NVME_AER_NOTICE_DISC_CHANGED:
		return "discovery log changed"
	}
	return fmt.Sprintf("async event type %d info %#x log %#x", e.Type, e.Info, e.LogPage)
}

// Controller is an association with an NVMe-oF controller: the admin queue
// and the I/O queues.
type Controller struct {
	cfg     ControllerConfig
	log     *slog.Logger
	traffic Traffic

	admin  *Queue
	io     []*IOQueue
	cntlid uint16
	cap    uint64
	vs     uint32
	id     *nvme.IdentifyController
	// Negotiated from the controller's values, each bounded first (see
	// checkIdentify): the largest data transfer of one command, the I/O
	// queue size, the NVM command set limits (zero: not reported), and
	// whether Advanced Command Retry is enabled.
	maxTransfer int
	queueSize   int
	nvm         nvme.IdentifyControllerNVM
	acre        bool
	// ioWanted is how many I/O queues ConnectIOQueues makes (Number of
	// Queues granted, never more than asked for; none for a discovery
	// controller); ioConnectCalled says it ran.
	ioWanted        int
	ioConnectCalled bool

	// The event goroutine handles AER completions; it is started by
	// ConnectAdmin and joined by WaitIdle.
	events    chan aerCompletion
	eventStop chan struct{}
	eventDone chan struct{}
	stopOnce  sync.Once
}

// IOQueue is an I/O queue of a controller.
type IOQueue struct {
	*Queue
}

type aerCompletion struct {
	result uint64
	err    error
}

// IsDiscovery reports whether cfg connects to a discovery controller.
func (cfg *ControllerConfig) IsDiscovery() bool { return cfg.SubsysNQN == nvme.NVME_DISC_SUBSYS_NAME }

// Connect creates the association: ConnectAdmin, then ConnectIOQueues. On
// error everything set up is released.
func Connect(ctx context.Context, cfg ControllerConfig) (*Controller, error) {
	c, err := ConnectAdmin(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if err := c.ConnectIOQueues(ctx); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// ConnectAdmin is the first phase of a connect: admin queue, Fabrics
// Connect, enable, Identify Controller, Number of Queues, asynchronous
// event configuration. The I/O queues are made by ConnectIOQueues, once the
// caller has started keep-alive on the admin queue, as the Linux host does
// since 4733b65d82bd ("nvme: start keep-alive after admin queue setup"):
// connecting many I/O queues may outlast KATO. On error everything set up
// is released. A discovery controller is complete after ConnectAdmin.
func ConnectAdmin(ctx context.Context, cfg ControllerConfig) (_ *Controller, err error) {
	if err := ValidateNQN(cfg.SubsysNQN); err != nil {
		return nil, fmt.Errorf("subsystem: %w", err)
	}
	if cfg.Host.NQN == "" {
		if cfg.Host, err = LoadHostIdentity(); err != nil {
			return nil, err
		}
	}
	if err := ValidateNQN(cfg.Host.NQN); err != nil {
		return nil, fmt.Errorf("host: %w", err)
	}
	if cfg.IOQueues == 0 {
		cfg.IOQueues = 1
	}
	if cfg.QueueSize == 0 {
		cfg.QueueSize = DefaultQueueSize
	}
	if cfg.KATO == 0 {
		cfg.KATO = DefaultKATO
	}
	if cfg.NoKeepAlive {
		cfg.KATO = 0
	}
	if cfg.IOTimeout == 0 {
		cfg.IOTimeout = DefaultIOTimeout
	}
	if cfg.AdminTimeout == 0 {
		cfg.AdminTimeout = DefaultAdminTimeout
	}
	if cfg.MaxData == 0 {
		cfg.MaxData = 1 << 20
	}
	if cfg.MaxData < 4096 {
		return nil, fmt.Errorf("nvmeof: MaxData %d below 4096 bytes", cfg.MaxData)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	c := &Controller{cfg: cfg, log: cfg.Logger.With("subsys", cfg.SubsysNQN, "addr", cfg.Addr),
		events: make(chan aerCompletion, 1), eventStop: make(chan struct{}), eventDone: make(chan struct{})}
	defer func() {
		if err != nil {
			c.Shutdown()
			c.WaitIdle()
			c.FreeIOQueues()
			c.FreeAdminQueue()
		}
	}()

	if err := c.connectAdmin(ctx); err != nil {
		close(c.eventDone)
		return nil, err
	}
	go c.eventLoop()

	if c.cap, err = c.PropertyGet(ctx, nvme.NVME_REG_CAP, true); err != nil {
		return nil, err
	}
	vs, err := c.PropertyGet(ctx, nvme.NVME_REG_VS, false)
	if err != nil {
		return nil, err
	}
	c.vs = uint32(vs)
	if err := c.Enable(ctx); err != nil {
		return nil, err
	}
	if c.id, err = c.IdentifyController(ctx); err != nil {
		return nil, err
	}
	if err := c.checkIdentify(); err != nil {
		return nil, err
	}
	if err := c.configureACRE(ctx); err != nil {
		return nil, err
	}
	if cfg.IsDiscovery() {
		if c.id.OAES&(1<<31) != 0 {
			if err := c.SetFeatures(ctx, nvme.NVME_FEAT_ASYNC_EVENT, nvme.NVME_AEN_CFG_DISC_CHANGE); err != nil {
				return nil, err
			}
		}
		c.submitAER()
		return c, nil
	}
	if err := c.identifyNVM(ctx); err != nil {
		return nil, err
	}
	if c.queueSize, err = c.ioQueueSize(); err != nil {
		return nil, err
	}
	if c.ioWanted, err = c.setQueueCount(ctx); err != nil {
		return nil, err
	}
	if c.id.OAES&nvme.NVME_AEN_CFG_NS_ATTR != 0 {
		if err := c.SetFeatures(ctx, nvme.NVME_FEAT_ASYNC_EVENT, nvme.NVME_AEN_CFG_NS_ATTR); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// ConnectIOQueues is the second phase of a connect: it makes the I/O queues
// and then submits the Asynchronous Event Request. Call it once, after
// ConnectAdmin; it returns promptly once ctx is cancelled. On error the
// queues made so far stay: release the association (Shutdown, WaitIdle,
// FreeIOQueues, FreeAdminQueue, or Close).
func (c *Controller) ConnectIOQueues(ctx context.Context) error {
	if c.ioConnectCalled {
		return errors.New("nvmeof: ConnectIOQueues called twice")
	}
	c.ioConnectCalled = true
	if c.cfg.IsDiscovery() {
		return nil // its AER is out already
	}
	cfg := &c.cfg
	// In-capsule write data: IOCCSZ*16 bytes of capsule less the command,
	// never more than one transfer (checkIdentify bounded IOCCSZ below).
	inCapsule := int(min(uint64(c.id.IOCCSZ)*16-nvme.CommandSize, uint64(c.maxTransfer)))
	for qid := 1; qid <= c.ioWanted; qid++ {
		q, err := c.dialQueue(ctx, c.queueConfig(uint16(qid), c.queueSize, cfg.IOTimeout))
		if err != nil {
			return err
		}
		c.io = append(c.io, &IOQueue{q})
		q.SetInCapsuleSize(inCapsule)
		if _, err := connectQueue(ctx, q, cfg.Host, cfg.SubsysNQN, c.cntlid, 0, cfg.AdminTimeout, cfg.Auth); err != nil {
			return err
		}
	}
	c.submitAER()
	return nil
}

// dialQueue opens a connection with cfg.Dial (TCP by default) and makes it
// a queue.
func (c *Controller) dialQueue(ctx context.Context, qc QueueConfig) (*Queue, error) {
	if c.cfg.Dial == nil {
		return DialQueue(ctx, c.cfg.Addr, qc)
	}
	conn, err := c.cfg.Dial(ctx, c.cfg.Addr)
	if err != nil {
		return nil, err
	}
	q, err := NewQueue(ctx, conn, qc)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return q, nil
}

// connectAdmin dials the admin queue and sends Connect; the response
// carries the controller ID (CNTLID) that every later check refers to.
func (c *Controller) connectAdmin(ctx context.Context) (err error) {
	cfg := &c.cfg
	if c.admin, err = c.dialQueue(ctx, c.queueConfig(0, AdminQueueSize, cfg.AdminTimeout)); err != nil {
		return err
	}
	c.cntlid, err = connectQueue(ctx, c.admin, cfg.Host, cfg.SubsysNQN, nvme.NVME_CNTLID_DYNAMIC, uint32(cfg.KATO/time.Millisecond), cfg.AdminTimeout, cfg.Auth)
	if err != nil {
		return err
	}
	// FFF0h..FFFFh are reserved (NVMe Base 2.0, section 5.27.1.1; FFFFh
	// is what the host sends to ask for a dynamic controller).
	if c.cntlid >= 0xfff0 {
		return fmt.Errorf("nvmeof: Connect response CNTLID %#x is reserved", c.cntlid)
	}
	return nil
}

// maxShift bounds 2^n byte sizes from the controller (MDTS, WZSL): one
// command's data length is a 32-bit SGL length (NVMe Base 2.0, SGL Data
// Block descriptor), and the ublk device's limits are 32-bit too. Larger
// values are not limits this host can reach.
const maxShift = 32

// pagesLimit is the size in bytes of a 2^units CAP.MPSMIN-page limit (MDTS,
// WZSL), and false when it exceeds 2^maxShift bytes. The sum is computed
// in int, so no 8-bit wrap (Linux: nvme_mps_to_sectors, check_shl_overflow).
func pagesLimit(units, mpsmin uint8) (uint64, bool) {
	shift := 12 + int(mpsmin) + int(units)
	if shift > maxShift {
		return 0, false
	}
	return 1 << shift, true
}

// checkIdentify bounds the Identify Controller values the host uses before
// anything uses them, as the Linux host does in nvme_init_identify and
// nvme_tcp_setup_ctrl; each error names the field.
func (c *Controller) checkIdentify() error {
	id := c.id
	if id.CNTLID != c.cntlid {
		return fmt.Errorf("nvmeof: Identify Controller CNTLID %d differs from the Connect response's %d", id.CNTLID, c.cntlid)
	}
	if id.SGLS&nvme.NVME_CTRL_SGLS_MASK == 0 {
		return fmt.Errorf("nvmeof: controller reports SGLS %#x: no SGL support, which NVMe over Fabrics requires", id.SGLS)
	}
	c.maxTransfer = c.cfg.MaxData
	if id.MDTS != 0 {
		mdts, ok := pagesLimit(id.MDTS, nvme.CAPMPSMin(c.cap))
		if !ok {
			return fmt.Errorf("nvmeof: controller reports MDTS %d (with CAP.MPSMIN %d): a transfer limit above 2^%d bytes is invalid",
				id.MDTS, nvme.CAPMPSMin(c.cap), maxShift)
		}
		c.maxTransfer = int(min(uint64(c.maxTransfer), mdts))
	}
	if c.cfg.IsDiscovery() {
		return nil
	}
	switch {
	case id.KAS == 0:
		return fmt.Errorf("nvmeof: controller reports KAS 0: keep-alive support is mandatory for NVMe over Fabrics")
	case id.ICDOFF != 0:
		return fmt.Errorf("nvmeof: controller reports ICDOFF %d: an in-capsule data offset is not supported", id.ICDOFF)
	case id.IOCCSZ < 4:
		return fmt.Errorf("nvmeof: controller reports IOCCSZ %d, less than a command", id.IOCCSZ)
	case id.IORCSZ < 1:
		return fmt.Errorf("nvmeof: controller reports IORCSZ %d, less than a completion", id.IORCSZ)
	}
	return nil
}

// ioQueueSize is the I/O queue size (entries; Connect's SQSIZE is one
// less): ControllerConfig.QueueSize bounded by CAP.MQES+1 and MAXCMD, as the
// Linux host clamps sqsize (nvme_tcp_setup_ctrl).
func (c *Controller) ioQueueSize() (int, error) {
	size := c.cfg.QueueSize
	mqes := int(nvme.CAPMQES(c.cap)) + 1
	if mqes < 2 {
		return 0, fmt.Errorf("nvmeof: controller reports CAP.MQES %d: a queue of one entry holds no command", mqes-1)
	}
	if size > mqes {
		c.log.Info("queue size clamped to the controller's CAP.MQES+1", "queue_size", size, "mqes", mqes-1)
		size = mqes
	}
	// MAXCMD 0: not reported.
	if maxcmd := int(c.id.MAXCMD); maxcmd != 0 && size > maxcmd {
		if maxcmd < 2 {
			return 0, fmt.Errorf("nvmeof: controller reports MAXCMD %d: a queue of one entry holds no command", maxcmd)
		}
		c.log.Info("queue size clamped to the controller's MAXCMD", "queue_size", size, "maxcmd", maxcmd)
		size = maxcmd
	}
	return size, nil
}

// setQueueCount asks for ControllerConfig.IOQueues I/O queues (Set
// Features Number of Queues, both counts 0's based) and returns how many
// to create: never more than asked for, whatever the result says
// (nvme_set_queue_count).
func (c *Controller) setQueueCount(ctx context.Context) (int, error) {
	n := uint32(c.cfg.IOQueues - 1)
	res, err := c.SetFeaturesResult(ctx, nvme.NVME_FEAT_NUM_QUEUES, n|n<<16)
	if err != nil {
		return 0, err
	}
	nsqa, ncqa := int(res&0xffff), int(res>>16)
	return min(c.cfg.IOQueues, min(nsqa, ncqa)+1), nil
}

// identifyNVM reads the NVM Command Set limits (Identify CNS 06h, CSI 0:
// WZSL, DMRSL, DMRL) when the controller supports Write Zeroes or Dataset
// Management (nvme_init_non_mdts_limits). A controller that answers with
// an NVMe status does not know the structure: no limits beyond MDTS then.
func (c *Controller) identifyNVM(ctx context.Context) error {
	if c.id.ONCS&(nvme.NVME_CTRL_ONCS_WRITE_ZEROES|nvme.NVME_CTRL_ONCS_DSM) == 0 {
		return nil
	}
	b, err := c.identifyCSI(ctx, nvme.NVME_ID_CNS_CS_CTRL, 0, nvme.NVME_CSI_NVM)
	var st nvme.Status
	if errors.As(err, &st) {
		c.log.Debug("no NVM command set identify data", "err", err)
		return nil
	}
	if err != nil {
		return err
	}
	nvm, err := nvme.ParseIdentifyControllerNVM(b)
	if err != nil {
		return err
	}
	c.nvm = *nvm
	return nil
}

// configureACRE enables Advanced Command Retry (Set Features Host Behavior
// Support, ACRE = 1) when the controller reports a Command Retry Delay
// (CRDT1 non-zero), as nvme_configure_acre. A controller that refuses with
// an NVMe status keeps working without it.
func (c *Controller) configureACRE(ctx context.Context) error {
	if c.id.CRDT[0] == 0 {
		return nil
	}
	data := make([]byte, nvme.HostBehaviorSize)
	data[0] = nvme.NVME_ENABLE_ACRE
	_, err := c.setFeaturesData(ctx, nvme.NVME_FEAT_HOST_BEHAVIOR, 0, data)
	var st nvme.Status
	if errors.As(err, &st) {
		c.log.Info("controller refused Advanced Command Retry", "err", err)
		return nil
	}
	if err != nil {
		return err
	}
	c.acre = true
	return nil
}

func (c *Controller) queueConfig(qid uint16, size int, timeout time.Duration) QueueConfig {
	return QueueConfig{
		QID: qid, Size: size, HeaderDigest: c.cfg.HeaderDigest, DataDigest: c.cfg.DataDigest,
		Timeout: timeout, MaxData: max(c.cfg.MaxData, 64<<10), Traffic: &c.traffic,
		// The controller's logger: a queue's lines name the controller
		// (subsys, addr) as well as the queue (qid).
		Logger: c.log,
		OnFailure: func(q *Queue, err error) {
			if c.cfg.OnFailure != nil {
				c.cfg.OnFailure(err)
			}
		},
	}
}

// CNTLID is the controller ID the subsystem allocated.
func (c *Controller) CNTLID() uint16 { return c.cntlid }

// CAP and VS are the controller's properties read at connect.
func (c *Controller) CAP() uint64 { return c.cap }
func (c *Controller) VS() uint32  { return c.vs }

// Identify is the Identify Controller data read at connect.
func (c *Controller) Identify() *nvme.IdentifyController { return c.id }

// AdminQueue is the admin queue.
func (c *Controller) AdminQueue() *Queue { return c.admin }

// IOQueues are the I/O queues, index i has QID i+1.
func (c *Controller) IOQueues() []*IOQueue { return c.io }

// KATO is the keep-alive timeout sent in Connect; zero: none.
func (c *Controller) KATO() time.Duration { return c.cfg.KATO }

// TBKAS reports traffic-based keep-alive support (CTRATT bit 14).
func (c *Controller) TBKAS() bool { return c.id != nil && c.id.CTRATT&nvme.NVME_CTRL_CTRATT_TBKAS != 0 }

// Traffic counts the commands of all queues, for traffic-based keep-alive
// (keepalive.Traffic).
func (c *Controller) Traffic() *Traffic { return &c.traffic }

// MaxTransfer is the largest data transfer of one command: MDTS, bounded
// by ControllerConfig.MaxData.
func (c *Controller) MaxTransfer() int {
	if c.maxTransfer > 0 {
		return c.maxTransfer
	}
	return c.cfg.MaxData
}

// QueueSize is the I/O queue size negotiated: ControllerConfig.QueueSize
// bounded by CAP.MQES+1 and MAXCMD. Zero for a discovery controller.
func (c *Controller) QueueSize() int { return c.queueSize }

// NVMLimits is the NVM Command Set Identify Controller data (CNS 06h):
// WZSL, DMRSL, DMRL; zero fields where the controller reports none.
func (c *Controller) NVMLimits() nvme.IdentifyControllerNVM { return c.nvm }

// CRDT are the Command Retry Delay Times the controller reported (Identify
// Controller CRDT1..CRDT3): the delay before retrying a command whose
// completion has CRD 1, 2 or 3 (nvme_retry_req). Zero when not reported.
func (c *Controller) CRDT() [3]time.Duration {
	var d [3]time.Duration
	if c.id != nil {
		for i, t := range c.id.CRDT {
			d[i] = time.Duration(t) * 100 * time.Millisecond
		}
	}
	return d
}

// ACRE reports whether Advanced Command Retry is enabled (Host Behavior
// Support accepted): the controller may then set CRD in completions.
func (c *Controller) ACRE() bool { return c.acre }

// adminDo runs one admin command synchronously.
func (c *Controller) adminDo(ctx context.Context, req *Request) error {
	if req.Timeout == 0 {
		req.Timeout = c.cfg.AdminTimeout
	}
	return c.admin.Do(ctx, req)
}

// PropertyGet reads a controller property (CAP, VS, CC, CSTS).
func (c *Controller) PropertyGet(ctx context.Context, offset uint32, size8 bool) (uint64, error) {
	req := &Request{}
	req.Cmd.SetPropertyGet(offset, size8)
	if err := c.adminDo(ctx, req); err != nil {
		return 0, fmt.Errorf("nvmeof: property get %#x: %w", offset, err)
	}
	if !size8 {
		return req.Result & 0xffffffff, nil
	}
	return req.Result, nil
}

// PropertySet writes a controller property.
func (c *Controller) PropertySet(ctx context.Context, offset uint32, size8 bool, value uint64) error {
	req := &Request{}
	req.Cmd.SetPropertySet(offset, size8, value)
	if err := c.adminDo(ctx, req); err != nil {
		return fmt.Errorf("nvmeof: property set %#x: %w", offset, err)
	}
	return nil
}

// readyTimeout is CAP.TO (500 ms units), at least one second.
func (c *Controller) readyTimeout() time.Duration {
	return max(time.Duration(nvme.CAPTimeout(c.cap))*500*time.Millisecond, time.Second)
}

// waitCSTS polls CSTS until (csts & mask) == want (nvme_wait_ready).
func (c *Controller) waitCSTS(ctx context.Context, mask, want uint32, timeout time.Duration, what string) error {
	deadline := time.Now().Add(timeout)
	for {
		csts, err := c.PropertyGet(ctx, nvme.NVME_REG_CSTS, false)
		if err != nil {
			return err
		}
		if csts == 0xffffffff || uint32(csts)&nvme.NVME_CSTS_CFS != 0 {
			return fmt.Errorf("nvmeof: controller fatal status while waiting for %s (csts %#x)", what, csts)
		}
		if uint32(csts)&mask == want {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("nvmeof: controller not %s after %v (csts %#x)", what, timeout, csts)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// Enable sets CC.EN and waits for CSTS.RDY (nvme_enable_ctrl).
func (c *Controller) Enable(ctx context.Context) error {
	if min := nvme.CAPMPSMin(c.cap); min > 0 {
		return fmt.Errorf("nvmeof: controller reports CAP.MPSMIN %d: it needs pages of at least %d bytes, the host uses 4096", min, 1<<(12+min))
	}
	cc := uint64(nvme.NVME_CC_CSS_NVM | 0<<nvme.NVME_CC_MPS_SHIFT | nvme.NVME_CC_AMS_RR |
		nvme.NVME_CC_SHN_NONE | nvme.NVME_CC_IOSQES | nvme.NVME_CC_IOCQES | nvme.NVME_CC_ENABLE)
	if err := c.PropertySet(ctx, nvme.NVME_REG_CC, false, cc); err != nil {
		return err
	}
	return c.waitCSTS(ctx, nvme.NVME_CSTS_RDY, nvme.NVME_CSTS_RDY, c.readyTimeout(), "ready")
}

// Shutdown timeouts (the Linux host's shutdown_timeout module parameter,
// 5 s, and its ceiling for RTD3E, 60 s).
const (
	DefaultShutdownTimeout = 5 * time.Second
	MaxShutdownTimeout     = 60 * time.Second
)

// ShutdownTimeout is how long ShutdownController waits for CSTS.SHST
// complete: the controller's RTD3E (Identify Controller, microseconds,
// whole seconds), within DefaultShutdownTimeout and MaxShutdownTimeout, as
// nvme_init_identify sets shutdown_timeout.
func (c *Controller) ShutdownTimeout() time.Duration {
	if c.id == nil || c.id.RTD3E == 0 {
		return DefaultShutdownTimeout
	}
	d := time.Duration(c.id.RTD3E/1e6) * time.Second
	return min(max(d, DefaultShutdownTimeout), MaxShutdownTimeout)
}

// ShutdownController is the orderly shutdown notification: CC.SHN normal,
// then wait for CSTS.SHST complete (nvme_disable_ctrl(ctrl, true)), for at
// most ShutdownTimeout in all. The queues stay up; tear them down
// afterwards. The controller may close the I/O queues from the
// notification on (SPDK's nvmf_tgt does, Linux nvmet does not): that is
// logged at Info and is no failure (ControllerConfig.OnFailure is not
// called for it). Submit no I/O from here on.
func (c *Controller) ShutdownController(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, c.ShutdownTimeout())
	defer cancel()
	cc, err := c.PropertyGet(ctx, nvme.NVME_REG_CC, false)
	if err != nil {
		return err
	}
	// Before the Property Set: nvmf_tgt may close them before its
	// response arrives.
	for _, q := range c.io {
		q.closeExpected.Store(true)
	}
	cc = cc&^nvme.NVME_CC_SHN_MASK | nvme.NVME_CC_SHN_NORMAL
	if err := c.PropertySet(ctx, nvme.NVME_REG_CC, false, cc); err != nil {
		return err
	}
	return c.waitCSTS(ctx, nvme.NVME_CSTS_SHST_MASK, nvme.NVME_CSTS_SHST_CMPLT, c.ShutdownTimeout(), "shut down")
}

// identify reads a 4096-byte Identify structure.
func (c *Controller) identify(ctx context.Context, cns uint8, nsid uint32) ([]byte, error) {
	return c.identifyCSI(ctx, cns, nsid, 0)
}

// identifyCSI reads a 4096-byte Identify structure of an I/O command set
// (CDW11 bits 31:24).
func (c *Controller) identifyCSI(ctx context.Context, cns uint8, nsid uint32, csi uint8) ([]byte, error) {
	req := &Request{Data: make([]byte, nvme.IdentifySize)}
	req.Cmd.SetOpcode(nvme.NVME_ADMIN_IDENTIFY)
	req.Cmd.SetNSID(nsid)
	req.Cmd.SetCDW(10, uint32(cns))
	req.Cmd.SetCDW(11, uint32(csi)<<24)
	if err := c.adminDo(ctx, req); err != nil {
		return nil, fmt.Errorf("nvmeof: identify cns %#x nsid %d: %w", cns, nsid, err)
	}
	return req.Data, nil
}

// IdentifyController sends Identify CNS 01h.
func (c *Controller) IdentifyController(ctx context.Context) (*nvme.IdentifyController, error) {
	b, err := c.identify(ctx, nvme.NVME_ID_CNS_CTRL, 0)
	if err != nil {
		return nil, err
	}
	return nvme.ParseIdentifyController(b)
}

// IdentifyNamespace sends Identify CNS 00h.
func (c *Controller) IdentifyNamespace(ctx context.Context, nsid uint32) (*nvme.IdentifyNamespace, error) {
	b, err := c.identify(ctx, nvme.NVME_ID_CNS_NS, nsid)
	if err != nil {
		return nil, err
	}
	return nvme.ParseIdentifyNamespace(b)
}

// maxActiveNamespaces bounds the active namespace list a controller can
// make the host read and keep: 64 pages of 1024 IDs.
const maxActiveNamespaces = 1 << 16

// ActiveNamespaces lists the active namespace IDs (Identify CNS 02h),
// following the list past 1024 entries. Every ID is at most NN (the
// largest valid NSID) where the controller reports NN, and there are at
// most maxActiveNamespaces.
func (c *Controller) ActiveNamespaces(ctx context.Context) ([]uint32, error) {
	var all []uint32
	var after uint32
	for {
		b, err := c.identify(ctx, nvme.NVME_ID_CNS_NS_ACTIVE_LIST, after)
		if err != nil {
			return nil, err
		}
		ids, err := nvme.ParseNamespaceList(b)
		if err != nil {
			return nil, err
		}
		if len(ids) > 0 && ids[0] <= after {
			return nil, fmt.Errorf("nvmeof: active namespace list went backwards (%d after %d)", ids[0], after)
		}
		if nn := c.id.NN; len(ids) > 0 && nn != 0 && ids[len(ids)-1] > nn {
			return nil, fmt.Errorf("nvmeof: active namespace list has NSID %d, above NN %d", ids[len(ids)-1], nn)
		}
		if len(all)+len(ids) > maxActiveNamespaces {
			return nil, fmt.Errorf("nvmeof: active namespace list has more than %d namespaces", maxActiveNamespaces)
		}
		all = append(all, ids...)
		if len(ids) < nvme.IdentifySize/4 {
			return all, nil
		}
		after = ids[len(ids)-1]
	}
}

// NamespaceIDs reads the Namespace Identification Descriptor list (CNS
// 03h).
func (c *Controller) NamespaceIDs(ctx context.Context, nsid uint32) (nvme.NamespaceIDs, error) {
	b, err := c.identify(ctx, nvme.NVME_ID_CNS_NS_DESC_LIST, nsid)
	if err != nil {
		return nvme.NamespaceIDs{}, err
	}
	return nvme.ParseNamespaceIDs(b)
}

// SetFeatures sets a feature with cdw11 = value.
func (c *Controller) SetFeatures(ctx context.Context, fid uint8, value uint32) error {
	_, err := c.SetFeaturesResult(ctx, fid, value)
	return err
}

// SetFeaturesResult sets a feature and returns completion dword 0.
func (c *Controller) SetFeaturesResult(ctx context.Context, fid uint8, value uint32) (uint32, error) {
	return c.setFeaturesData(ctx, fid, value, nil)
}

// setFeaturesData sets a feature that takes a data buffer (host to
// controller) as well as cdw11.
func (c *Controller) setFeaturesData(ctx context.Context, fid uint8, value uint32, data []byte) (uint32, error) {
	req := &Request{Data: data, Write: len(data) > 0}
	req.Cmd.SetOpcode(nvme.NVME_ADMIN_SET_FEATURES)
	req.Cmd.SetCDW(10, uint32(fid))
	req.Cmd.SetCDW(11, value)
	if err := c.adminDo(ctx, req); err != nil {
		return 0, fmt.Errorf("nvmeof: set features %#x: %w", fid, err)
	}
	return uint32(req.Result), nil
}

// KeepAlive sends one Keep Alive command. If ctx ends first it returns
// ctx.Err() at once; the command then stays accounted to the admin queue
// until it completes or the queue is shut down.
func (c *Controller) KeepAlive(ctx context.Context) error {
	req := &Request{Timeout: c.cfg.KATO}
	if req.Timeout <= 0 {
		req.Timeout = c.cfg.AdminTimeout
	}
	req.Cmd.SetOpcode(nvme.NVME_ADMIN_KEEP_ALIVE)
	return c.admin.Do(ctx, req)
}

// GetLogPage reads length bytes of log page lid from offset (a multiple
// of 4), in transfers of at most MaxTransfer bytes.
func (c *Controller) GetLogPage(ctx context.Context, lid uint8, nsid uint32, offset uint64, length int) ([]byte, error) {
	if length <= 0 || length%4 != 0 || offset%4 != 0 {
		return nil, fmt.Errorf("nvmeof: get log page %#x: offset %d length %d not dword multiples", lid, offset, length)
	}
	// MaxTransfer is at least 4096 (MaxData and MDTS are bounded at
	// connect), so every round moves at least a page.
	chunk := c.MaxTransfer() &^ 3
	if chunk <= 0 {
		return nil, fmt.Errorf("nvmeof: get log page %#x: transfer limit %d bytes", lid, c.MaxTransfer())
	}
	out := make([]byte, length)
	for done := 0; done < length; {
		n := min(chunk, length-done)
		req := &Request{Data: out[done : done+n]}
		numd := uint32(n/4 - 1)
		off := offset + uint64(done)
		req.Cmd.SetOpcode(nvme.NVME_ADMIN_GET_LOG_PAGE)
		req.Cmd.SetNSID(nsid)
		req.Cmd.SetCDW(10, uint32(lid)|numd<<16)
		req.Cmd.SetCDW(11, numd>>16)
		req.Cmd.SetCDW(12, uint32(off))
		req.Cmd.SetCDW(13, uint32(off>>32))
		if err := c.adminDo(ctx, req); err != nil {
			return nil, fmt.Errorf("nvmeof: get log page %#x at %d: %w", lid, off, err)
		}
		done += n
	}
	return out, nil
}

// maxDiscoveryRetries is how often the discovery log is re-read when its
// generation counter changed while reading (MAX_DISC_RETRIES).
const maxDiscoveryRetries = 10

// ErrDiscoveryLogChanging is returned when the discovery log kept changing.
var ErrDiscoveryLogChanging = errors.New("nvmeof: discovery log kept changing while being read")

// DiscoveryLog reads the whole discovery log (nvmf_get_log_page_discovery
// in nvme-cli): the header for the record count, the records, then the
// header again; if the generation counter changed, start over.
func (c *Controller) DiscoveryLog(ctx context.Context) ([]nvme.DiscoveryLogEntry, error) {
	for range maxDiscoveryRetries {
		b, err := c.GetLogPage(ctx, nvme.NVME_LOG_DISC, 0, 0, nvme.DiscoveryLogHeaderSize)
		if err != nil {
			return nil, err
		}
		h, err := nvme.ParseDiscoveryLogHeader(b)
		if err != nil {
			return nil, err
		}
		const maxRecords = 1024
		if h.NumRec > maxRecords {
			return nil, fmt.Errorf("nvmeof: discovery log claims %d records", h.NumRec)
		}
		var entries []nvme.DiscoveryLogEntry
		if h.NumRec > 0 {
			b, err = c.GetLogPage(ctx, nvme.NVME_LOG_DISC, 0, nvme.DiscoveryLogHeaderSize, int(h.NumRec)*nvme.DiscoveryLogEntrySize)
			if err != nil {
				return nil, err
			}
			for i := range int(h.NumRec) {
				e, err := nvme.ParseDiscoveryLogEntry(b[i*nvme.DiscoveryLogEntrySize:])
				if err != nil {
					return nil, err
				}
				entries = append(entries, e)
			}
		}
		b, err = c.GetLogPage(ctx, nvme.NVME_LOG_DISC, 0, 0, nvme.DiscoveryLogHeaderSize)
		if err != nil {
			return nil, err
		}
		h2, err := nvme.ParseDiscoveryLogHeader(b)
		if err != nil {
			return nil, err
		}
		if h2.GenCtr == h.GenCtr && h2.NumRec == h.NumRec {
			return entries, nil
		}
	}
	return nil, ErrDiscoveryLogChanging
}

// Discover connects to the discovery controller at addr, reads the
// discovery log and disconnects.
func Discover(ctx context.Context, addr string, host HostIdentity) ([]nvme.DiscoveryLogEntry, error) {
	c, err := Connect(ctx, ControllerConfig{Addr: addr, SubsysNQN: nvme.NVME_DISC_SUBSYS_NAME, Host: host, NoKeepAlive: true})
	if err != nil {
		return nil, err
	}
	defer c.Close()
	entries, err := c.DiscoveryLog(ctx)
	if err != nil {
		return nil, err
	}
	c.ShutdownController(ctx)
	return entries, nil
}

// submitAER sends one Asynchronous Event Request; its completion goes to
// the event goroutine, never handled on the queue's goroutine (handling
// issues admin commands, whose completions that goroutine delivers).
func (c *Controller) submitAER() {
	req := &Request{Timeout: NoTimeout}
	req.Cmd.SetOpcode(nvme.NVME_ADMIN_ASYNC_EVENT)
	err := c.admin.Submit(req, func(err error) {
		// events has room for one: only one AER is outstanding.
		c.events <- aerCompletion{result: req.Result, err: err}
	})
	if err != nil {
		c.events <- aerCompletion{err: err}
	}
}

// eventLoop handles AER completions and resubmits the AER.
func (c *Controller) eventLoop() {
	defer close(c.eventDone)
	for {
		select {
		case <-c.eventStop:
			return
		case a := <-c.events:
			if a.err != nil {
				var st nvme.Status
				if errors.As(a.err, &st) {
					c.log.Warn("asynchronous event request failed", "err", a.err)
				}
				// A failed queue: the controller is going away.
				return
			}
			ev := AsyncEvent{Type: uint8(a.result & 7), Info: uint8(a.result >> 8), LogPage: uint8(a.result >> 16)}
			ctx, cancel := context.WithTimeout(context.Background(), c.cfg.AdminTimeout)
			if ev.Type == nvme.NVME_AER_TYPE_NOTICE && ev.Info == nvme.NVME_AER_NOTICE_NS_CHANGED {
				// Reading the log clears the event (nvme_clear_changed_ns_log).
				if b, err := c.GetLogPage(ctx, nvme.NVME_LOG_CHANGED_NS, nvme.NVME_NSID_ALL, 0, 4096); err == nil {
					for i := 0; i+4 <= len(b); i += 4 {
						id := binary.LittleEndian.Uint32(b[i:])
						if id == 0 {
							break
						}
						ev.ChangedNamespaces = append(ev.ChangedNamespaces, id)
					}
				}
			}
			cancel()
			c.log.Info("asynchronous event", "event", ev.String())
			if c.cfg.OnEvent != nil {
				c.cfg.OnEvent(ev)
			}
			select {
			case <-c.eventStop:
				return
			default:
			}
			c.submitAER()
		}
	}
}

// Teardown, in the order lifecycle calls it (docs/design.md, teardown
// steps 5 to 8; ShutdownController above is step 4).

// Shutdown shuts every queue's socket down: in-flight commands fail with a
// *QueueError, nothing new can be sent. It does not wait.
func (c *Controller) Shutdown() {
	c.stopOnce.Do(func() { close(c.eventStop) })
	for _, q := range c.io {
		q.Shutdown()
	}
	if c.admin != nil {
		c.admin.Shutdown()
	}
}

// WaitIdle waits until every completion handler of every queue has
// returned, the event goroutine has exited and no goroutine touches a
// queue any more. Call it after Shutdown.
func (c *Controller) WaitIdle() {
	<-c.eventDone
	for _, q := range c.io {
		q.Wait()
	}
	if c.admin != nil {
		c.admin.Wait()
	}
}

// FreeIOQueues frees the I/O queues. Call it after WaitIdle.
func (c *Controller) FreeIOQueues() {
	for _, q := range c.io {
		q.Close()
	}
}

// FreeAdminQueue frees the admin queue. Call it last.
func (c *Controller) FreeAdminQueue() {
	if c.admin != nil {
		c.admin.Close()
	}
}

// Close is Shutdown, WaitIdle, FreeIOQueues and FreeAdminQueue in order.
func (c *Controller) Close() error {
	c.Shutdown()
	c.WaitIdle()
	c.FreeIOQueues()
	c.FreeAdminQueue()
	return nil
}
