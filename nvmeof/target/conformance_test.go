package target

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/auth"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/internal/pdu"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// These tests drive the target with a raw host written here, PDU by PDU,
// to check what it demands of hosts (SQSIZE, MAXCMD, MAXH2CDATA, CPDA,
// Connect first) and what its odd-target modes report.

const rawHostNQN = "nqn.2026-11.io.example:raw-host"

// newRawTarget starts a target with cfg, one subsystem (fuzzNQN) with a
// 1 MiB namespace of 512-byte blocks, listening on loopback.
func newRawTarget(t *testing.T, cfg Config) (*Target, string) {
	t.Helper()
	cfg.Logger = slog.New(slog.DiscardHandler)
	tg := New(cfg)
	t.Cleanup(func() { tg.Close() })
	sub, err := tg.AddSubsystem(fuzzNQN)
	if err != nil {
		t.Fatal(err)
	}
	if err := sub.AddNamespace(NamespaceConfig{NSID: 1, Backend: NewMemoryBackend(1 << 20)}); err != nil {
		t.Fatal(err)
	}
	addr, err := tg.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return tg, addr.String()
}

// rawHost is one connection to the target, spoken PDU by PDU.
type rawHost struct {
	t    *testing.T
	nc   net.Conn
	rd   *pdu.Reader
	o    pdu.Options // what this host sends with (PDA: the target's CPDA)
	resp pdu.ICResp
	cid  uint16
}

func dialRaw(t *testing.T, addr string, digests bool) *rawHost {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(60 * time.Second)) // a hang, not slowness
	h := &rawHost{t: t, nc: nc, rd: pdu.NewReader(nc, pdu.ControllerToHost, 1<<20)}
	ic := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeICReq}}
	if digests {
		ic.ICReq.Digest = pdu.NVME_TCP_HDR_DIGEST_ENABLE | pdu.NVME_TCP_DATA_DIGEST_ENABLE
	}
	h.write(pdu.Append(nil, &ic, nil, pdu.Options{}))
	r := h.next()
	if r.Type != pdu.TypeICResp {
		t.Fatalf("got %v instead of ICResp", r.Type)
	}
	h.resp = r.ICResp
	h.o = pdu.Options{HeaderDigest: digests, DataDigest: digests, PDA: r.ICResp.CPDA}
	h.rd.Options = pdu.Options{HeaderDigest: digests, DataDigest: digests}
	return h
}

func (h *rawHost) write(b []byte) {
	h.t.Helper()
	if _, err := h.nc.Write(b); err != nil {
		h.t.Fatalf("write: %v", err)
	}
}

// next reads the next PDU, and its data into h.Data-sized scratch.
func (h *rawHost) next() pdu.Header {
	h.t.Helper()
	var p pdu.Header
	if err := h.rd.ReadHeader(&p); err != nil {
		h.t.Fatalf("read: %v", err)
	}
	if err := h.rd.ReadData(make([]byte, p.DataLen)); p.DataLen > 0 && err != nil {
		h.t.Fatalf("read data: %v", err)
	}
	return p
}

// send sends cmd with a fresh command ID and, if data is not nil, the data
// in the capsule.
func (h *rawHost) send(cmd nvme.Command, data []byte) uint16 {
	h.t.Helper()
	h.cid++
	cmd.SetCommandID(h.cid)
	if data != nil {
		cmd.SetSGL(0, uint32(len(data)), nvme.SGLInCapsule)
	}
	p := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeCapsuleCmd}, Cmd: cmd}
	h.write(pdu.Append(nil, &p, data, h.o))
	return h.cid
}

// response reads PDUs until the CapsuleResp for cid.
func (h *rawHost) response(cid uint16) nvme.Completion {
	h.t.Helper()
	for {
		p := h.next()
		if p.Type == pdu.TypeC2HTermReq {
			h.t.Fatalf("C2HTermReq fes %#x waiting for %#x", p.Term.FES, cid)
		}
		if p.Type == pdu.TypeCapsuleResp && p.Resp.CommandID() == cid {
			return p.Resp
		}
	}
}

