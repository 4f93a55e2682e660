// Package scripted is an NVMe/TCP controller for tests whose every answer
// the test decides: the ICResp, and the reply (status, result, data) to each
// command on every queue. Left alone it answers as a polite controller
// with one namespace would (Polite), which a Script changes field by field
// or replaces outright: an MDTS of 255, a Connect response with another
// CNTLID, a discovery log that claims a million records, an asynchronous
// event per Keep Alive.
//
// It is for tests of the host (nvmeof and what uses it, through a real
// socket or net.Pipe), not a target: nvmeof/target is that. It speaks just
// enough NVMe/TCP for the host's commands: in-capsule data, R2T/H2CData for
// the rest, C2HData for reads.
//
// Goroutines: Serve runs on the caller's goroutine; a Server owns its
// accept loop and one goroutine per connection, and Close joins them.
package scripted

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/internal/pdu"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// ICResp is what the controller answers to ICReq (NVMe/TCP 1.0, Figure 27).
type ICResp struct {
	PFV        uint16
	CPDA       uint8
	Digest     uint8
	MaxH2CData uint32
}

// Reply is the answer to one command.
type Reply struct {
	Status nvme.Status
	Result uint64
	// Data is sent in C2HData PDUs before the response, whatever the
	// command asked for.
	Data []byte
	// Hold never answers the command (an Asynchronous Event Request that
	// waits for an event).
	Hold bool
}

// Command is one command as the controller received it.
type Command struct {
	QID  uint16
	Cmd  nvme.Command
	Data []byte // host-to-controller data, in capsule or by R2T
}

// Script decides the answers. Its functions are called from each
// connection's goroutine, concurrently for several queues.
type Script struct {
	// ICResp changes the polite ICResp; nil: polite.
	ICResp func(polite ICResp) ICResp
	// Reply answers a command, given what a polite controller answers;
	// nil: polite.
	Reply func(c *Command, polite Reply) Reply
	// Polite is the polite controller's state; nil: NewPolite().
	Polite *Polite
}

// Polite is a well-behaved controller of one NVM subsystem (or of the
// discovery subsystem, as the host's Connect asks) with namespace 1.
type Polite struct {
	// Controller is the Identify Controller data of the NVM subsystem's
	// controller; CNTLID is the one every Connect response carries.
	Controller nvme.IdentifyController
	// NVM is the Identify CNS 06h data.
	NVM nvme.IdentifyControllerNVM
	// Namespace is namespace 1 and NamespaceIDs its descriptors.
	Namespace    nvme.IdentifyNamespace
	NamespaceIDs nvme.NamespaceIDs
	// CAP is the CAP property.
	CAP uint64
	// Discovery are the discovery log's entries.
	Discovery []nvme.DiscoveryLogEntry

	mu sync.Mutex
	cc uint32
}

// PoliteNQN is the NVM subsystem of NewPolite's discovery log.
const PoliteNQN = "nqn.2026-11.io.ublk-nvmeof:scripted"

