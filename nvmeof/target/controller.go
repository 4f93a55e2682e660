package target

import (
	"encoding/binary"
	"net"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// controller is one association of a host with a subsystem (struct
// nvmet_ctrl). subsys is nil for the discovery controller.
type controller struct {
	t       *Target
	subsys  *Subsystem
	cntlid  uint16
	hostnqn string
	hostid  [16]byte

	mu        sync.Mutex
	deleted   bool
	cc, csts  uint32
	kato      time.Duration
	lastKA    time.Time
	conns     map[uint16]*conn
	ioQueues  int  // granted by Set Features Number of Queues
	acre      bool // Host Behavior Support: Advanced Command Retry Enable
	aenConfig uint32
	aers      []aer    // outstanding Asynchronous Event Requests
	events    []uint32 // events waiting for an AER
	changedNS []uint32
	stopKA    chan struct{}
}

type aer struct {
	c   *conn
	cmd *command
}

const aerLimit = 4 // AERL+1

// Identify values.
const (
	targetVS    = 0x10400 // NVMe 1.4
	targetModel = "ublk-nvmeof in-process target"
)

func (c *conn) executeAdmin(cmd *command) (nvme.Status, uint64, []byte) {
	op := cmd.cmd.Opcode()
	if op == nvme.NVME_FABRICS_COMMAND {
		switch cmd.cmd.FabricsType() {
		case nvme.NVME_FABRICS_TYPE_CONNECT:
			return c.connect(cmd)
		case nvme.NVME_FABRICS_TYPE_AUTH_SEND, nvme.NVME_FABRICS_TYPE_AUTH_RECEIVE:
			return c.authCommand(cmd)
		case nvme.NVME_FABRICS_TYPE_PROPERTY_GET, nvme.NVME_FABRICS_TYPE_PROPERTY_SET:
			if c.ctrl == nil || c.qid != 0 {
				return nvme.NVME_SC_CMD_SEQ_ERROR | nvme.NVME_STATUS_DNR, 0, nil
			}
			return c.ctrl.property(&cmd.cmd)
		}
		return nvme.NVME_SC_INVALID_OPCODE | nvme.NVME_STATUS_DNR, 0, nil
	}
	ctrl := c.ctrl
	if ctrl == nil {
		return nvme.NVME_SC_CMD_SEQ_ERROR | nvme.NVME_STATUS_DNR, 0, nil
	}
	if c.t.cfg.TBKAS {
		ctrl.touch()
	}
	switch op {
	case nvme.NVME_ADMIN_KEEP_ALIVE:
		ctrl.touch()
		return nvme.NVME_SC_SUCCESS, 0, nil
	case nvme.NVME_ADMIN_IDENTIFY:
		return ctrl.identify(&cmd.cmd)
	case nvme.NVME_ADMIN_SET_FEATURES:
		return ctrl.setFeatures(&cmd.cmd, cmd.data)
	case nvme.NVME_ADMIN_GET_FEATURES:
		return ctrl.getFeatures(&cmd.cmd)
	case nvme.NVME_ADMIN_GET_LOG_PAGE:
		return ctrl.getLogPage(&cmd.cmd)
	case nvme.NVME_ADMIN_ASYNC_EVENT:
		return ctrl.asyncEvent(c, cmd)
	}
	return nvme.NVME_SC_INVALID_OPCODE | nvme.NVME_STATUS_DNR, 0, nil
}

// connect handles Fabrics Connect (nvmet_execute_admin_connect,
// nvmet_execute_io_connect).
func (c *conn) connect(cmd *command) (nvme.Status, uint64, []byte) {
	invalid := nvme.NVME_SC_CONNECT_INVALID_PARAM | nvme.NVME_STATUS_DNR
	if c.ctrl != nil {
		return nvme.NVME_SC_CMD_SEQ_ERROR | nvme.NVME_STATUS_DNR, 0, nil
	}
	f := cmd.cmd.Connect()
	if f.RecFmt != 0 {
		return nvme.NVME_SC_CONNECT_FORMAT | nvme.NVME_STATUS_DNR, 0, nil
	}
	d, err := nvme.ParseConnectData(cmd.data)
	if err != nil {
		return invalid, 0, nil
	}
	t := c.t
	if f.SQSize == 0 || int(f.SQSize) >= t.cfg.MaxQueueSize {
		return invalid, 0, nil
	}
	t.mu.Lock()
	var subsys *Subsystem
	if d.SubsysNQN != nvme.NVME_DISC_SUBSYS_NAME {
		subsys = t.subsystems[d.SubsysNQN]
		if subsys == nil {
			t.mu.Unlock()
			return invalid, 0, nil
		}
		if !t.hostAllowed(d.HostNQN) {
			t.mu.Unlock()
			return nvme.NVME_SC_CONNECT_INVALID_HOST | nvme.NVME_STATUS_DNR, 0, nil
		}
	}
	var ctrl *controller
	if f.QID == 0 {
		if d.CNTLID != nvme.NVME_CNTLID_DYNAMIC {
			t.mu.Unlock()
			return invalid, 0, nil
		}
		for t.ctrls[t.nextCNTLID] != nil || t.nextCNTLID == 0 || t.nextCNTLID > 0xffef {
			t.nextCNTLID++
		}
		ctrl = &controller{t: t, subsys: subsys, cntlid: t.nextCNTLID, hostnqn: d.HostNQN, hostid: d.HostID,
			conns: map[uint16]*conn{}, kato: time.Duration(f.KATO) * time.Millisecond, lastKA: time.Now(), stopKA: make(chan struct{})}
		t.nextCNTLID++
		t.ctrls[ctrl.cntlid] = ctrl
		if ctrl.kato > 0 {
			t.wg.Add(1)
			go ctrl.keepAliveTimer()
		}
	} else {
		ctrl = t.ctrls[d.CNTLID]
		if ctrl == nil || ctrl.subsys != subsys || ctrl.hostnqn != d.HostNQN || subsys == nil {
			t.mu.Unlock()
			return invalid, 0, nil
		}
	}
	t.mu.Unlock()

	ctrl.mu.Lock()
	defer ctrl.mu.Unlock()
	if ctrl.deleted {
		return invalid, 0, nil
	}
	if f.QID > 0 {
		limit := t.cfg.MaxIOQueues
		if ctrl.ioQueues > 0 {
			limit = ctrl.ioQueues
		}
		if int(f.QID) > limit || ctrl.conns[f.QID] != nil || ctrl.cc&nvme.NVME_CC_ENABLE == 0 {
			return invalid, 0, nil
		}
	}
	ctrl.conns[f.QID] = c
	c.wmu.Lock()
	c.qid, c.sqsize, c.sqhdDisabled = f.QID, f.SQSize, f.CAttr&(1<<2) != 0
	c.wmu.Unlock()
	c.ctrl = ctrl
	return nvme.NVME_SC_SUCCESS, uint64(ctrl.cntlid) | c.startAuth(subsys, d.HostNQN), nil
}

// detach is called when a connection of the controller closes. Losing the
// admin queue deletes the controller (and its I/O queues), as nvmet does.
func (ctrl *controller) detach(c *conn) {
	ctrl.mu.Lock()
	if ctrl.conns[c.qid] == c {
		delete(ctrl.conns, c.qid)
	}
	var kept []aer
	for _, a := range ctrl.aers {
		if a.c != c {
			kept = append(kept, a)
		}
	}
	ctrl.aers = kept
	admin := c.qid == 0
	ctrl.mu.Unlock()
	if admin {
		ctrl.delete("admin queue closed")
	}
}

// delete removes the controller and closes all its connections.
func (ctrl *controller) delete(why string) {
	ctrl.mu.Lock()
	if ctrl.deleted {
		ctrl.mu.Unlock()
		return
	}
	ctrl.deleted = true
	close(ctrl.stopKA)
	var conns []*conn
	for _, c := range ctrl.conns {
		conns = append(conns, c)
	}
	ctrl.mu.Unlock()
	ctrl.t.mu.Lock()
	if ctrl.t.ctrls[ctrl.cntlid] == ctrl {
		delete(ctrl.t.ctrls, ctrl.cntlid)
	}
	ctrl.t.mu.Unlock()
	ctrl.t.log.Debug("target: controller deleted", "cntlid", ctrl.cntlid, "why", why)
	for _, c := range conns {
		c.close()
	}
}

// acreEnabled reports whether the host enabled Advanced Command Retry.
func (ctrl *controller) acreEnabled() bool {
	ctrl.mu.Lock()
	defer ctrl.mu.Unlock()
	return ctrl.acre
}

func (ctrl *controller) touch() {
	ctrl.mu.Lock()
	ctrl.lastKA = time.Now()
	ctrl.mu.Unlock()
}

// keepAliveTimer deletes the controller when no keep-alive arrived within
// KATO (nvmet_keep_alive_timer).
func (ctrl *controller) keepAliveTimer() {
	defer ctrl.t.wg.Done()
	tick := time.NewTicker(keepAliveTick(ctrl.kato))
	defer tick.Stop()
	for {
		select {
		case <-ctrl.stopKA:
			return
		case now := <-tick.C:
			ctrl.mu.Lock()
			expired := now.Sub(ctrl.lastKA) > ctrl.kato
			ctrl.mu.Unlock()
			if expired {
				ctrl.t.log.Info("target: keep-alive timeout, deleting controller", "cntlid", ctrl.cntlid)
				ctrl.delete("keep-alive timeout")
				return
			}
		}
	}
}

func (ctrl *controller) capValue() uint64 {
	mqes := uint64(ctrl.t.cfg.MaxQueueSize - 1)
	return mqes | 1<<16 | 15<<24 | 1<<37 // CQR, TO 7.5 s, CSS NVM
}

func (ctrl *controller) property(cmd *nvme.Command) (nvme.Status, uint64, []byte) {
	off, size8, val := cmd.Property()
	set := cmd.FabricsType() == nvme.NVME_FABRICS_TYPE_PROPERTY_SET
	ctrl.mu.Lock()
	defer ctrl.mu.Unlock()
	invalid := nvme.NVME_SC_INVALID_FIELD | nvme.NVME_STATUS_DNR
	switch {
	case off == nvme.NVME_REG_CAP && size8 && !set:
		return 0, ctrl.capValue(), nil
	case off == nvme.NVME_REG_VS && !size8 && !set:
		return 0, targetVS, nil
	case off == nvme.NVME_REG_CC && !size8 && !set:
		return 0, uint64(ctrl.cc), nil
	case off == nvme.NVME_REG_CSTS && !size8 && !set:
		return 0, uint64(ctrl.csts), nil
	case off == nvme.NVME_REG_CC && !size8 && set:
		cc := uint32(val)
		old := ctrl.cc
		ctrl.cc = cc
		if cc&nvme.NVME_CC_ENABLE != 0 && old&nvme.NVME_CC_ENABLE == 0 {
			ctrl.csts |= nvme.NVME_CSTS_RDY
		}
		if cc&nvme.NVME_CC_ENABLE == 0 && old&nvme.NVME_CC_ENABLE != 0 {
			ctrl.csts &^= nvme.NVME_CSTS_RDY
		}
		if cc&nvme.NVME_CC_SHN_MASK != 0 && old&nvme.NVME_CC_SHN_MASK == 0 {
			// Nothing is cached: the shutdown completes at once.
			ctrl.csts = ctrl.csts&^nvme.NVME_CSTS_SHST_MASK | nvme.NVME_CSTS_SHST_CMPLT
		}
		return 0, 0, nil
	}
	return invalid, 0, nil
}

func (ctrl *controller) identify(cmd *nvme.Command) (nvme.Status, uint64, []byte) {
	cns := uint8(cmd.CDW(10))
	nsid := cmd.NSID()
	t := ctrl.t
	switch cns {
	case nvme.NVME_ID_CNS_CTRL:
		id := nvme.IdentifyController{
			VID: 0x1b36, SSVID: 0x1b36, MN: targetModel, FR: "1.0", MDTS: t.cfg.MDTS,
			CNTLID: ctrl.cntlid, VER: targetVS, KAS: 1, AERL: aerLimit - 1,
			SQES: 0x66, CQES: 0x44, MAXCMD: uint16(min(t.cfg.MaxCmd, 0xffff)),
			SGLS: 1 | 1<<2 | 1<<20, IOCCSZ: uint32(t.inCapsuleDataSize()+nvme.CommandSize) / 16, IORCSZ: 1, MSDBD: 1,
		}
		if ctrl.subsys == nil {
			id.CNTRLTYPE = 2 // discovery controller
			id.SubNQN = nvme.NVME_DISC_SUBSYS_NAME
			id.OAES = 1 << 31
		} else {
			id.CNTRLTYPE = 1
			id.SN = ctrl.subsys.serial
			id.SubNQN = ctrl.subsys.nqn
			id.NN = 1024
			id.ONCS = nvme.NVME_CTRL_ONCS_DSM | nvme.NVME_CTRL_ONCS_WRITE_ZEROES
			id.VWC = nvme.NVME_CTRL_VWC_PRESENT
			id.OAES = 1 << 8
			id.CRDT = t.cfg.CRDT
		}
		if t.cfg.TBKAS {
			id.CTRATT = nvme.NVME_CTRL_CTRATT_TBKAS
		}
		return 0, 0, id.Marshal()
	case nvme.NVME_ID_CNS_NS, nvme.NVME_ID_CNS_NS_DESC_LIST:
		if ctrl.subsys == nil {
			return nvme.NVME_SC_INVALID_OPCODE | nvme.NVME_STATUS_DNR, 0, nil
		}
		if nsid == 0 || nsid == nvme.NVME_NSID_ALL || nsid > 1024 {
			return nvme.NVME_SC_INVALID_NS | nvme.NVME_STATUS_DNR, 0, nil
		}
		t.mu.Lock()
		ns := ctrl.subsys.namespaces[nsid]
		t.mu.Unlock()
		if ns == nil {
			if cns == nvme.NVME_ID_CNS_NS {
				return 0, 0, make([]byte, nvme.IdentifySize) // inactive: zeroes
			}
			return nvme.NVME_SC_INVALID_NS | nvme.NVME_STATUS_DNR, 0, nil
		}
		if cns == nvme.NVME_ID_CNS_NS_DESC_LIST {
			return 0, 0, nvme.NamespaceIDs{EUI64: ns.cfg.EUI64, NGUID: ns.cfg.NGUID, UUID: ns.cfg.UUID}.Marshal()
		}
		id := nvme.IdentifyNamespace{NSZE: ns.blocks, NCAP: ns.blocks, NUSE: ns.blocks, DLFEAT: 1 | 1<<3,
			NGUID: ns.cfg.NGUID, EUI64: ns.cfg.EUI64}
		id.LBAF[0] = nvme.LBAFormat{DS: ns.cfg.BlockShift}
		return 0, 0, id.Marshal()
	case nvme.NVME_ID_CNS_NS_ACTIVE_LIST:
		if ctrl.subsys == nil {
			return nvme.NVME_SC_INVALID_OPCODE | nvme.NVME_STATUS_DNR, 0, nil
		}
		t.mu.Lock()
		var ids []uint32
		for id := range ctrl.subsys.namespaces {
			if id > nsid {
				ids = append(ids, id)
			}
		}
		t.mu.Unlock()
		sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
		b := make([]byte, nvme.IdentifySize)
		for i, id := range ids {
			if i == 1024 {
				break
			}
			binary.LittleEndian.PutUint32(b[4*i:], id)
		}
		return 0, 0, b
	}
	return nvme.NVME_SC_INVALID_FIELD | nvme.NVME_STATUS_DNR, 0, nil
}

func (ctrl *controller) setFeatures(cmd *nvme.Command, data []byte) (nvme.Status, uint64, []byte) {
	fid := uint8(cmd.CDW(10))
	v := cmd.CDW(11)
	ctrl.mu.Lock()
	defer ctrl.mu.Unlock()
	switch fid {
	case nvme.NVME_FEAT_HOST_BEHAVIOR:
		if ctrl.subsys == nil || len(data) != nvme.HostBehaviorSize || data[0] > 1 {
			return nvme.NVME_SC_INVALID_FIELD | nvme.NVME_STATUS_DNR, 0, nil
		}
		ctrl.acre = data[0] == nvme.NVME_ENABLE_ACRE
		return 0, 0, nil
	case nvme.NVME_FEAT_NUM_QUEUES:
		if ctrl.subsys == nil || v&0xffff == 0xffff || v>>16 == 0xffff {
			return nvme.NVME_SC_INVALID_FIELD | nvme.NVME_STATUS_DNR, 0, nil
		}
		n := min(int(v&0xffff)+1, int(v>>16)+1, ctrl.t.cfg.MaxIOQueues)
		ctrl.ioQueues = n
		return 0, uint64(n-1) | uint64(n-1)<<16, nil
	case nvme.NVME_FEAT_ASYNC_EVENT:
		ctrl.aenConfig = v
		return 0, 0, nil
	case nvme.NVME_FEAT_KATO:
		ctrl.kato = time.Duration(v) * time.Millisecond
		return 0, 0, nil
	}
	return nvme.NVME_SC_INVALID_FIELD | nvme.NVME_STATUS_DNR, 0, nil
}

func (ctrl *controller) getFeatures(cmd *nvme.Command) (nvme.Status, uint64, []byte) {
	fid := uint8(cmd.CDW(10))
	ctrl.mu.Lock()
	defer ctrl.mu.Unlock()
	switch fid {
	case nvme.NVME_FEAT_NUM_QUEUES:
		n := max(ctrl.ioQueues, 1)
		return 0, uint64(n-1) | uint64(n-1)<<16, nil
	case nvme.NVME_FEAT_ASYNC_EVENT:
		return 0, uint64(ctrl.aenConfig), nil
	case nvme.NVME_FEAT_KATO:
		return 0, uint64(ctrl.kato / time.Millisecond), nil
	case nvme.NVME_FEAT_HOST_BEHAVIOR:
		b := make([]byte, nvme.HostBehaviorSize)
		if ctrl.acre {
			b[0] = nvme.NVME_ENABLE_ACRE
		}
		return 0, 0, b
	}
	return nvme.NVME_SC_INVALID_FIELD | nvme.NVME_STATUS_DNR, 0, nil
}

func (ctrl *controller) getLogPage(cmd *nvme.Command) (nvme.Status, uint64, []byte) {
	lid := uint8(cmd.CDW(10))
	numd := (uint64(cmd.CDW(11)&0xffff)<<16 | uint64(cmd.CDW(10)>>16)) + 1
	length := numd * 4
	offset := uint64(cmd.CDW(12)) | uint64(cmd.CDW(13))<<32
	_, sglLen, _ := cmd.SGL()
	if uint64(sglLen) != length || length > uint64(ctrl.t.maxTransfer()) {
		return nvme.NVME_SC_SGL_INVALID_DATA | nvme.NVME_STATUS_DNR, 0, nil
	}
	var log []byte
	switch lid {
	case nvme.NVME_LOG_DISC:
		if ctrl.subsys != nil {
			return nvme.NVME_SC_INVALID_LOG_PAGE | nvme.NVME_STATUS_DNR, 0, nil
		}
		log = ctrl.t.discoveryLog()
	case nvme.NVME_LOG_CHANGED_NS:
		log = make([]byte, 4096)
		ctrl.mu.Lock()
		for i, id := range ctrl.changedNS {
			if i == 1024 {
				binary.LittleEndian.PutUint32(log, nvme.NVME_NSID_ALL)
				break
			}
			binary.LittleEndian.PutUint32(log[4*i:], id)
		}
		ctrl.changedNS = nil
		ctrl.mu.Unlock()
	case nvme.NVME_LOG_ERROR:
		log = make([]byte, 64)
	default:
		return nvme.NVME_SC_INVALID_LOG_PAGE | nvme.NVME_STATUS_DNR, 0, nil
	}
	if offset > uint64(len(log)) || offset%4 != 0 {
		return nvme.NVME_SC_INVALID_FIELD | nvme.NVME_STATUS_DNR, 0, nil
	}
	out := make([]byte, length)
	copy(out, log[offset:])
	return 0, 0, out
}

// discoveryLog builds the whole discovery log: one entry per subsystem per
// port.
func (t *Target) discoveryLog() []byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	var nqns []string
	for nqn := range t.subsystems {
		nqns = append(nqns, nqn)
	}
	sort.Strings(nqns)
	type port struct {
		id   uint16
		addr string
		svc  string
		fam  uint8
	}
	var ports []port
	for l, id := range t.listeners {
		a := l.Addr().(*net.TCPAddr)
		fam := uint8(nvme.NVMF_ADDR_FAMILY_IP4)
		if a.IP.To4() == nil {
			fam = nvme.NVMF_ADDR_FAMILY_IP6
		}
		ports = append(ports, port{id, a.IP.String(), strconv.Itoa(a.Port), fam})
	}
	sort.Slice(ports, func(i, j int) bool { return ports[i].id < ports[j].id })
	var entries []byte
	n := 0
	for _, p := range ports {
		for _, nqn := range nqns {
			entries = nvme.AppendDiscoveryLogEntry(entries, nvme.DiscoveryLogEntry{
				TrType: nvme.NVMF_TRTYPE_TCP, AdrFam: p.fam, SubType: nvme.NVME_NQN_NVME,
				TReq: nvme.NVMF_TREQ_NOT_SPECIFIED, PortID: p.id, CNTLID: nvme.NVME_CNTLID_DYNAMIC,
				ASQSZ: 32, TrSvcID: p.svc, SubNQN: nqn, TrAddr: p.addr, SecType: nvme.NVMF_TCP_SECTYPE_NONE,
			})
			n++
		}
	}
	log := nvme.AppendDiscoveryLogHeader(nil, nvme.DiscoveryLogHeader{GenCtr: t.discGen, NumRec: uint64(n)})
	return append(log, entries...)
}