func (h *rawHost) connect(qid, sqsize, cntlid uint16) uint16 {
	h.t.Helper()
	var c nvme.Command
	c.SetConnect(nvme.Connect{QID: qid, SQSize: sqsize})
	data := (&nvme.ConnectData{CNTLID: cntlid, SubsysNQN: fuzzNQN, HostNQN: rawHostNQN}).Marshal()
	r := h.response(h.send(c, data))
	if r.Status() != 0 {
		h.t.Fatalf("Connect queue %d: %v", qid, r.Status())
	}
	return uint16(r.Result())
}

// setupIO connects an admin queue, enables the controller and connects
// I/O queue 1 with sqsize.
func setupIO(t *testing.T, addr string, sqsize uint16, digests bool) (admin, io *rawHost) {
	t.Helper()
	admin = dialRaw(t, addr, digests)
	cntlid := admin.connect(0, 31, nvme.NVME_CNTLID_DYNAMIC)
	var c nvme.Command
	c.SetPropertySet(nvme.NVME_REG_CC, false, nvme.NVME_CC_ENABLE)
	if r := admin.response(admin.send(c, nil)); r.Status() != 0 {
		t.Fatalf("enable: %v", r.Status())
	}
	io = dialRaw(t, addr, digests)
	io.connect(1, sqsize, cntlid)
	return admin, io
}

func ioCommand(op uint8, slba uint64, nlb uint32) nvme.Command {
	var c nvme.Command
	c.SetOpcode(op)
	c.SetNSID(1)
	c.SetCDW(10, uint32(slba))
	c.SetCDW(11, uint32(slba>>32))
	c.SetCDW(12, nlb-1)
	return c
}

// transportWrite sends a write of n bytes at LBA 0 whose data goes by R2T.
func (h *rawHost) transportWrite(n int) uint16 {
	c := ioCommand(nvme.NVME_CMD_WRITE, 0, uint32(n/512))
	c.SetSGL(0, uint32(n), nvme.SGLTransport)
	return h.send(c, nil)
}

// expectTermination reads until the target's C2HTermReq and the end of
// the connection, and returns the C2HTermReq.
func (h *rawHost) expectTermination() pdu.TermReq {
	h.t.Helper()
	var term *pdu.TermReq
	for {
		var p pdu.Header
		err := h.rd.ReadHeader(&p)
		if err != nil {
			if term == nil {
				h.t.Fatalf("connection ended (%v) without a C2HTermReq", err)
			}
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) && !strings.Contains(err.Error(), "reset") {
				h.t.Fatalf("after the C2HTermReq: %v, want the end of the connection", err)
			}
			return *term
		}
		h.rd.DiscardData()
		if p.Type == pdu.TypeC2HTermReq {
			term = &p.Term
		}
	}
}

func wantViolation(t *testing.T, tg *Target, substr string) {
	t.Helper()
	v, n := tg.Violations()
	if n != 1 || !strings.Contains(v[0], substr) {
		t.Fatalf("violations %q (%d), want one about %q", v, n, substr)
	}
}

// A host that keeps more than SQSIZE commands outstanding (SQSIZE is 0's
// based: a queue of SQSIZE+1 entries holds SQSIZE) breaks the protocol:
// the target ends the connection and records it.
func TestTargetEnforcesSQSIZE(t *testing.T) {
	tg, addr := newRawTarget(t, Config{})
	h := dialRaw(t, addr, false)
	h.connect(0, 3, nvme.NVME_CNTLID_DYNAMIC)
	tg.InjectFault(Fault{QID: 0, Match: MatchKeepAlive(), Delay: time.Hour})
	var ka nvme.Command
	ka.SetOpcode(nvme.NVME_ADMIN_KEEP_ALIVE)
	for range 3 {
		h.send(ka, nil)
	}
	if v, n := tg.Violations(); n != 0 {
		t.Fatalf("SQSIZE commands outstanding: violations %q", v)
	}
	h.send(ka, nil)
	if term := h.expectTermination(); term.FES != pdu.NVME_TCP_FES_PDU_SEQ_ERR {
		t.Fatalf("C2HTermReq fes %#x", term.FES)
	}
	wantViolation(t, tg, "4 commands outstanding on queue 0, more than its limit of 3")
}