// NewPolite returns a controller as Linux nvmet would look: MDTS 1 MiB,
// queues of up to 128 entries, 8 KiB of in-capsule data, namespace 1 of
// 512 MiB in 512-byte blocks (reading zeroes) with Write Zeroes and
// Dataset Management.
func NewPolite() *Polite {
	p := &Polite{
		Controller: nvme.IdentifyController{
			VID: 0x1b36, SSVID: 0x1b36, SN: "scripted", MN: "scripted", FR: "1.0",
			MDTS: 8, CNTLID: 1, VER: 0x10300, KAS: 10, AERL: 3, SQES: 0x66, CQES: 0x44,
			MAXCMD: 128, NN: 1, ONCS: nvme.NVME_CTRL_ONCS_DSM | nvme.NVME_CTRL_ONCS_WRITE_ZEROES,
			VWC: nvme.NVME_CTRL_VWC_PRESENT, SGLS: 1 | 1<<2 | 1<<20, SubNQN: PoliteNQN,
			IOCCSZ: (8192 + nvme.CommandSize) / 16, IORCSZ: 1, MSDBD: 1, OAES: nvme.NVME_AEN_CFG_NS_ATTR,
			CNTRLTYPE: 1,
		},
		Namespace:    nvme.IdentifyNamespace{NSZE: 1 << 20, NCAP: 1 << 20, NUSE: 1 << 20},
		NamespaceIDs: nvme.NamespaceIDs{NGUID: [16]byte{0x5c, 1}, UUID: [16]byte{0x5c, 2}},
		// MQES 127, CQR, TO 7.5 s, CSS NVM.
		CAP: 127 | 1<<16 | 15<<24 | 1<<37,
		Discovery: []nvme.DiscoveryLogEntry{{TrType: nvme.NVMF_TRTYPE_TCP, AdrFam: nvme.NVMF_ADDR_FAMILY_IP4,
			SubType: nvme.NVME_NQN_NVME, PortID: 1, CNTLID: 0xffff, ASQSZ: 32,
			TrSvcID: "4420", SubNQN: PoliteNQN, TrAddr: "127.0.0.1"}},
	}
	p.Namespace.LBAF[0] = nvme.LBAFormat{DS: 9}
	return p
}

// Server serves connections accepted from a listener.
type Server struct {
	ln     net.Listener
	script *Script

	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

// Listen serves script on a TCP listener at addr ("127.0.0.1:0").
func Listen(addr string, script *Script) (*Server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	s := &Server{ln: ln, script: script, conns: map[net.Conn]struct{}{}}
	s.wg.Add(1)
	go s.accept()
	return s, nil
}

// Addr is the listening address.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

func (s *Server) accept() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		if s.conns == nil {
			s.mu.Unlock()
			c.Close()
			return
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			Serve(c, s.script)
			c.Close()
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
		}()
	}
}

// Close stops listening, closes every connection and waits for the
// server's goroutines.
func (s *Server) Close() error {
	err := s.ln.Close()
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.conns = nil
	s.mu.Unlock()
	s.wg.Wait()
	return err
}

// conn is one queue's connection.
type conn struct {
	nc       net.Conn
	rd       *pdu.Reader
	bw       *bufio.Writer
	script   *Script
	polite   *Polite
	send     pdu.Options
	qid      uint16
	sqsize   uint16
	sqhd     uint16
	disc     bool
	nextTTag uint16
}

// maxData bounds the data the controller accepts in one PDU or command.
const maxData = 4 << 20

// Serve answers the host on nc (one queue) until the connection fails or
// the host terminates it. It does not close nc.
func Serve(nc net.Conn, script *Script) error {
	if script == nil {
		script = &Script{}
	}
	c := &conn{nc: nc, bw: bufio.NewWriter(nc), script: script, polite: script.Polite}
	if c.polite == nil {
		c.polite = NewPolite()
	}
	c.rd = pdu.NewReader(bufio.NewReader(nc), pdu.HostToController, maxData)
	if err := c.initConnection(); err != nil {
		return err
	}
	for {
		cmd, err := c.receive()
		if err != nil {
			return err
		}
		if err := c.answer(cmd); err != nil {
			return err
		}
	}
}

