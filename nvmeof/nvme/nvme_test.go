package nvme

import (
	"bytes"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
)

func TestStatusError(t *testing.T) {
	var c Completion
	c.SetStatus(NVME_SC_INVALID_NS | NVME_STATUS_DNR | NVME_STATUS_MORE)
	if got := hex.EncodeToString(c[14:]); got != "16c0" {
		t.Fatalf("status bytes %s, want 16c0", got)
	}
	s := c.Status()
	if !s.DNR() || !s.More() || s.SCT() != 0 || s.SC() != 0x0b {
		t.Fatalf("decoded %#x: dnr %v more %v sct %d sc %#x", uint16(s), s.DNR(), s.More(), s.SCT(), s.SC())
	}
	err := s.Err()
	if !errors.Is(err, NVME_SC_INVALID_NS) {
		t.Fatalf("errors.Is(%v, NVME_SC_INVALID_NS) = false", err)
	}
	if !strings.Contains(err.Error(), "Invalid Namespace") || !strings.Contains(err.Error(), "dnr") {
		t.Fatalf("error text %q", err)
	}
	if NVME_SC_SUCCESS.Err() != nil {
		t.Fatal("success is an error")
	}
	if NVME_SC_CONNECT_INVALID_HOST.SCT() != 1 || NVME_SC_CONNECT_INVALID_HOST.SC() != 0x84 {
		t.Fatal("command specific status encoding")
	}
}

func TestCommandGolden(t *testing.T) {
	var c Command
	c.SetConnect(Connect{QID: 2, SQSize: 127, KATO: 5000})
	c.SetCommandID(3)
	c.SetSGL(0, ConnectDataSize, SGLInCapsule)
	want := "7f400300 01" + strings.Repeat("00", 19) +
		"0000000000000000 00040000 00000001" + "0000 0200 7f00 00 00 88130000" + strings.Repeat("00", 12)
	if got, w := hex.EncodeToString(c[:]), strings.Join(strings.Fields(want), ""); got != w {
		t.Fatalf("connect SQE\n%s\nwant\n%s", got, w)
	}
	if f := c.Connect(); f.QID != 2 || f.SQSize != 127 || f.KATO != 5000 {
		t.Fatalf("Connect() = %+v", f)
	}
}

func TestIdentifyRoundTrip(t *testing.T) {
	ic := &IdentifyController{VID: 1, SN: "sn1", MN: "model", FR: "1.0", MDTS: 5, CNTLID: 7, VER: 0x20000,
		KAS: 10, SQES: 0x66, CQES: 0x44, MAXCMD: 128, NN: 4, ONCS: NVME_CTRL_ONCS_DSM | NVME_CTRL_ONCS_WRITE_ZEROES,
		VWC: 1, SGLS: 5, SubNQN: "nqn.2024-01.io.example:sub", IOCCSZ: 260, IORCSZ: 1, CRDT: [3]uint16{1, 20, 300},
		RTD3E: 8_000_000}
	got, err := ParseIdentifyController(ic.Marshal())
	if err != nil || *got != *ic {
		t.Fatalf("round trip %+v, %v", got, err)
	}
	// CRDT1..3 at bytes 134..139 (NVMe Base 2.0, Figure 275).
	if b := ic.Marshal(); b[134] != 1 || b[136] != 20 || b[138] != 300&0xff || b[139] != 300>>8 {
		t.Fatalf("CRDT bytes % x", b[134:140])
	}
	// RTD3E at bytes 88..91.
	if b := ic.Marshal(); b[88] != 0x00 || b[89] != 0x12 || b[90] != 0x7a || b[91] != 0x00 {
		t.Fatalf("RTD3E bytes % x", b[88:92])
	}
	nvm := &IdentifyControllerNVM{VSL: 1, WZSL: 2, WUSL: 3, DMRL: 4, DMRSL: 0x05060708, DMSL: 0x1122334455667788}
	gnvm, err := ParseIdentifyControllerNVM(nvm.Marshal())
	if err != nil || *gnvm != *nvm {
		t.Fatalf("round trip %+v, %v", gnvm, err)
	}
	// struct nvme_id_ctrl_nvm: vsl, wzsl, wusl, dmrl, dmrsl (le32), dmsl (le64).
	if b := nvm.Marshal(); b[1] != 2 || b[3] != 4 || b[4] != 8 || b[8] != 0x88 {
		t.Fatalf("NVM identify bytes % x", b[:16])
	}
	if _, err := ParseIdentifyControllerNVM(make([]byte, 100)); err == nil {
		t.Fatal("short NVM identify accepted")
	}
	ns := &IdentifyNamespace{NSZE: 100, NCAP: 100, NLBAF: 1, FLBAS: 1}
	ns.LBAF[0] = LBAFormat{DS: 9}
	ns.LBAF[1] = LBAFormat{DS: 12}
	ns.NGUID[0] = 0xab
	gns, err := ParseIdentifyNamespace(ns.Marshal())
	if err != nil || *gns != *ns {
		t.Fatalf("round trip %+v, %v", gns, err)
	}
	if s, err := gns.BlockShift(); err != nil || s != 12 {
		t.Fatalf("BlockShift = %d, %v", s, err)
	}
	ids := NamespaceIDs{NGUID: [16]byte{1}, UUID: [16]byte{2}, EUI64: [8]byte{3}}
	gids, err := ParseNamespaceIDs(ids.Marshal())
	if err != nil || gids != ids {
		t.Fatalf("round trip %+v, %v", gids, err)
	}
	e := DiscoveryLogEntry{TrType: NVMF_TRTYPE_TCP, AdrFam: NVMF_ADDR_FAMILY_IP4, SubType: NVME_NQN_NVME, PortID: 1,
		CNTLID: NVME_CNTLID_DYNAMIC, ASQSZ: 32, TrSvcID: "4420", SubNQN: "nqn.x:y", TrAddr: "127.0.0.1"}
	ge, err := ParseDiscoveryLogEntry(AppendDiscoveryLogEntry(nil, e))
	if err != nil || ge != e {
		t.Fatalf("round trip %+v, %v", ge, err)
	}
	cd := &ConnectData{HostID: [16]byte{9}, CNTLID: 0xffff, SubsysNQN: "nqn.a:b", HostNQN: "nqn.c:d"}
	gcd, err := ParseConnectData(cd.Marshal())
	if err != nil || *gcd != *cd {
		t.Fatalf("round trip %+v, %v", gcd, err)
	}
}