// MAXCMD bounds the commands outstanding on an I/O queue below SQSIZE;
// answered commands do not count.
func TestTargetEnforcesMAXCMD(t *testing.T) {
	tg, addr := newRawTarget(t, Config{MaxCmd: 2})
	_, h := setupIO(t, addr, 15, false)
	for range 5 { // answered one by one: never more than one outstanding
		if st := h.flush(); st != 0 {
			t.Fatalf("flush: %v", st)
		}
	}
	tg.InjectFault(Fault{QID: 1, Delay: time.Hour})
	for range 3 {
		h.send(ioCommand(nvme.NVME_CMD_FLUSH, 0, 1), nil)
	}
	h.expectTermination()
	wantViolation(t, tg, "more than its limit of 2 (SQSIZE 15, MAXCMD 2)")
}

// Before Fabrics Connect a queue takes nothing but one Connect.
func TestTargetCommandBeforeConnect(t *testing.T) {
	tg, addr := newRawTarget(t, Config{})
	h := dialRaw(t, addr, false)
	h.transportWrite(1 << 20)
	h.expectTermination()
	wantViolation(t, tg, "before Fabrics Connect")
}

// H2CData longer than MAXH2CDATA, or with its data not at a multiple of
// (CPDA+1)*4, ends the connection; split and padded, the write succeeds.
func TestTargetEnforcesMAXH2CDATAAndCPDA(t *testing.T) {
	for _, tc := range []struct {
		name   string
		chunk  int
		noPad  bool
		errMsg string
	}{
		{"conforming", 4096, false, ""},
		{"over MAXH2CDATA", 8192, false, "H2CData of 8192 bytes, MAXH2CDATA 4096"},
		{"unaligned", 4096, true, "CPDA 3 asks for a multiple of 16"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tg, addr := newRawTarget(t, Config{MaxH2CData: 4096, CPDA: 3})
			_, h := setupIO(t, addr, 15, false)
			if h.resp.MaxH2CData != 4096 || h.resp.CPDA != 3 {
				t.Fatalf("ICResp %+v", h.resp)
			}
			cid := h.transportWrite(8192)
			r2t := h.next()
			if r2t.Type != pdu.TypeR2T || r2t.R2T.Length != 8192 {
				t.Fatalf("got %v %+v, want an R2T for 8192 bytes", r2t.Type, r2t.R2T)
			}
			o := h.o
			if tc.noPad {
				o.PDA = 0
			}
			for off := 0; off < 8192; off += tc.chunk {
				d := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeH2CData},
					Data: pdu.DataHeader{CommandID: cid, TTag: r2t.R2T.TTag, DataOffset: uint32(off)}}
				if off+tc.chunk == 8192 {
					d.Flags = pdu.NVME_TCP_F_DATA_LAST
				}
				h.write(pdu.Append(nil, &d, make([]byte, tc.chunk), o))
			}
			if tc.errMsg == "" {
				if r := h.response(cid); r.Status() != 0 {
					t.Fatalf("write: %v", r.Status())
				}
				if v, n := tg.Violations(); n != 0 {
					t.Fatalf("violations %q", v)
				}
				return
			}
			h.expectTermination()
			wantViolation(t, tg, tc.errMsg)
		})
	}
}

// With IOCCSZ at its minimum no write data may travel in the capsule.
func TestTargetNoInCapsuleData(t *testing.T) {
	tg, addr := newRawTarget(t, Config{InCapsuleDataSize: NoInCapsuleData})
	admin, h := setupIO(t, addr, 15, false)
	ctrl := admin.identifyController()
	if ctrl.IOCCSZ != 4 {
		t.Fatalf("IOCCSZ %d, want 4", ctrl.IOCCSZ)
	}
	h.send(ioCommand(nvme.NVME_CMD_WRITE, 0, 1), make([]byte, 512))
	h.expectTermination()
	wantViolation(t, tg, "512 bytes of in-capsule data, at most 0 on queue 1")
}