func (c *conn) initConnection() error {
	var h pdu.Header
	if err := c.rd.ReadHeader(&h); err != nil {
		return err
	}
	if h.Type != pdu.TypeICReq {
		return fmt.Errorf("scripted: %v before ICReq", h.Type)
	}
	resp := ICResp{PFV: pdu.NVME_TCP_PFV_1_0, Digest: h.ICReq.Digest, MaxH2CData: 128 << 10}
	if c.script.ICResp != nil {
		resp = c.script.ICResp(resp)
	}
	c.send = pdu.Options{HeaderDigest: h.ICReq.Digest&pdu.NVME_TCP_HDR_DIGEST_ENABLE != 0,
		DataDigest: h.ICReq.Digest&pdu.NVME_TCP_DATA_DIGEST_ENABLE != 0, PDA: h.ICReq.HPDA}
	c.rd.Options = pdu.Options{HeaderDigest: c.send.HeaderDigest, DataDigest: c.send.DataDigest}
	ic := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeICResp},
		ICResp: pdu.ICResp{PFV: resp.PFV, CPDA: resp.CPDA, Digest: resp.Digest, MaxH2CData: resp.MaxH2CData}}
	return c.write(pdu.Append(nil, &ic, nil, pdu.Options{}))
}

func (c *conn) write(b []byte) error {
	c.bw.Write(b)
	return c.bw.Flush()
}

// receive reads the next command capsule with its data: in capsule, or
// asked for with one R2T and read from H2CData PDUs.
func (c *conn) receive() (*Command, error) {
	var h pdu.Header
	if err := c.rd.ReadHeader(&h); err != nil {
		return nil, err
	}
	switch h.Type {
	case pdu.TypeCapsuleCmd:
	case pdu.TypeH2CTermReq:
		c.rd.DiscardData()
		return nil, io.EOF
	default:
		return nil, fmt.Errorf("scripted: unexpected %v", h.Type)
	}
	cmd := &Command{QID: c.qid, Cmd: h.Cmd}
	if h.DataLen > 0 {
		cmd.Data = make([]byte, h.DataLen)
		return cmd, c.rd.ReadData(cmd.Data)
	}
	_, length, typ := h.Cmd.SGL()
	if typ != nvme.SGLTransport || length == 0 || !hostToController(&h.Cmd) {
		return cmd, nil
	}
	if length > maxData {
		return nil, fmt.Errorf("scripted: write of %d bytes", length)
	}
	cmd.Data = make([]byte, length)
	c.nextTTag++
	r2t := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeR2T},
		R2T: pdu.R2T{CommandID: h.Cmd.CommandID(), TTag: c.nextTTag, Length: length}}
	if err := c.write(pdu.Append(nil, &r2t, nil, c.send)); err != nil {
		return nil, err
	}
	for got := uint32(0); got < length; {
		if err := c.rd.ReadHeader(&h); err != nil {
			return nil, err
		}
		d := h.Data
		if h.Type != pdu.TypeH2CData || d.CommandID != cmd.Cmd.CommandID() || d.DataOffset != got ||
			uint64(d.DataOffset)+uint64(d.DataLength) > uint64(length) || int(d.DataLength) != h.DataLen {
			return nil, fmt.Errorf("scripted: unexpected %v %+v", h.Type, d)
		}
		if err := c.rd.ReadData(cmd.Data[got : got+d.DataLength]); err != nil {
			return nil, err
		}
		got += d.DataLength
	}
	return cmd, nil
}

// hostToController reports a command whose data goes to the controller:
// data transfer direction 01b in the opcode, or in the fctype of a
// Fabrics command.
func hostToController(cmd *nvme.Command) bool {
	op := cmd.Opcode()
	if op == nvme.NVME_FABRICS_COMMAND {
		op = cmd.FabricsType()
	}
	return op&3 == 1
}