func FuzzParseIdentifyController(f *testing.F) {
	f.Add((&IdentifyController{MN: "m", IOCCSZ: 4}).Marshal())
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseIdentifyController(b)
		if err != nil {
			return
		}
		c2, err := ParseIdentifyController(c.Marshal())
		if err != nil || c2.MDTS != c.MDTS || c2.IOCCSZ != c.IOCCSZ || c2.NN != c.NN {
			t.Fatalf("re-parse differs: %v", err)
		}
	})
}

func FuzzParseIdentifyControllerNVM(f *testing.F) {
	f.Add((&IdentifyControllerNVM{WZSL: 1, DMRL: 1, DMRSL: 16}).Marshal())
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseIdentifyControllerNVM(b)
		if err != nil {
			return
		}
		if c2, err := ParseIdentifyControllerNVM(c.Marshal()); err != nil || *c2 != *c {
			t.Fatalf("re-parse differs: %v", err)
		}
	})
}

func FuzzParseIdentifyNamespace(f *testing.F) {
	ns := &IdentifyNamespace{NSZE: 8, NLBAF: 0}
	ns.LBAF[0].DS = 9
	f.Add(ns.Marshal())
	f.Fuzz(func(t *testing.T, b []byte) {
		ns, err := ParseIdentifyNamespace(b)
		if err != nil {
			return
		}
		if s, err := ns.BlockShift(); err == nil && (s < 9 || s > 16) {
			t.Fatalf("BlockShift accepted %d", s)
		}
	})
}

func FuzzParseNamespaceIDs(f *testing.F) {
	f.Add(NamespaceIDs{NGUID: [16]byte{1}, EUI64: [8]byte{2}}.Marshal())
	f.Add([]byte{2, 255, 0, 0, 1})
	f.Fuzz(func(t *testing.T, b []byte) { ParseNamespaceIDs(b) })
}

func FuzzParseNamespaceList(f *testing.F) {
	f.Add([]byte{1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		ids, err := ParseNamespaceList(b)
		if err != nil {
			return
		}
		for i := 1; i < len(ids); i++ {
			if ids[i] <= ids[i-1] {
				t.Fatal("unordered list accepted")
			}
		}
	})
}

func FuzzParseDiscoveryLog(f *testing.F) {
	b := AppendDiscoveryLogHeader(nil, DiscoveryLogHeader{GenCtr: 1, NumRec: 1})
	b = AppendDiscoveryLogEntry(b, DiscoveryLogEntry{TrType: NVMF_TRTYPE_TCP, SubNQN: "nqn.x:y", TrAddr: "::1", TrSvcID: "4420"})
	f.Add(b)
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := ParseDiscoveryLogHeader(b)
		if err != nil {
			return
		}
		_ = h
		for off := DiscoveryLogHeaderSize; off < len(b); off += DiscoveryLogEntrySize {
			e, err := ParseDiscoveryLogEntry(b[off:])
			if err != nil {
				return
			}
			e2, err := ParseDiscoveryLogEntry(AppendDiscoveryLogEntry(nil, e))
			if err != nil || e2.TrType != e.TrType || e2.PortID != e.PortID {
				t.Fatalf("round trip: %v", err)
			}
		}
	})
}

func FuzzParseConnectData(f *testing.F) {
	f.Add((&ConnectData{SubsysNQN: "nqn.a:b", HostNQN: "nqn.c:d", CNTLID: 0xffff}).Marshal())
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := ParseConnectData(b)
		if err != nil {
			return
		}
		d2, err := ParseConnectData(d.Marshal())
		if err != nil || *d2 != *d {
			t.Fatalf("round trip: %+v %+v %v", d, d2, err)
		}
	})
}

func FuzzParseDSMRanges(f *testing.F) {
	f.Add(AppendDSMRange(nil, DSMRange{NLB: 8, SLBA: 16}), 1)
	f.Fuzz(func(t *testing.T, b []byte, n int) {
		rs, err := ParseDSMRanges(b, n)
		if err != nil {
			return
		}
		var enc []byte
		for _, r := range rs {
			enc = AppendDSMRange(enc, r)
		}
		if !bytes.Equal(enc, b[:len(enc)]) {
			t.Fatal("round trip differs")
		}
	})
}

func FuzzCompletion(f *testing.F) {
	f.Add(make([]byte, CompletionSize))
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) < CompletionSize {
			return
		}
		var c Completion
		copy(c[:], b)
		s := c.Status()
		_ = s.Error()
		if s.Code()&^(NVME_SCT_MASK|NVME_SC_MASK) != 0 {
			t.Fatal("Code keeps flag bits")
		}
	})
}
