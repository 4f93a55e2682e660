package target

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/internal/pdu"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// conn is one queue: a TCP connection from a host (struct nvmet_tcp_queue).
type conn struct {
	t  *Target
	nc net.Conn

	// Written only by serve before any other goroutine can see them.
	sendOpts pdu.Options
	recvOpts pdu.Options

	wmu sync.Mutex
	bw  *bufio.Writer

	// Set by the serve goroutine at Connect, under wmu.
	qid          uint16
	sqsize       uint16
	sqhd         uint16
	sqhdDisabled bool
	// outstanding counts commands received and not yet answered, under
	// wmu: at most SQSIZE (and MAXCMD on an I/O queue) may be.
	outstanding int

	// Owned by the serve goroutine.
	ctrl           *controller
	auth           *connAuth           // DH-HMAC-CHAP, set at Connect (auth.go)
	connectPending bool                // a Connect arrived and has not been executed
	pending        map[uint16]*command // writes waiting for H2CData (or for buffer), by command ID
	waiting        []*command          // writes waiting for write buffer, in arrival order
	buffered       int64               // bytes of write buffers allocated for R2Ts
	nextTTag       uint16

	closeOnce sync.Once
	closed    chan struct{}
}

// command is a command being executed.
type command struct {
	cmd      nvme.Command
	data     []byte // write data (received) or nil; allocated when its R2T is sent
	length   uint32 // transport data length of a write waiting for data
	received int
	ttag     uint16
	fault    *Fault
}

func newConn(t *Target, nc net.Conn) *conn {
	return &conn{t: t, nc: nc, bw: bufio.NewWriterSize(nc, 64<<10), pending: map[uint16]*command{}, closed: make(chan struct{})}
}

func (c *conn) close() {
	c.closeOnce.Do(func() {
		close(c.closed)
		c.nc.Close()
	})
}

func (c *conn) isClosed() bool {
	select {
	case <-c.closed:
		return true
	default:
		return false
	}
}

func (c *conn) serve() {
	defer c.t.wg.Done()
	defer c.t.removeConn(c)
	defer c.close()
	err := c.serveLoop()
	if c.ctrl != nil {
		c.ctrl.detach(c)
	}
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
		c.t.log.Debug("target: connection closed", "qid", c.qid, "err", err)
	}
}

