// Package target is an in-process NVMe/TCP target (controller side): a
// discovery subsystem and NVM subsystems with memory- or file-backed
// namespaces, several queues per controller, header and data digests,
// keep-alive timeout enforcement, and fault injection for tests.
//
// It follows the Linux nvmet-tcp target (drivers/nvme/target/tcp.c,
// core.c, fabrics-cmd.c, discovery.c) in behaviour where a host could tell
// the difference, and is written for tests and for `ublk-nvmeof serve`, not
// for speed: each connection is served by one goroutine that executes its
// commands in order.
//
// Goroutines: the Target owns every goroutine it starts (accept loops,
// connection readers, delayed responses, keep-alive timers) in one
// WaitGroup; Close stops them all and waits.
package target

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sort"
	"sync"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/auth"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// Config configures a Target. Zero values pick the defaults in brackets.
type Config struct {
	// MaxQueueSize is CAP.MQES+1 [1024]; a Connect with a larger queue
	// (admin or I/O, as nvmet_install_queue) is refused.
	MaxQueueSize int
	// MaxCmd is Identify Controller MAXCMD: at most this many commands
	// outstanding on one I/O queue [MaxQueueSize].
	MaxCmd int
	// MaxIOQueues is how many I/O queues a controller may have [8].
	MaxIOQueues int
	// MDTS is Identify Controller MDTS (2^MDTS 4 KiB pages) [8: 1 MiB].
	// Values past 12 are reported as they are (a host must refuse or
	// clamp them) while the target accepts at most 16 MiB.
	MDTS uint8
	// NoMDTS reports MDTS 0, no transfer size limit; the target still
	// accepts at most 16 MiB in one command.
	NoMDTS bool
	// InCapsuleDataSize is the largest in-capsule write data on I/O queues
	// (IOCCSZ*16-64) [8192]; NoInCapsuleData reports IOCCSZ at its
	// minimum, 4 (the 64-byte command alone).
	InCapsuleDataSize int
	// MaxH2CData is ICResp MAXH2CDATA [131072]; a longer H2CData is a
	// protocol error.
	MaxH2CData uint32
	// CPDA is the ICResp controller PDU data alignment [0]; H2C data at
	// a PDO that is not a multiple of (CPDA+1)*4 is a protocol error.
	CPDA uint8
	// CRDT are Identify Controller CRDT1..3, Command Retry Delay Times
	// in 100 ms units, which the CRD field of a status (Fault.Status)
	// selects once the host enabled Advanced Command Retry.
	CRDT [3]uint16
	// MaxWriteBuffer bounds the write data one connection holds while it
	// waits for H2CData [4 MiB, and at least one maximum transfer]:
	// further writes wait for their R2T with nothing allocated.
	MaxWriteBuffer int64
	// MaxConnections, if not 0, bounds the open connections: one more is
	// closed as soon as it is accepted.
	MaxConnections int
	// C2HChunk bounds the data in one C2HData PDU [131072].
	C2HChunk int
	// C2HSuccess sends reads' last C2HData with the SUCCESS flag instead of
	// a CapsuleResp (as nvmet does when SQ flow control is disabled).
	C2HSuccess bool
	// TBKAS advertises traffic-based keep-alive: any command resets the
	// keep-alive timer, not only Keep Alive.
	TBKAS bool
	// AllowedHosts, if not empty, is the list of host NQNs that may
	// connect to NVM subsystems.
	AllowedHosts []string
	// Auth, when set, gives the DH-HMAC-CHAP settings for a host
	// connecting to a subsystem (nil: no authentication): every queue of
	// such a host must authenticate after Connect (auth.go).
	Auth   func(hostNQN, subsysNQN string) *auth.ControllerConfig
	Logger *slog.Logger
}

// Target is an in-process NVMe/TCP target.
type Target struct {
	cfg Config
	log *slog.Logger

	mu         sync.Mutex
	closed     bool
	subsystems map[string]*Subsystem
	listeners  map[net.Listener]uint16 // port ID
	nextPort   uint16
	conns      map[*conn]struct{}
	ctrls      map[uint16]*controller
	nextCNTLID uint16
	discGen    uint64
	faults     []*faultEntry
	violations []string // the first maxViolations protocol violations by hosts
	nViolation int

	wg sync.WaitGroup
}

