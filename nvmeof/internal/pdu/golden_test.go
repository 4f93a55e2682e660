package pdu

import (
	"bytes"
	"encoding/hex"
	"errors"
	"strings"
	"testing"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	s = strings.Join(strings.Fields(s), "")
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func zeros(n int) string { return strings.Repeat("00", n) }

// testSQE is a Read of 8 blocks at LBA 0x10 on namespace 1, command ID 0x2a,
// data by the transport (SGL 0x5a, 4096 bytes).
func testSQE() nvme.Command {
	var c nvme.Command
	c.SetOpcode(nvme.NVME_CMD_READ)
	c.SetCommandID(0x2a)
	c.SetNSID(1)
	c.SetSGL(0, 4096, nvme.SGLTransport)
	c.SetCDW(10, 0x10)
	c.SetCDW(12, 7)
	return c
}

const testSQEHex = "02 40 2a00 01000000" + "00000000 00000000" + "0000000000000000" +
	"0000000000000000 00100000 0000005a" + "10000000 00000000 07000000 00000000 00000000 00000000"

type goldenCase struct {
	name string
	h    Header
	data []byte
	o    Options
	want string
}

func goldenCases() []goldenCase {
	var cqe nvme.Completion
	cqe.SetCommandID(0x2a)
	cqe.SetSQHead(5)
	cqe.SetSQID(1)
	cqe.SetResult(0x1122)
	cqe.SetStatus(nvme.NVME_SC_INVALID_NS | nvme.NVME_STATUS_DNR)
	dig := Options{HeaderDigest: true, DataDigest: true}
	return []goldenCase{
		{name: "ICReq", h: Header{CommonHeader: CommonHeader{Type: TypeICReq}, ICReq: ICReq{Digest: 3, MaxR2T: 0}},
			want: "00 00 80 00 80000000 0000 00 03 00000000" + zeros(112)},
		{name: "ICResp", h: Header{CommonHeader: CommonHeader{Type: TypeICResp}, ICResp: ICResp{CPDA: 0, Digest: 1, MaxH2CData: 0x20000}},
			want: "01 00 80 00 80000000 0000 00 01 00000200" + zeros(112)},
		{name: "H2CTermReq", h: Header{CommonHeader: CommonHeader{Type: TypeH2CTermReq}, Term: TermReq{FES: NVME_TCP_FES_INVALID_PDU_HDR, FEI: 2}},
			data: []byte{9, 0, 24, 0},
			want: "02 00 18 00 1c000000 0100 0200 0000" + zeros(10) + "09001800"},
		{name: "C2HTermReq", h: Header{CommonHeader: CommonHeader{Type: TypeC2HTermReq}, Term: TermReq{FES: NVME_TCP_FES_DATA_LIMIT_EXCEEDED, FEI: 0x10000}},
			want: "03 00 18 00 18000000 0500 0000 0100" + zeros(10)},
		{name: "CapsuleCmd", h: Header{CommonHeader: CommonHeader{Type: TypeCapsuleCmd}, Cmd: testSQE()},
			want: "04 00 48 00 48000000" + testSQEHex},
		{name: "CapsuleCmdInCapsuleData", h: Header{CommonHeader: CommonHeader{Type: TypeCapsuleCmd}, Cmd: testSQE()}, data: []byte{0xde, 0xad, 0xbe, 0xef},
			want: "04 00 48 48 4c000000" + testSQEHex + "deadbeef"},
		{name: "CapsuleResp", h: Header{CommonHeader: CommonHeader{Type: TypeCapsuleResp}, Resp: cqe},
			want: "05 00 18 00 18000000 2211000000000000 0500 0100 2a00 1680"},
		{name: "H2CData", h: Header{CommonHeader: CommonHeader{Type: TypeH2CData, Flags: NVME_TCP_F_DATA_LAST}, Data: DataHeader{CommandID: 0x2a, TTag: 3, DataOffset: 0x1000}},
			data: []byte{1, 2, 3, 4, 5, 6, 7, 8},
			want: "06 04 18 18 20000000 2a00 0300 00100000 08000000 00000000 0102030405060708"},
		{name: "C2HDataSuccess", h: Header{CommonHeader: CommonHeader{Type: TypeC2HData, Flags: NVME_TCP_F_DATA_LAST | NVME_TCP_F_DATA_SUCCESS}, Data: DataHeader{CommandID: 7}},
			data: []byte{0xaa, 0xbb, 0xcc, 0xdd},
			want: "07 0c 18 18 1c000000 0700 0000 00000000 04000000 00000000 aabbccdd"},
		{name: "R2T", h: Header{CommonHeader: CommonHeader{Type: TypeR2T}, R2T: R2T{CommandID: 0x2a, TTag: 3, Offset: 0x2000, Length: 0x8000}},
			want: "09 00 18 00 18000000 2a00 0300 00200000 00800000 00000000"},
		// PDA 3: data aligned to 16 bytes, so 8 bytes of padding after the
		// 24-byte header.
		{name: "H2CDataPadded", h: Header{CommonHeader: CommonHeader{Type: TypeH2CData}, Data: DataHeader{CommandID: 1}},
			data: []byte{1, 2, 3, 4}, o: Options{PDA: 3},
			want: "06 00 18 20 24000000 0100 0000 00000000 04000000 00000000 0000000000000000 01020304"},
		// With digests: CRC32C of the header follows the header, CRC32C of
		// the data follows the data. Digest values were produced by this
		// encoder and cross-checked with TestDigestCheckValue.
		{name: "CapsuleRespHeaderDigest", h: Header{CommonHeader: CommonHeader{Type: TypeCapsuleResp}, Resp: cqe}, o: dig,
			want: "05 01 18 00 1c000000 2211000000000000 0500 0100 2a00 1680 HDGST"},
		{name: "C2HDataDigests", h: Header{CommonHeader: CommonHeader{Type: TypeC2HData, Flags: NVME_TCP_F_DATA_LAST}, Data: DataHeader{CommandID: 7}},
			data: []byte("123456789"), o: dig,
			want: "07 07 18 1c 29000000 0700 0000 00000000 09000000 00000000 HDGST 313233343536373839 839206e3"},
	}
}

func TestDigestCheckValue(t *testing.T) {
	// The CRC-32C check value from RFC 3720 / the CRC catalogue.
	if got := Digest([]byte("123456789")); got != 0xe3069283 {
		t.Fatalf("Digest(123456789) = %#x, want 0xe3069283", got)
	}
}

func TestGolden(t *testing.T) {
	for _, tc := range goldenCases() {
		t.Run(tc.name, func(t *testing.T) {
			h := tc.h
			got := Append(nil, &h, tc.data, tc.o)
			wantHex := tc.want
			if strings.Contains(wantHex, "HDGST") {
				// The header digest covers exactly the bytes before it.
				hlen := h.Type.HeaderLength()
				d := AppendDataDigest(nil, got[:hlen])
				wantHex = strings.Replace(wantHex, "HDGST", hex.EncodeToString(d), 1)
			}
			want := unhex(t, wantHex)
			if !bytes.Equal(got, want) {
				t.Fatalf("encoded\n%x\nwant\n%x", got, want)
			}

			// Decode it back.
			dir := tc.h.Type.Direction()
			r := NewReader(bytes.NewReader(want), dir, 1<<20)
			r.Options = tc.o
			var d Header
			if err := r.ReadHeader(&d); err != nil {
				t.Fatal(err)
			}
			data := make([]byte, d.DataLen)
			if err := r.ReadData(data); d.DataLen > 0 && err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(data, tc.data) && !(len(data) == 0 && len(tc.data) == 0) {
				t.Fatalf("data %x, want %x", data, tc.data)
			}
			if d != h {
				t.Fatalf("decoded %+v\nwant %+v", d, h)
			}
		})
	}
}

func TestCheckRejects(t *testing.T) {
	dig := Options{HeaderDigest: true}
	for _, tc := range []struct {
		name string
		dir  Direction
		o    Options
		hex  string
		fes  uint16
	}{
		{"unknown type", ControllerToHost, Options{}, "08 00 18 00 18000000", NVME_TCP_FES_INVALID_PDU_HDR},
		{"wrong direction", ControllerToHost, Options{}, "04 00 48 00 48000000", NVME_TCP_FES_INVALID_PDU_HDR},
		{"bad hlen", ControllerToHost, Options{}, "05 00 20 00 20000000", NVME_TCP_FES_INVALID_PDU_HDR},
		{"resp with data", ControllerToHost, Options{}, "05 00 18 18 20000000", NVME_TCP_FES_INVALID_PDU_HDR},
		{"missing hdgst flag", ControllerToHost, dig, "05 00 18 00 1c000000", NVME_TCP_FES_HDR_DIGEST_ERR},
		{"pdo inside header", ControllerToHost, Options{}, "07 00 18 10 20000000", NVME_TCP_FES_INVALID_PDU_HDR},
		{"data too long", ControllerToHost, Options{}, "07 00 18 18 ffffffff", NVME_TCP_FES_DATA_LIMIT_EXCEEDED},
		{"c2h data without data", ControllerToHost, Options{}, "07 04 18 00 18000000", NVME_TCP_FES_INVALID_PDU_HDR},
		{"success without last", ControllerToHost, Options{}, "07 08 18 18 1c000000", NVME_TCP_FES_INVALID_PDU_HDR},
		{"term plen too long", ControllerToHost, Options{}, "03 00 18 00 99000000", NVME_TCP_FES_INVALID_PDU_HDR},
		{"icresp flags", ControllerToHost, Options{}, "01 01 80 00 80000000", NVME_TCP_FES_INVALID_PDU_HDR},
		{"h2c last on cmd", HostToController, Options{}, "04 04 48 00 48000000", NVME_TCP_FES_INVALID_PDU_HDR},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ch := ParseCommonHeader(unhex(t, tc.hex))
			_, err := ch.Check(tc.dir, tc.o, 1<<16)
			var pe *ProtocolError
			if !errors.As(err, &pe) {
				t.Fatalf("Check = %v, want a ProtocolError", err)
			}
			if pe.FES != tc.fes {
				t.Fatalf("FES %#x, want %#x (%v)", pe.FES, tc.fes, err)
			}
		})
	}
}

func TestReaderDigestMismatch(t *testing.T) {
	o := Options{HeaderDigest: true, DataDigest: true}
	h := Header{CommonHeader: CommonHeader{Type: TypeC2HData}, Data: DataHeader{CommandID: 1}}
	b := Append(nil, &h, []byte("data"), o)

	hdr := bytes.Clone(b)
	hdr[9] ^= 1 // inside the PSH: header digest fails
	r := NewReader(bytes.NewReader(hdr), ControllerToHost, 64)
	r.Options = o
	var d Header
	var pe *ProtocolError
	if err := r.ReadHeader(&d); !errors.As(err, &pe) || pe.FES != NVME_TCP_FES_HDR_DIGEST_ERR {
		t.Fatalf("ReadHeader = %v, want a header digest error", err)
	}

	data := bytes.Clone(b)
	data[len(data)-5] ^= 1 // last data byte
	r = NewReader(bytes.NewReader(data), ControllerToHost, 64)
	r.Options = o
	if err := r.ReadHeader(&d); err != nil {
		t.Fatal(err)
	}
	if err := r.ReadData(make([]byte, d.DataLen)); !errors.Is(err, ErrDataDigest) {
		t.Fatalf("ReadData = %v, want ErrDataDigest", err)
	}
}