func (c *conn) serveLoop() error {
	br := bufio.NewReaderSize(c.nc, 64<<10)
	rd := pdu.NewReader(br, pdu.HostToController, 0)
	var h pdu.Header
	if err := rd.ReadHeader(&h); err != nil {
		return c.protocolFailure(err)
	}
	if h.Type != pdu.TypeICReq {
		return c.protocolFailure(&pdu.ProtocolError{FES: pdu.NVME_TCP_FES_PDU_SEQ_ERR, Msg: fmt.Sprintf("%v before ICReq", h.Type)})
	}
	r := h.ICReq
	if r.PFV != pdu.NVME_TCP_PFV_1_0 || r.HPDA > 31 || r.Digest&^3 != 0 {
		return c.protocolFailure(&pdu.ProtocolError{FES: pdu.NVME_TCP_FES_UNSUPPORTED_PARAM, FEI: 8, Msg: fmt.Sprintf("ICReq %+v", r)})
	}
	hd, dd := r.Digest&pdu.NVME_TCP_HDR_DIGEST_ENABLE != 0, r.Digest&pdu.NVME_TCP_DATA_DIGEST_ENABLE != 0
	c.sendOpts = pdu.Options{HeaderDigest: hd, DataDigest: dd, PDA: r.HPDA}
	c.recvOpts = pdu.Options{HeaderDigest: hd, DataDigest: dd}
	resp := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeICResp},
		ICResp: pdu.ICResp{PFV: pdu.NVME_TCP_PFV_1_0, CPDA: c.t.cfg.CPDA, Digest: r.Digest, MaxH2CData: c.t.cfg.MaxH2CData}}
	if err := c.write(pdu.Append(nil, &resp, nil, pdu.Options{}), nil, pdu.Options{}); err != nil {
		return err
	}
	rd.Options = c.recvOpts
	rd.MaxData = uint32(max(pdu.NVME_TCP_ADMIN_CCSZ, c.t.cfg.InCapsuleDataSize, int(c.t.cfg.MaxH2CData)))

	for {
		if err := rd.ReadHeader(&h); err != nil {
			return c.protocolFailure(err)
		}
		switch h.Type {
		case pdu.TypeCapsuleCmd:
			if err := c.admit(&h.Cmd); err != nil {
				return c.protocolFailure(err)
			}
			limit := c.t.inCapsuleDataSize()
			if c.qid == 0 {
				limit = pdu.NVME_TCP_ADMIN_CCSZ - nvme.CommandSize
			}
			if h.DataLen > limit {
				return c.protocolFailure(c.violationFES(pdu.NVME_TCP_FES_DATA_LIMIT_EXCEEDED, uint32(limit),
					"%d bytes of in-capsule data, at most %d on queue %d (IOCCSZ)", h.DataLen, limit, c.qid))
			}
			if err := c.checkPDA(&h); err != nil {
				return c.protocolFailure(err)
			}
			cmd := &command{cmd: h.Cmd}
			if h.DataLen > 0 {
				cmd.data = make([]byte, h.DataLen)
				if err := rd.ReadData(cmd.data); err != nil {
					return c.protocolFailure(err)
				}
				cmd.received = h.DataLen
			}
			if err := c.receive(cmd, h.DataLen > 0); err != nil {
				return err
			}

		case pdu.TypeH2CData:
			d := h.Data
			if err := c.checkH2CData(&h); err != nil {
				return c.protocolFailure(err)
			}
			cmd := c.pending[d.CommandID]
			if cmd == nil || cmd.data == nil || d.TTag != cmd.ttag || int64(d.DataOffset) != int64(cmd.received) ||
				int64(d.DataOffset)+int64(d.DataLength) > int64(len(cmd.data)) {
				return c.protocolFailure(&pdu.ProtocolError{FES: pdu.NVME_TCP_FES_DATA_OUT_OF_RANGE, Msg: fmt.Sprintf("unexpected H2CData %+v", d)})
			}
			if err := rd.ReadData(cmd.data[d.DataOffset : d.DataOffset+d.DataLength]); err != nil {
				return c.protocolFailure(err)
			}
			cmd.received += int(d.DataLength)
			last := h.Flags&pdu.NVME_TCP_F_DATA_LAST != 0
			if last != (cmd.received == len(cmd.data)) {
				return c.protocolFailure(&pdu.ProtocolError{FES: pdu.NVME_TCP_FES_PDU_SEQ_ERR, Msg: "H2CData LAST flag does not match the data received"})
			}
			if last {
				delete(c.pending, d.CommandID)
				c.buffered -= int64(len(cmd.data))
				c.execute(cmd)
				cmd.data = nil
				if err := c.requestWaitingData(); err != nil {
					return err
				}
			}

		case pdu.TypeH2CTermReq:
			rd.DiscardData()
			return fmt.Errorf("host terminated the connection: fes %#x fei %d", h.Term.FES, h.Term.FEI)

		default:
			return c.protocolFailure(&pdu.ProtocolError{FES: pdu.NVME_TCP_FES_PDU_SEQ_ERR, Msg: fmt.Sprintf("unexpected %v", h.Type)})
		}
		if c.isClosed() {
			return net.ErrClosed
		}
	}
}

// admit checks an arriving command capsule against the queue's state
// before anything is allocated for it. Before the queue is connected only
// one Fabrics Connect may arrive: anything else is a host that skipped
// Connect. Once connected, at most SQSIZE commands may be outstanding (the
// SQSIZE of Connect is 0's based: a queue of SQSIZE+1 entries holds SQSIZE
// commands), and on an I/O queue at most MAXCMD.
func (c *conn) admit(cmd *nvme.Command) error {
	if c.ctrl == nil {
		if !isConnect(cmd) {
			return c.violation("command opcode %#x before Fabrics Connect", cmd.Opcode())
		}
		if c.connectPending {
			return c.violation("second Fabrics Connect before the first was answered")
		}
		c.connectPending = true
	}
	c.wmu.Lock()
	c.outstanding++
	n, limit := c.outstanding, c.depthLimitLocked()
	c.wmu.Unlock()
	if n > limit {
		return c.violation("%d commands outstanding on queue %d, more than its limit of %d (SQSIZE %d, MAXCMD %d)",
			n, c.qid, limit, c.sqsize, c.t.maxCmd())
	}
	return nil
}