func (c *conn) answer(cmd *Command) error {
	polite := c.polite.reply(c, cmd)
	r := polite
	if c.script.Reply != nil {
		r = c.script.Reply(cmd, polite)
	}
	if r.Hold {
		return nil
	}
	for off := 0; off < len(r.Data); {
		n := min(len(r.Data)-off, 128<<10)
		h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeC2HData},
			Data: pdu.DataHeader{CommandID: cmd.Cmd.CommandID(), DataOffset: uint32(off)}}
		if off+n == len(r.Data) {
			h.Flags = pdu.NVME_TCP_F_DATA_LAST
		}
		b := pdu.AppendHeader(nil, &h, n, c.send)
		b = append(b, r.Data[off:off+n]...)
		if c.send.DataDigest {
			b = pdu.AppendDataDigest(b, r.Data[off:off+n])
		}
		if err := c.write(b); err != nil {
			return err
		}
		off += n
	}
	var cqe nvme.Completion
	cqe.SetCommandID(cmd.Cmd.CommandID())
	cqe.SetResult(r.Result)
	cqe.SetStatus(r.Status)
	cqe.SetSQID(c.qid)
	c.sqhd = uint16((uint32(c.sqhd) + 1) % (uint32(c.sqsize) + 1))
	cqe.SetSQHead(c.sqhd)
	h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeCapsuleResp}, Resp: cqe}
	return c.write(pdu.Append(nil, &h, nil, c.send))
}

// Statuses a polite controller answers with.
const (
	invalidField  = nvme.NVME_SC_INVALID_FIELD | nvme.NVME_STATUS_DNR
	invalidOpcode = nvme.NVME_SC_INVALID_OPCODE | nvme.NVME_STATUS_DNR
	invalidNS     = nvme.NVME_SC_INVALID_NS | nvme.NVME_STATUS_DNR
)

// reply is the polite answer to cmd.
func (p *Polite) reply(c *conn, cmd *Command) Reply {
	if cmd.Cmd.Opcode() == nvme.NVME_FABRICS_COMMAND {
		return p.fabrics(c, cmd)
	}
	if c.qid != 0 {
		return p.io(cmd)
	}
	switch cmd.Cmd.Opcode() {
	case nvme.NVME_ADMIN_IDENTIFY:
		return p.identify(c, &cmd.Cmd)
	case nvme.NVME_ADMIN_SET_FEATURES:
		if uint8(cmd.Cmd.CDW(10)) == nvme.NVME_FEAT_NUM_QUEUES {
			return Reply{Result: uint64(cmd.Cmd.CDW(11))} // as many as asked for
		}
		return Reply{}
	case nvme.NVME_ADMIN_GET_LOG_PAGE:
		return p.logPage(c, &cmd.Cmd)
	case nvme.NVME_ADMIN_ASYNC_EVENT:
		return Reply{Hold: true}
	case nvme.NVME_ADMIN_KEEP_ALIVE:
		return Reply{}
	}
	return Reply{Status: invalidOpcode}
}

func (p *Polite) fabrics(c *conn, cmd *Command) Reply {
	switch cmd.Cmd.FabricsType() {
	case nvme.NVME_FABRICS_TYPE_CONNECT:
		f := cmd.Cmd.Connect()
		d, err := nvme.ParseConnectData(cmd.Data)
		if err != nil {
			return Reply{Status: invalidField}
		}
		c.qid, c.sqsize = f.QID, f.SQSize
		c.disc = d.SubsysNQN == nvme.NVME_DISC_SUBSYS_NAME
		if f.QID != 0 {
			return Reply{}
		}
		return Reply{Result: uint64(p.Controller.CNTLID)}
	case nvme.NVME_FABRICS_TYPE_PROPERTY_GET:
		off, _, _ := cmd.Cmd.Property()
		p.mu.Lock()
		defer p.mu.Unlock()
		switch off {
		case nvme.NVME_REG_CAP:
			return Reply{Result: p.CAP}
		case nvme.NVME_REG_VS:
			return Reply{Result: uint64(p.Controller.VER)}
		case nvme.NVME_REG_CC:
			return Reply{Result: uint64(p.cc)}
		case nvme.NVME_REG_CSTS:
			var csts uint64
			if p.cc&nvme.NVME_CC_ENABLE != 0 {
				csts |= nvme.NVME_CSTS_RDY
			}
			if p.cc&nvme.NVME_CC_SHN_MASK != 0 {
				csts |= nvme.NVME_CSTS_SHST_CMPLT
			}
			return Reply{Result: csts}
		}
	case nvme.NVME_FABRICS_TYPE_PROPERTY_SET:
		off, _, v := cmd.Cmd.Property()
		if off == nvme.NVME_REG_CC {
			p.mu.Lock()
			p.cc = uint32(v)
			p.mu.Unlock()
			return Reply{}
		}
	}
	return Reply{Status: invalidField}
}