// identifyController sends an Identify Controller and returns the data
// it reads.
func (h *rawHost) identifyController() *nvme.IdentifyController {
	h.t.Helper()
	var cmd nvme.Command
	cmd.SetOpcode(nvme.NVME_ADMIN_IDENTIFY)
	cmd.SetCDW(10, nvme.NVME_ID_CNS_CTRL)
	cmd.SetSGL(0, nvme.IdentifySize, nvme.SGLTransport)
	cid := h.send(cmd, nil)
	var data []byte
	for {
		var p pdu.Header
		if err := h.rd.ReadHeader(&p); err != nil {
			h.t.Fatal(err)
		}
		if p.DataLen > 0 {
			b := make([]byte, p.DataLen)
			if err := h.rd.ReadData(b); err != nil {
				h.t.Fatal(err)
			}
			data = append(data, b...)
		}
		if p.Type == pdu.TypeCapsuleResp && p.Resp.CommandID() == cid {
			if p.Resp.Status() != 0 {
				h.t.Fatalf("identify: %v", p.Resp.Status())
			}
			id, err := nvme.ParseIdentifyController(data)
			if err != nil {
				h.t.Fatal(err)
			}
			return id
		}
	}
}

// The odd-target modes show in Identify Controller: MDTS 0 (no limit),
// the extremes as given, MAXCMD, CRDT.
func TestTargetIdentifyModes(t *testing.T) {
	for _, tc := range []struct {
		cfg  Config
		mdts uint8
	}{
		{Config{NoMDTS: true}, 0},
		{Config{MDTS: 1}, 1},
		{Config{MDTS: 51}, 51},
		{Config{MDTS: 255, MaxCmd: 7, CRDT: [3]uint16{5, 20, 300}}, 255},
	} {
		_, addr := newRawTarget(t, tc.cfg)
		admin, _ := setupIO(t, addr, 15, false)
		ctrl := admin.identifyController()
		wantCmd := uint16(1024)
		if tc.cfg.MaxCmd != 0 {
			wantCmd = uint16(tc.cfg.MaxCmd)
		}
		if ctrl.MDTS != tc.mdts || ctrl.MAXCMD != wantCmd || ctrl.CRDT != tc.cfg.CRDT {
			t.Errorf("config %+v: MDTS %d MAXCMD %d CRDT %v", tc.cfg, ctrl.MDTS, ctrl.MAXCMD, ctrl.CRDT)
		}
	}
}

// The CRD field of a status is sent only after the host enabled Advanced
// Command Retry through Host Behavior Support; before that it is cleared.
func TestTargetCRDNeedsACRE(t *testing.T) {
	tg, addr := newRawTarget(t, Config{CRDT: [3]uint16{5}})
	admin, h := setupIO(t, addr, 15, false)
	nnr := nvme.NVME_SC_NS_NOT_READY | 1<<11 // CRD 1
	tg.InjectFault(Fault{QID: AnyIOQueue, Match: MatchIO(), Status: nnr})
	if st := h.flush(); st != nvme.NVME_SC_NS_NOT_READY {
		t.Fatalf("without ACRE: status %#x, want Namespace Not Ready without CRD", uint16(st))
	}
	var sf nvme.Command
	sf.SetOpcode(nvme.NVME_ADMIN_SET_FEATURES)
	sf.SetCDW(10, nvme.NVME_FEAT_HOST_BEHAVIOR)
	hb := make([]byte, nvme.HostBehaviorSize)
	hb[0] = nvme.NVME_ENABLE_ACRE
	if r := admin.response(admin.send(sf, hb)); r.Status() != 0 {
		t.Fatalf("Set Features Host Behavior Support: %v", r.Status())
	}
	if st := h.flush(); st != nnr {
		t.Fatalf("with ACRE: status %#x, want %#x", uint16(st), uint16(nnr))
	}
}