// depthLimitLocked is how many commands may be outstanding: one (the
// Connect) before the queue is connected; wmu held.
func (c *conn) depthLimitLocked() int {
	if c.sqsize == 0 {
		return 1
	}
	limit := int(c.sqsize)
	if c.qid > 0 {
		limit = min(limit, c.t.maxCmd())
	}
	return limit
}

func isConnect(cmd *nvme.Command) bool {
	return cmd.Opcode() == nvme.NVME_FABRICS_COMMAND && cmd.FabricsType() == nvme.NVME_FABRICS_TYPE_CONNECT
}

// checkH2CData enforces what ICResp told the host about H2C data PDUs: at
// most MAXH2CDATA bytes each, and the data placed at a multiple of
// (CPDA+1)*4 bytes.
func (c *conn) checkH2CData(h *pdu.Header) error {
	if max := c.t.cfg.MaxH2CData; h.Data.DataLength > max {
		return c.violationFES(pdu.NVME_TCP_FES_DATA_LIMIT_EXCEEDED, max, "H2CData of %d bytes, MAXH2CDATA %d", h.Data.DataLength, max)
	}
	return c.checkPDA(h)
}

// checkPDA enforces CPDA on an H2C PDU carrying data.
func (c *conn) checkPDA(h *pdu.Header) error {
	if align := (int(c.t.cfg.CPDA) + 1) * 4; c.t.cfg.CPDA > 0 && h.DataLen > 0 && int(h.PDO)%align != 0 {
		return c.violationFES(pdu.NVME_TCP_FES_INVALID_PDU_HDR, 3, "%v data at PDO %d, CPDA %d asks for a multiple of %d", h.Type, h.PDO, c.t.cfg.CPDA, align)
	}
	return nil
}

// violation records that the host broke the protocol and returns the
// error that ends the connection (with a C2HTermReq).
func (c *conn) violation(format string, args ...any) error {
	return c.violationFES(pdu.NVME_TCP_FES_PDU_SEQ_ERR, 0, format, args...)
}

func (c *conn) violationFES(fes uint16, fei uint32, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	c.t.recordViolation(msg)
	return &pdu.ProtocolError{FES: fes, FEI: fei, Msg: msg}
}

// protocolFailure sends a C2HTermReq for a protocol error and returns err.
func (c *conn) protocolFailure(err error) error {
	var pe *pdu.ProtocolError
	if errors.As(err, &pe) {
		h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeC2HTermReq}, Term: pdu.TermReq{FES: pe.FES, FEI: pe.FEI}}
		c.write(pdu.Append(nil, &h, nil, pdu.Options{}), nil, pdu.Options{})
	}
	return err
}

// write sends a header, data and data digest as one unit.
func (c *conn) write(hdr, data []byte, o pdu.Options) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.writeLocked(hdr, data, o)
}

// retireLocked counts a command as answered: called before its last PDU
// is written, so the host cannot have reused the slot yet; wmu held.
func (c *conn) retireLocked() {
	if c.outstanding > 0 {
		c.outstanding--
	}
}

func (c *conn) writeLocked(hdr, data []byte, o pdu.Options) error {
	return c.writeDigestLocked(hdr, data, o, false)
}

// writeDigestLocked is writeLocked, with a wrong data digest if corrupt.
func (c *conn) writeDigestLocked(hdr, data []byte, o pdu.Options, corrupt bool) error {
	if c.isClosed() {
		return net.ErrClosed
	}
	c.bw.Write(hdr)
	if len(data) > 0 {
		c.bw.Write(data)
		if o.DataDigest {
			var d [4]byte
			b := pdu.AppendDataDigest(d[:0], data)
			if corrupt {
				b[0] ^= 0xff
			}
			c.bw.Write(b)
		}
	}
	return c.bw.Flush()
}