// asyncEvent holds an AER until an event completes it.
func (ctrl *controller) asyncEvent(c *conn, cmd *command) (nvme.Status, uint64, []byte) {
	ctrl.mu.Lock()
	if len(ctrl.events) > 0 {
		ev := ctrl.events[0]
		ctrl.events = ctrl.events[1:]
		ctrl.mu.Unlock()
		return 0, uint64(ev), nil
	}
	defer ctrl.mu.Unlock()
	if len(ctrl.aers) >= aerLimit {
		return nvme.NVME_SC_ASYNC_LIMIT | nvme.NVME_STATUS_DNR, 0, nil
	}
	ctrl.aers = append(ctrl.aers, aer{c: c, cmd: cmd})
	return statusPending, 0, nil
}

// event completes an outstanding AER, or keeps the event for the next.
func (ctrl *controller) event(typ, info, logPage uint8) {
	ev := uint32(typ) | uint32(info)<<8 | uint32(logPage)<<16
	ctrl.mu.Lock()
	if ctrl.deleted {
		ctrl.mu.Unlock()
		return
	}
	if len(ctrl.aers) == 0 {
		ctrl.events = append(ctrl.events, ev)
		ctrl.mu.Unlock()
		return
	}
	a := ctrl.aers[0]
	ctrl.aers = ctrl.aers[1:]
	ctrl.mu.Unlock()
	a.c.reply(a.cmd, 0, uint64(ev), nil)
}

func (ctrl *controller) nsChanged(nsid uint32) {
	ctrl.mu.Lock()
	ctrl.changedNS = append(ctrl.changedNS, nsid)
	ctrl.mu.Unlock()
	ctrl.event(nvme.NVME_AER_TYPE_NOTICE, nvme.NVME_AER_NOTICE_NS_CHANGED, nvme.NVME_LOG_CHANGED_NS)
}
