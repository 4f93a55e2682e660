package target

import (
	"io"
	"log/slog"
	"net"
	"testing"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/internal/pdu"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

const fuzzNQN = "nqn.2026-11.io.ublk-nvmeof:fuzz"

// hostStream builds a plausible host byte stream: ICReq, Connect, enable,
// Identify, a write through R2T/H2CData and a read.
func hostStream(o pdu.Options) []byte {
	var b []byte
	ic := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeICReq}}
	if o.HeaderDigest {
		ic.ICReq.Digest |= pdu.NVME_TCP_HDR_DIGEST_ENABLE
	}
	if o.DataDigest {
		ic.ICReq.Digest |= pdu.NVME_TCP_DATA_DIGEST_ENABLE
	}
	b = pdu.Append(b, &ic, nil, pdu.Options{})
	cmd := func(c nvme.Command, data []byte) {
		h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeCapsuleCmd}, Cmd: c}
		b = pdu.Append(b, &h, data, o)
	}
	var c nvme.Command
	c.SetConnect(nvme.Connect{SQSize: 31, KATO: 0})
	data := (&nvme.ConnectData{CNTLID: 0xffff, SubsysNQN: fuzzNQN, HostNQN: "nqn.2026-11.io.example:h"}).Marshal()
	c.SetSGL(0, uint32(len(data)), nvme.SGLInCapsule)
	cmd(c, data)
	c.SetPropertySet(nvme.NVME_REG_CC, false, nvme.NVME_CC_ENABLE)
	c.SetCommandID(1)
	cmd(c, nil)
	c = nvme.Command{}
	c.SetOpcode(nvme.NVME_ADMIN_IDENTIFY)
	c.SetCommandID(2)
	c.SetCDW(10, nvme.NVME_ID_CNS_CTRL)
	c.SetSGL(0, 4096, nvme.SGLTransport)
	cmd(c, nil)
	c = nvme.Command{}
	c.SetOpcode(nvme.NVME_CMD_WRITE)
	c.SetCommandID(3)
	c.SetNSID(1)
	c.SetSGL(0, 512, nvme.SGLTransport)
	cmd(c, nil)
	h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeH2CData, Flags: pdu.NVME_TCP_F_DATA_LAST},
		Data: pdu.DataHeader{CommandID: 3, TTag: 1}}
	b = pdu.Append(b, &h, make([]byte, 512), o)
	c.SetOpcode(nvme.NVME_CMD_READ)
	c.SetCommandID(4)
	cmd(c, nil)
	return b
}

// FuzzTargetConn feeds arbitrary host bytes to one target connection: the
// target must answer or close, never panic or hang, and Close must return.
func FuzzTargetConn(f *testing.F) {
	f.Add(hostStream(pdu.Options{}))
	f.Add(hostStream(pdu.Options{HeaderDigest: true, DataDigest: true}))
	f.Fuzz(func(t *testing.T, b []byte) {
		fuzzConn(t, Config{Logger: slog.New(slog.DiscardHandler)}, b)
	})
}

// newFuzzTarget is a target made with cfg holding subsystem fuzzNQN with
// one 64 KiB namespace, NSID 1.
func newFuzzTarget(t *testing.T, cfg Config) *Target {
	t.Helper()
	tg := New(cfg)
	sub, err := tg.AddSubsystem(fuzzNQN)
	if err != nil {
		t.Fatal(err)
	}
	if err := sub.AddNamespace(NamespaceConfig{NSID: 1, Backend: NewMemoryBackend(64 << 10)}); err != nil {
		t.Fatal(err)
	}
	return tg
}

// servePipe serves one connection of tg over a net.Pipe, as accept
// would, and returns the host's end; tg.Close joins the connection.
func servePipe(tg *Target) net.Conn {
	server, client := net.Pipe()
	c := newConn(tg, server)
	tg.mu.Lock()
	tg.conns[c] = struct{}{}
	tg.wg.Add(1)
	tg.mu.Unlock()
	go c.serve()
	return client
}

// fuzzConn feeds b as a host's bytes to one connection of a target made
// with cfg (newFuzzTarget), draining every answer, then closes the host's
// end and the target: it must not panic and Close must return.
func fuzzConn(t *testing.T, cfg Config, b []byte) {
	tg := newFuzzTarget(t, cfg)
	client := servePipe(tg)
	drained := make(chan struct{})
	go func() {
		io.Copy(io.Discard, client)
		close(drained)
	}()
	client.Write(b)
	client.Close()
	tg.Close()
	<-drained
}

// TestHostStream checks that the fuzz seed is a valid conversation, so
// the fuzzer starts from inputs that reach every command path.
func TestHostStream(t *testing.T) {
	for _, o := range []pdu.Options{{}, {HeaderDigest: true, DataDigest: true}} {
		tg := newFuzzTarget(t, Config{Logger: slog.New(slog.DiscardHandler)})
		client := servePipe(tg)
		go client.Write(hostStream(o))

		rd := pdu.NewReader(client, pdu.ControllerToHost, 1<<20)
		var types []pdu.Type
		var h pdu.Header
		for len(types) < 8 {
			if err := rd.ReadHeader(&h); err != nil {
				t.Fatalf("after %v: %v", types, err)
			}
			if h.Type == pdu.TypeICResp {
				rd.Options = pdu.Options{HeaderDigest: o.HeaderDigest, DataDigest: o.DataDigest}
			}
			// Reads and writes on the admin queue fail with Invalid
			// Opcode, after their data phase.
			if h.Type == pdu.TypeCapsuleResp && h.Resp.Status() != 0 && h.Resp.CommandID() < 3 {
				t.Fatalf("command %d failed: %v", h.Resp.CommandID(), h.Resp.Status())
			}
			if err := rd.ReadData(make([]byte, h.DataLen)); h.DataLen > 0 && err != nil {
				t.Fatal(err)
			}
			types = append(types, h.Type)
		}
		want := []pdu.Type{pdu.TypeICResp, pdu.TypeCapsuleResp, pdu.TypeCapsuleResp, pdu.TypeC2HData, pdu.TypeCapsuleResp, pdu.TypeR2T, pdu.TypeCapsuleResp, pdu.TypeCapsuleResp}
		for i := range want {
			if types[i] != want[i] {
				t.Fatalf("conversation %v, want %v", types, want)
			}
		}
		client.Close()
		tg.Close()
	}
}