// receive handles an arriving command capsule: faults, then the data
// phase (R2T) or execution.
func (c *conn) receive(cmd *command, inCapsule bool) error {
	f := c.t.faultFor(c.qid, &cmd.cmd)
	cmd.fault = f
	if f != nil {
		if f.Before != nil {
			f.Before()
		}
		if f.Stall > 0 {
			select {
			case <-time.After(f.Stall):
			case <-c.closed:
			}
		}
		if f.Close {
			c.close()
			return net.ErrClosed
		}
		if f.Reply != nil {
			c.connectPending = false
			c.wmu.Lock()
			c.retireLocked()
			c.writeLocked(f.Reply(&cmd.cmd), nil, pdu.Options{})
			c.wmu.Unlock()
			return nil
		}
	}
	_, length, typ := cmd.cmd.SGL()
	switch {
	case inCapsule:
		if typ != nvme.SGLInCapsule || int(length) != len(cmd.data) {
			c.respond(cmd, nvme.NVME_SC_SGL_INVALID_DATA|nvme.NVME_STATUS_DNR, 0)
			return nil
		}
	case c.authBlocks(&cmd.cmd):
		// Not admitted yet: answered (Authentication Required) with
		// nothing allocated for its data.
	case typ == nvme.SGLTransport && length > 0 && hostToController(&cmd.cmd):
		if int64(length) > c.t.maxTransfer() || c.ctrl == nil && length != nvme.ConnectDataSize {
			c.connectPending = false
			c.respond(cmd, nvme.NVME_SC_SGL_INVALID_DATA|nvme.NVME_STATUS_DNR, 0)
			return nil
		}
		if _, dup := c.pending[cmd.cmd.CommandID()]; dup {
			c.respond(cmd, nvme.NVME_SC_CMDID_CONFLICT|nvme.NVME_STATUS_DNR, 0)
			return nil
		}
		cmd.length = length
		c.pending[cmd.cmd.CommandID()] = cmd
		c.waiting = append(c.waiting, cmd)
		return c.requestWaitingData()
	}
	c.execute(cmd)
	return nil
}

// requestWaitingData sends an R2T, with a buffer for its data, to each
// waiting write in turn while the connection's write buffer allows: a
// host cannot make the target hold more than Config.MaxWriteBuffer (or one
// maximum transfer) of write data on one connection, however many writes
// it starts. The writes wait in order, with nothing allocated but their
// command.
func (c *conn) requestWaitingData() error {
	for len(c.waiting) > 0 {
		cmd := c.waiting[0]
		if c.buffered > 0 && c.buffered+int64(cmd.length) > c.t.maxWriteBuffer() {
			return nil
		}
		c.waiting[0] = nil
		c.waiting = c.waiting[1:]
		cmd.data = make([]byte, cmd.length)
		c.buffered += int64(cmd.length)
		c.nextTTag++
		cmd.ttag = c.nextTTag
		h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeR2T},
			R2T: pdu.R2T{CommandID: cmd.cmd.CommandID(), TTag: cmd.ttag, Offset: 0, Length: cmd.length}}
		if err := c.write(pdu.Append(nil, &h, nil, c.sendOpts), nil, c.sendOpts); err != nil {
			return err
		}
	}
	return nil
}

// hostToController reports whether the command moves data from the host
// (opcode bits 1:0 = 01b; Connect for fabrics commands).
func hostToController(cmd *nvme.Command) bool {
	if cmd.Opcode() == nvme.NVME_FABRICS_COMMAND {
		return cmd.FabricsType() == nvme.NVME_FABRICS_TYPE_CONNECT || cmd.FabricsType() == nvme.NVME_FABRICS_TYPE_AUTH_SEND
	}
	return cmd.Opcode()&3 == 1
}