func (p *Polite) identify(c *conn, cmd *nvme.Command) Reply {
	nsid := cmd.NSID()
	switch uint8(cmd.CDW(10)) {
	case nvme.NVME_ID_CNS_CTRL:
		id := p.Controller
		if c.disc {
			id.CNTRLTYPE, id.SubNQN, id.NN, id.ONCS, id.VWC = 2, nvme.NVME_DISC_SUBSYS_NAME, 0, 0, 0
			id.OAES = nvme.NVME_AEN_CFG_DISC_CHANGE
			id.MDTS = 0
		}
		return Reply{Data: id.Marshal()}
	case nvme.NVME_ID_CNS_NS:
		if c.disc || nsid != 1 {
			return Reply{Status: invalidNS}
		}
		return Reply{Data: p.Namespace.Marshal()}
	case nvme.NVME_ID_CNS_NS_DESC_LIST:
		if c.disc || nsid != 1 {
			return Reply{Status: invalidNS}
		}
		return Reply{Data: p.NamespaceIDs.Marshal()}
	case nvme.NVME_ID_CNS_NS_ACTIVE_LIST:
		b := make([]byte, nvme.IdentifySize)
		if !c.disc && nsid < 1 {
			binary.LittleEndian.PutUint32(b, 1)
		}
		return Reply{Data: b}
	case nvme.NVME_ID_CNS_CS_CTRL:
		if c.disc || cmd.CDW(11)>>24 != nvme.NVME_CSI_NVM {
			return Reply{Status: invalidField}
		}
		return Reply{Data: p.NVM.Marshal()}
	}
	return Reply{Status: invalidField}
}

// logPage answers Get Log Page with the requested dwords of the page.
func (p *Polite) logPage(c *conn, cmd *nvme.Command) Reply {
	lid := uint8(cmd.CDW(10))
	numd := uint64(cmd.CDW(10)>>16|cmd.CDW(11)<<16) + 1
	off := uint64(cmd.CDW(12)) | uint64(cmd.CDW(13))<<32
	if numd*4 > maxData {
		return Reply{Status: invalidField}
	}
	var page []byte
	switch {
	case lid == nvme.NVME_LOG_DISC && c.disc:
		page = nvme.AppendDiscoveryLogHeader(nil, nvme.DiscoveryLogHeader{GenCtr: 1, NumRec: uint64(len(p.Discovery))})
		for _, e := range p.Discovery {
			page = nvme.AppendDiscoveryLogEntry(page, e)
		}
	case lid == nvme.NVME_LOG_CHANGED_NS && !c.disc:
		page = make([]byte, 4096)
	default:
		return Reply{Status: invalidField}
	}
	out := make([]byte, numd*4)
	if off < uint64(len(page)) {
		copy(out, page[off:])
	}
	return Reply{Data: out}
}

// io answers I/O commands: reads return zeroes, everything else succeeds.
func (p *Polite) io(cmd *Command) Reply {
	if cmd.Cmd.NSID() != 1 {
		return Reply{Status: invalidNS}
	}
	switch cmd.Cmd.Opcode() {
	case nvme.NVME_CMD_READ:
		_, length, _ := cmd.Cmd.SGL()
		if length > maxData {
			return Reply{Status: invalidField}
		}
		return Reply{Data: make([]byte, length)}
	case nvme.NVME_CMD_WRITE, nvme.NVME_CMD_FLUSH, nvme.NVME_CMD_WRITE_ZEROES, nvme.NVME_CMD_DSM:
		return Reply{}
	}
	return Reply{Status: invalidOpcode}
}