// A fault with For stops hitting once that time has passed.
func TestTargetFaultFor(t *testing.T) {
	tg, addr := newRawTarget(t, Config{})
	_, h := setupIO(t, addr, 15, false)
	tg.InjectFault(Fault{QID: AnyIOQueue, Match: MatchIO(), Status: nvme.NVME_SC_NS_NOT_READY, For: time.Millisecond})
	tg.InjectFault(Fault{QID: AnyIOQueue, Match: MatchIO(), Status: nvme.NVME_SC_INTERNAL, For: time.Hour})
	time.Sleep(2 * time.Millisecond)
	if st := h.flush(); st != nvme.NVME_SC_INTERNAL {
		t.Fatalf("status %v, want the fault that has not ended", st)
	}
}

// CorruptDataDigest spoils the data digest of a read's first C2HData.
func TestTargetCorruptDataDigest(t *testing.T) {
	tg, addr := newRawTarget(t, Config{C2HChunk: 512})
	_, h := setupIO(t, addr, 15, true)
	tg.InjectFault(Fault{QID: 1, Match: MatchOpcode(nvme.NVME_CMD_READ), CorruptDataDigest: true, Times: 1})
	for i, want := range []bool{true, false} {
		c := ioCommand(nvme.NVME_CMD_READ, 0, 2)
		c.SetSGL(0, 1024, nvme.SGLTransport)
		h.send(c, nil)
		var bad []bool
		for {
			var p pdu.Header
			if err := h.rd.ReadHeader(&p); err != nil {
				t.Fatal(err)
			}
			if p.Type == pdu.TypeCapsuleResp {
				break
			}
			err := h.rd.ReadData(make([]byte, p.DataLen))
			bad = append(bad, errors.Is(err, pdu.ErrDataDigest))
		}
		if len(bad) != 2 || bad[0] != want || bad[1] {
			t.Fatalf("read %d: digest errors per C2HData %v, want [%v false]", i, bad, want)
		}
	}
}

// heapInUse is the live heap after a collection.
func heapInUse() int64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapAlloc)
}

// TestTargetHostileMemoryBound: however many writes a host starts without
// sending their data, one connection holds at most MaxWriteBuffer of
// write buffers (the rest wait for their R2T with nothing allocated); the
// command after SQSIZE ends the connection; capsules before Connect end it
// at once. The heap grows by less than the stated bound, measured.
func TestTargetHostileMemoryBound(t *testing.T) {
	const sqsize = 127
	const bound = 4<<20 + 2<<20 // MaxWriteBuffer (4 MiB) and slack for the runtime and 128 commands
	tg, addr := newRawTarget(t, Config{})
	_, h := setupIO(t, addr, sqsize, false)
	before := heapInUse()
	for range sqsize {
		h.transportWrite(1 << 20)
	}
	// The target asks for data within its write buffer: 4 MiB, 4 R2Ts.
	var r2ts []pdu.R2T
	for len(r2ts) < 4 {
		if p := h.next(); p.Type == pdu.TypeR2T {
			r2ts = append(r2ts, p.R2T)
		}
	}
	// Send the first write's data: once it is answered, every capsule
	// before it has been read (the target reads in order).
	h.sendData(r2ts[0], make([]byte, 1<<20))
	if r := h.response(r2ts[0].CommandID); r.Status() != 0 {
		t.Fatalf("write: %v", r.Status())
	}
	// One buffer freed: the fifth write gets its R2T.
	if p := h.next(); p.Type != pdu.TypeR2T || p.R2T.CommandID == r2ts[0].CommandID {
		t.Fatalf("got %v %+v, want the next write's R2T", p.Type, p.R2T)
	}
	held := heapInUse() - before
	t.Logf("heap grew by %d KiB with %d writes of 1 MiB waiting for data", held>>10, sqsize-1)
	if held > bound {
		t.Fatalf("heap grew by %d bytes with %d writes waiting, bound %d", held, sqsize-1, bound)
	}
	// Many more command IDs: the first past SQSIZE ends the connection.
	for range 2 {
		h.transportWrite(1 << 20)
	}
	h.expectTermination()
	wantViolation(t, tg, "more than its limit of 127")

	// Capsules without Connect, on many connections at once: each ends
	// at its first capsule, with nothing allocated for it.
	before = heapInUse()
	var conns []*rawHost
	for range 50 {
		c := dialRaw(t, addr, false)
		c.transportWrite(1 << 20)
		conns = append(conns, c)
	}
	for _, c := range conns {
		c.expectTermination()
	}
	if grew := heapInUse() - before; grew > bound {
		t.Fatalf("heap grew by %d bytes after 50 connections without Connect", grew)
	}
	if _, n := tg.Violations(); n != 51 {
		t.Fatalf("%d violations, want 51", n)
	}
}