// NoInCapsuleData as Config.InCapsuleDataSize reports IOCCSZ 4: commands
// only, all write data through R2T.
const NoInCapsuleData = -1

// maxTransferCap bounds one command's data whatever MDTS says, so that
// no value from a host sizes an allocation beyond it.
const maxTransferCap = 16 << 20

const maxViolations = 64

// New returns a Target with a discovery subsystem and no NVM subsystems.
func New(cfg Config) *Target {
	if cfg.MaxQueueSize == 0 {
		cfg.MaxQueueSize = 1024
	}
	if cfg.MaxIOQueues == 0 {
		cfg.MaxIOQueues = 8
	}
	if cfg.MDTS == 0 {
		cfg.MDTS = 8
	}
	if cfg.NoMDTS {
		cfg.MDTS = 0
	}
	if cfg.MaxCmd == 0 {
		cfg.MaxCmd = cfg.MaxQueueSize
	}
	if cfg.MaxWriteBuffer == 0 {
		cfg.MaxWriteBuffer = 4 << 20
	}
	if cfg.InCapsuleDataSize == 0 {
		cfg.InCapsuleDataSize = 8192
	}
	if cfg.MaxH2CData == 0 {
		cfg.MaxH2CData = 128 << 10
	}
	if cfg.C2HChunk == 0 {
		cfg.C2HChunk = 128 << 10
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Target{
		cfg:        cfg,
		log:        cfg.Logger,
		subsystems: map[string]*Subsystem{},
		listeners:  map[net.Listener]uint16{},
		conns:      map[*conn]struct{}{},
		ctrls:      map[uint16]*controller{},
		nextCNTLID: 1,
		nextPort:   1,
	}
}

// Subsystem is an NVM subsystem with its namespaces.
type Subsystem struct {
	t          *Target
	nqn        string
	serial     string
	namespaces map[uint32]*Namespace // guarded by t.mu
}

// NamespaceConfig describes a namespace to add.
type NamespaceConfig struct {
	NSID    uint32
	Backend Backend
	// BlockShift is log2 of the LBA size [9].
	BlockShift uint8
	NGUID      [16]byte
	EUI64      [8]byte
	UUID       [16]byte
}

// Namespace is a namespace of a subsystem.
type Namespace struct {
	cfg    NamespaceConfig
	blocks uint64
}

// AddSubsystem adds an NVM subsystem. The discovery log changes.
func (t *Target) AddSubsystem(nqn string) (*Subsystem, error) {
	if nqn == "" || len(nqn) > nvme.NVMF_NQN_SIZE || nqn == nvme.NVME_DISC_SUBSYS_NAME {
		return nil, fmt.Errorf("target: invalid subsystem NQN %q", nqn)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.subsystems[nqn]; ok {
		return nil, fmt.Errorf("target: subsystem %q exists", nqn)
	}
	s := &Subsystem{t: t, nqn: nqn, serial: fmt.Sprintf("%016x", len(t.subsystems)+1), namespaces: map[uint32]*Namespace{}}
	t.subsystems[nqn] = s
	notify := t.discoveryChangedLocked()
	t.mu.Unlock()
	notifyDiscoveryChanged(notify)
	t.mu.Lock()
	return s, nil
}

// RemoveSubsystem removes an NVM subsystem and deletes its controllers.
func (t *Target) RemoveSubsystem(nqn string) {
	t.mu.Lock()
	s := t.subsystems[nqn]
	delete(t.subsystems, nqn)
	var del []*controller
	for _, c := range t.ctrls {
		if c.subsys == s && s != nil {
			del = append(del, c)
		}
	}
	notify := t.discoveryChangedLocked()
	t.mu.Unlock()
	notifyDiscoveryChanged(notify)
	for _, c := range del {
		c.delete("subsystem removed")
	}
}

// AddNamespace adds a namespace; controllers of the subsystem get a
// Namespace Attribute Changed event.
func (s *Subsystem) AddNamespace(cfg NamespaceConfig) error {
	if cfg.NSID == 0 || cfg.NSID == nvme.NVME_NSID_ALL {
		return fmt.Errorf("target: invalid NSID %d", cfg.NSID)
	}
	if cfg.BlockShift == 0 {
		cfg.BlockShift = 9
	}
	if cfg.BlockShift < 9 || cfg.BlockShift > 16 {
		return fmt.Errorf("target: block shift %d out of range", cfg.BlockShift)
	}
	if cfg.Backend == nil {
		return errors.New("target: namespace without backend")
	}
	ns := &Namespace{cfg: cfg, blocks: uint64(cfg.Backend.Size()) >> cfg.BlockShift}
	s.t.mu.Lock()
	if _, ok := s.namespaces[cfg.NSID]; ok {
		s.t.mu.Unlock()
		return fmt.Errorf("target: NSID %d exists", cfg.NSID)
	}
	s.namespaces[cfg.NSID] = ns
	ctrls := s.t.controllersLocked(s)
	s.t.mu.Unlock()
	for _, c := range ctrls {
		c.nsChanged(cfg.NSID)
	}
	return nil
}

// RemoveNamespace removes a namespace (hot-remove); commands to it fail
// with Invalid Namespace and controllers get a Namespace Attribute Changed
// event.
func (s *Subsystem) RemoveNamespace(nsid uint32) {
	s.t.mu.Lock()
	delete(s.namespaces, nsid)
	ctrls := s.t.controllersLocked(s)
	s.t.mu.Unlock()
	for _, c := range ctrls {
		c.nsChanged(nsid)
	}
}

// ResizeNamespace sets the namespace's size to blocks (within its
// backend) and sends controllers a Namespace Attribute Changed event, as
// nvmet's revalidate_size does after its backing file changed size.
func (s *Subsystem) ResizeNamespace(nsid uint32, blocks uint64) error {
	s.t.mu.Lock()
	old := s.namespaces[nsid]
	if old == nil {
		s.t.mu.Unlock()
		return fmt.Errorf("target: no namespace %d", nsid)
	}
	if blocks == 0 || blocks > uint64(old.cfg.Backend.Size())>>old.cfg.BlockShift {
		s.t.mu.Unlock()
		return fmt.Errorf("target: namespace %d: %d blocks do not fit its backend", nsid, blocks)
	}
	// A new Namespace: commands already running keep the one they
	// looked up.
	s.namespaces[nsid] = &Namespace{cfg: old.cfg, blocks: blocks}
	ctrls := s.t.controllersLocked(s)
	s.t.mu.Unlock()
	for _, c := range ctrls {
		c.nsChanged(nsid)
	}
	return nil
}

// NQN is the subsystem's NQN.
func (s *Subsystem) NQN() string { return s.nqn }

func (t *Target) controllersLocked(s *Subsystem) []*controller {
	var out []*controller
	for _, c := range t.ctrls {
		if c.subsys == s {
			out = append(out, c)
		}
	}
	return out
}

// discoveryChangedLocked bumps the discovery log generation and returns
// the discovery controllers to notify once t.mu is released.
func (t *Target) discoveryChangedLocked() []*controller {
	t.discGen++
	var out []*controller
	for _, c := range t.ctrls {
		if c.subsys == nil {
			out = append(out, c)
		}
	}
	return out
}

func notifyDiscoveryChanged(ctrls []*controller) {
	for _, c := range ctrls {
		c.event(nvme.NVME_AER_TYPE_NOTICE, nvme.NVME_AER_NOTICE_DISC_CHANGED, nvme.NVME_LOG_DISC)
	}
}

// Listen starts accepting connections on addr ("127.0.0.1:0" picks a
// port) and returns the listening address. Each listener is a port in the
// discovery log.
func (t *Target) Listen(addr string) (net.Addr, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		l.Close()
		return nil, errors.New("target: closed")
	}
	t.listeners[l] = t.nextPort
	t.nextPort++
	notify := t.discoveryChangedLocked()
	t.wg.Add(1)
	t.mu.Unlock()
	notifyDiscoveryChanged(notify)
	go t.accept(l)
	return l.Addr(), nil
}

func (t *Target) accept(l net.Listener) {
	defer t.wg.Done()
	for {
		nc, err := l.Accept()
		if err != nil {
			return
		}
		t.mu.Lock()
		if t.closed {
			t.mu.Unlock()
			nc.Close()
			return
		}
		if t.cfg.MaxConnections > 0 && len(t.conns) >= t.cfg.MaxConnections {
			t.mu.Unlock()
			t.log.Warn("target: connection refused, at the connection limit", "remote", nc.RemoteAddr(), "limit", t.cfg.MaxConnections)
			nc.Close()
			continue
		}
		c := newConn(t, nc)
		t.conns[c] = struct{}{}
		t.wg.Add(1)
		t.mu.Unlock()
		go c.serve()
	}
}

// Close stops listening, closes every connection, deletes every
// controller and waits for every goroutine of the target.
func (t *Target) Close() error {
	t.mu.Lock()
	t.closed = true
	for l := range t.listeners {
		l.Close()
	}
	t.listeners = map[net.Listener]uint16{}
	var conns []*conn
	for c := range t.conns {
		conns = append(conns, c)
	}
	var ctrls []*controller
	for _, c := range t.ctrls {
		ctrls = append(ctrls, c)
	}
	t.mu.Unlock()
	for _, c := range ctrls {
		c.delete("target closed")
	}
	for _, c := range conns {
		c.close()
	}
	t.wg.Wait()
	return nil
}

// Controllers returns the IDs of the live controllers.
func (t *Target) Controllers() []uint16 {
	t.mu.Lock()
	defer t.mu.Unlock()
	var ids []uint16
	for id := range t.ctrls {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	return ids
}

// DropConnections closes every connection (all controllers lose their
// queues, as on a network failure) without deleting the subsystems.
func (t *Target) DropConnections() {
	t.mu.Lock()
	var conns []*conn
	for c := range t.conns {
		conns = append(conns, c)
	}
	t.mu.Unlock()
	for _, c := range conns {
		c.close()
	}
}

// BumpDiscoveryGeneration changes the discovery log's generation counter,
// as if the log had changed.
func (t *Target) BumpDiscoveryGeneration() {
	t.mu.Lock()
	notify := t.discoveryChangedLocked()
	t.mu.Unlock()
	notifyDiscoveryChanged(notify)
}

func (t *Target) removeConn(c *conn) {
	t.mu.Lock()
	delete(t.conns, c)
	t.mu.Unlock()
}

// maxTransfer is the most data one command may move: 2^MDTS pages, at
// most maxTransferCap.
func (t *Target) maxTransfer() int64 {
	if t.cfg.MDTS == 0 || t.cfg.MDTS > 12 {
		return maxTransferCap
	}
	return min(int64(4096)<<t.cfg.MDTS, maxTransferCap)
}

// maxWriteBuffer is how much write data one connection may hold.
func (t *Target) maxWriteBuffer() int64 { return max(t.cfg.MaxWriteBuffer, t.maxTransfer()) }

func (t *Target) maxCmd() int { return t.cfg.MaxCmd }

// inCapsuleDataSize is the largest in-capsule data on an I/O queue.
func (t *Target) inCapsuleDataSize() int { return max(t.cfg.InCapsuleDataSize, 0) }

// recordViolation keeps a protocol violation by a host for Violations.
func (t *Target) recordViolation(msg string) {
	t.log.Warn("target: host protocol violation", "err", msg)
	t.mu.Lock()
	defer t.mu.Unlock()
	t.nViolation++
	if len(t.violations) < maxViolations {
		t.violations = append(t.violations, msg)
	}
}

// Violations returns the protocol violations hosts committed (the first
// 64) and how many there were: more commands outstanding than SQSIZE or
// MAXCMD, commands before Connect, H2CData over MAXH2CDATA or not aligned
// to CPDA. Each ended its connection.
func (t *Target) Violations() ([]string, int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]string(nil), t.violations...), t.nViolation
}

func (t *Target) hostAllowed(hostnqn string) bool {
	if len(t.cfg.AllowedHosts) == 0 {
		return true
	}
	for _, h := range t.cfg.AllowedHosts {
		if h == hostnqn {
			return true
		}
	}
	return false
}

// keepAliveGranularity is how often a controller checks its keep-alive.
func keepAliveTick(kato time.Duration) time.Duration {
	return min(max(kato/10, 5*time.Millisecond), 500*time.Millisecond)
}