// execute runs a command whose data (if any) has arrived and sends its
// data and response.
func (c *conn) execute(cmd *command) {
	if isConnect(&cmd.cmd) {
		c.connectPending = false
	}
	var st nvme.Status
	var result uint64
	var out []byte
	switch {
	case cmd.fault != nil && cmd.fault.Status.Code() != nvme.NVME_SC_SUCCESS:
		st = cmd.fault.Status
	case c.authBlocks(&cmd.cmd):
		st = nvme.NVME_SC_AUTH_REQUIRED | nvme.NVME_STATUS_DNR
	case c.qid == 0 || cmd.cmd.Opcode() == nvme.NVME_FABRICS_COMMAND:
		st, result, out = c.executeAdmin(cmd)
	default:
		st, result, out = c.executeIO(cmd)
	}
	if st == statusPending {
		return // an AER: completed by an event
	}
	if st&nvme.NVME_STATUS_CRD != 0 && (c.ctrl == nil || !c.ctrl.acreEnabled()) {
		// The Command Retry Delay field is cleared unless the host
		// enabled Advanced Command Retry (NVMe Base 2.0, 4.2.3).
		st &^= nvme.NVME_STATUS_CRD
	}
	_, length, typ := cmd.cmd.SGL()
	if len(out) > 0 && (typ != nvme.SGLTransport || int(length) < len(out)) {
		out = out[:min(len(out), int(length))]
		if typ != nvme.SGLTransport {
			out = nil
		}
	}
	if st.Code() != nvme.NVME_SC_SUCCESS {
		out = nil
	}
	c.reply(cmd, st, result, out)
}

// statusPending marks a command that completes later.
const statusPending nvme.Status = 0x7fff

// reply sends read data and the response, honouring Drop and Delay.
func (c *conn) reply(cmd *command, st nvme.Status, result uint64, out []byte) {
	send := func() {
		if len(out) > 0 {
			if !c.sendData(cmd, out) {
				return
			}
			if c.t.cfg.C2HSuccess && st == nvme.NVME_SC_SUCCESS && cmd.fault == nil {
				return // the last C2HData carried SUCCESS
			}
		}
		c.respond(cmd, st, result)
	}
	f := cmd.fault
	switch {
	case f != nil && f.Drop:
	case f != nil && f.Delay > 0:
		c.t.wg.Add(1)
		go func() {
			defer c.t.wg.Done()
			select {
			case <-time.After(f.Delay):
				send()
			case <-c.closed:
			}
		}()
	default:
		send()
	}
}

// sendData sends out as C2HData PDUs; false if the connection was closed
// on purpose in the middle.
func (c *conn) sendData(cmd *command, out []byte) bool {
	chunk := c.t.cfg.C2HChunk
	sent := 0
	for off := 0; off < len(out); off += chunk {
		n := min(chunk, len(out)-off)
		h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeC2HData},
			Data: pdu.DataHeader{CommandID: cmd.cmd.CommandID(), DataOffset: uint32(off)}}
		if off+n == len(out) {
			h.Flags = pdu.NVME_TCP_F_DATA_LAST
			if c.t.cfg.C2HSuccess && cmd.fault == nil {
				h.Flags |= pdu.NVME_TCP_F_DATA_SUCCESS
			}
		}
		if f := cmd.fault; f != nil && f.CloseAfterData > 0 && sent+n > f.CloseAfterData {
			c.write(pdu.AppendHeader(nil, &h, n, c.sendOpts), nil, c.sendOpts)
			c.write(nil, out[off:off+f.CloseAfterData-sent], pdu.Options{})
			c.close()
			return false
		}
		c.wmu.Lock()
		if h.Flags&pdu.NVME_TCP_F_DATA_SUCCESS != 0 {
			c.retireLocked() // this PDU is the command's response
		}
		// CorruptDataDigest spoils the first C2HData of the command.
		corrupt := off == 0 && cmd.fault != nil && cmd.fault.CorruptDataDigest
		err := c.writeDigestLocked(pdu.AppendHeader(nil, &h, n, c.sendOpts), out[off:off+n], c.sendOpts, corrupt)
		c.wmu.Unlock()
		if err != nil {
			return false
		}
		sent += n
	}
	return true
}

// respond sends a CapsuleResp.
func (c *conn) respond(cmd *command, st nvme.Status, result uint64) {
	var cqe nvme.Completion
	cqe.SetCommandID(cmd.cmd.CommandID())
	cqe.SetResult(result)
	cqe.SetStatus(st)
	// qid, sqsize and sqhd are guarded by wmu: responses are sent from
	// the serve goroutine, delayed-response goroutines and events.
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.retireLocked()
	cqe.SetSQID(c.qid)
	if !c.sqhdDisabled {
		c.sqhd = (c.sqhd + 1) % (c.sqsize + 1)
	}
	cqe.SetSQHead(c.sqhd)
	h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeCapsuleResp}, Resp: cqe}
	c.writeLocked(pdu.Append(nil, &h, nil, c.sendOpts), nil, c.sendOpts)
}
