package target

import (
	"log/slog"
	"testing"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/auth"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/internal/pdu"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// authHostStream is a host that connects to a target requiring
// DH-HMAC-CHAP and sends the first messages: AUTH_Negotiate, a receive for
// the challenge, a reply (wrong: the fuzzer cannot know the secret), a
// receive for the result, then a command that must be refused.
func authHostStream() []byte {
	var b []byte
	ic := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeICReq}}
	b = pdu.Append(b, &ic, nil, pdu.Options{})
	cmd := func(c nvme.Command, data []byte) {
		h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeCapsuleCmd}, Cmd: c}
		b = pdu.Append(b, &h, data, pdu.Options{})
	}
	var c nvme.Command
	c.SetConnect(nvme.Connect{SQSize: 31})
	data := (&nvme.ConnectData{CNTLID: 0xffff, SubsysNQN: fuzzNQN, HostNQN: "nqn.2026-11.io.example:h"}).Marshal()
	c.SetSGL(0, uint32(len(data)), nvme.SGLInCapsule)
	cmd(c, data)
	send := func(id uint16, msg []byte) {
		var c nvme.Command
		c.SetAuthSend(nvme.AuthCommand{SECP: 0xe9, SPSP0: 1, SPSP1: 1, Length: uint32(len(msg))})
		c.SetCommandID(id)
		c.SetSGL(0, uint32(len(msg)), nvme.SGLInCapsule)
		cmd(c, msg)
	}
	recv := func(id uint16, al uint32) {
		var c nvme.Command
		c.SetAuthReceive(nvme.AuthCommand{SECP: 0xe9, SPSP0: 1, SPSP1: 1, Length: al})
		c.SetCommandID(id)
		c.SetSGL(0, al, nvme.SGLTransport)
		cmd(c, nil)
	}
	send(1, (&auth.Negotiate{TID: 1, Hashes: auth.AllHashes, DHGroups: auth.AllDHGroups}).Marshal())
	recv(2, 4096)
	send(3, (&auth.Reply{TID: 1, R: make([]byte, 32)}).Marshal())
	recv(4, 80)
	c = nvme.Command{}
	c.SetPropertyGet(nvme.NVME_REG_CAP, true)
	c.SetCommandID(5)
	cmd(c, nil)
	return b
}

// FuzzTargetAuth feeds arbitrary host bytes to a target connection that
// requires authentication: it answers or closes, never panics or hangs,
// allocates no more than maxAuthReceive for a receive, and Close returns.
func FuzzTargetAuth(f *testing.F) {
	f.Add(authHostStream())
	secret, err := auth.ParseSecret("DHHC-1:01:bHuByyp0b3RFSx1xQPMVO1HKmUWfzveoahfydpW4fNgSLMVm:")
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		fuzzConn(t, Config{Logger: slog.New(slog.DiscardHandler), Auth: func(string, string) *auth.ControllerConfig {
			return &auth.ControllerConfig{HostSecret: secret, Hash: auth.NVME_AUTH_HASH_SHA256}
		}}, b)
	})
}

// TestAuthHostStream checks the seed: the target challenges, refuses the
// wrong reply with AUTH_Failure1, and refuses the Property Get with
// Authentication Required.
func TestAuthHostStream(t *testing.T) {
	secret, _ := auth.ParseSecret("DHHC-1:01:bHuByyp0b3RFSx1xQPMVO1HKmUWfzveoahfydpW4fNgSLMVm:")
	tg := newFuzzTarget(t, Config{Logger: slog.New(slog.DiscardHandler), Auth: func(string, string) *auth.ControllerConfig {
		return &auth.ControllerConfig{HostSecret: secret, Hash: auth.NVME_AUTH_HASH_SHA256}
	}})
	defer tg.Close()
	client := servePipe(tg)
	defer client.Close()
	go client.Write(authHostStream())

	rd := pdu.NewReader(client, pdu.ControllerToHost, 1<<20)
	var h pdu.Header
	var data []byte
	results := map[uint16]nvme.Status{}
	var challenge, failure []byte
	for len(results) < 6 {
		if err := rd.ReadHeader(&h); err != nil {
			t.Fatalf("after %v: %v", results, err)
		}
		data = make([]byte, h.DataLen)
		if err := rd.ReadData(data); h.DataLen > 0 && err != nil {
			t.Fatal(err)
		}
		switch h.Type {
		case pdu.TypeC2HData:
			if h.Data.CommandID == 2 {
				challenge = data
			} else if h.Data.CommandID == 4 {
				failure = data
			}
		case pdu.TypeCapsuleResp:
			cqe := h.Resp
			results[cqe.CommandID()] = cqe.Status()
			if cqe.CommandID() == 0 && cqe.Result()&nvme.NVME_CONNECT_AUTHREQ_ATR == 0 {
				t.Fatalf("Connect result %#x without ATR", cqe.Result())
			}
		}
	}
	if ch, err := auth.ParseChallenge(challenge); err != nil || ch.Hash != auth.NVME_AUTH_HASH_SHA256 || ch.DHGroup != auth.NVME_AUTH_DHGROUP_NULL {
		t.Fatalf("challenge %+v %v", ch, err)
	}
	if f, err := auth.ParseFailure(failure); err != nil || f.AuthID != auth.NVME_AUTH_DHCHAP_MESSAGE_FAILURE1 || f.Reason != auth.NVME_AUTH_DHCHAP_FAILURE_FAILED {
		t.Fatalf("failure %+v %v", f, err)
	}
	for id := uint16(0); id < 5; id++ {
		if results[id] != 0 {
			t.Errorf("command %d: %v", id, results[id])
		}
	}
	if results[5].Code() != nvme.NVME_SC_AUTH_REQUIRED {
		t.Errorf("Property Get before authentication: %v", results[5])
	}
}