// flush sends a Flush and returns its status.
func (h *rawHost) flush() nvme.Status {
	h.t.Helper()
	r := h.response(h.send(ioCommand(nvme.NVME_CMD_FLUSH, 0, 1), nil))
	return r.Status()
}

// sendData answers an R2T with H2CData PDUs of at most MAXH2CDATA.
func (h *rawHost) sendData(r2t pdu.R2T, data []byte) {
	h.t.Helper()
	var b []byte
	for off := 0; off < len(data); off += int(h.resp.MaxH2CData) {
		n := min(len(data)-off, int(h.resp.MaxH2CData))
		d := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeH2CData},
			Data: pdu.DataHeader{CommandID: r2t.CommandID, TTag: r2t.TTag, DataOffset: r2t.Offset + uint32(off)}}
		if off+n == len(data) {
			d.Flags = pdu.NVME_TCP_F_DATA_LAST
		}
		b = pdu.Append(b, &d, data[off:off+n], h.o)
	}
	h.write(b)
}

// A connected queue that has not authenticated yet (DH-HMAC-CHAP
// required) gets Authentication Required for a write at once: no R2T, no
// buffer for its data.
func TestTargetUnauthenticatedWriteGetsNoBuffer(t *testing.T) {
	secret, err := auth.ParseSecret("DHHC-1:01:bHuByyp0b3RFSx1xQPMVO1HKmUWfzveoahfydpW4fNgSLMVm:")
	if err != nil {
		t.Fatal(err)
	}
	_, addr := newRawTarget(t, Config{Auth: func(host, subsys string) *auth.ControllerConfig {
		return &auth.ControllerConfig{HostSecret: secret}
	}})
	h := dialRaw(t, addr, false)
	h.connect(0, 31, nvme.NVME_CNTLID_DYNAMIC)
	cid := h.transportWrite(1 << 20)
	p := h.next()
	if p.Type != pdu.TypeCapsuleResp || p.Resp.CommandID() != cid || p.Resp.Status().Code() != nvme.NVME_SC_AUTH_REQUIRED {
		t.Fatalf("got %v (status %v), want Authentication Required for the write", p.Type, p.Resp.Status())
	}
}

// MaxConnections closes a connection past the limit as soon as it is
// accepted; once one closes, a new one is served.
func TestTargetMaxConnections(t *testing.T) {
	_, addr := newRawTarget(t, Config{MaxConnections: 2})
	a, b := dialRaw(t, addr, false), dialRaw(t, addr, false)
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(60 * time.Second))
	if n, err := nc.Read(make([]byte, 1)); err == nil {
		t.Fatalf("third connection: read %d bytes, want it closed", n)
	}
	a.nc.Close()
	b.connect(0, 31, nvme.NVME_CNTLID_DYNAMIC)
	// The closed one leaves the table when its goroutine ends; then a
	// new connection is served.
	for {
		nc, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		nc.SetDeadline(time.Now().Add(60 * time.Second))
		ic := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeICReq}}
		nc.Write(pdu.Append(nil, &ic, nil, pdu.Options{}))
		_, err = io.ReadFull(nc, make([]byte, 128))
		nc.Close()
		if err == nil {
			return
		}
		time.Sleep(time.Millisecond)
	}
}
