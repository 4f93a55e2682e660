// Package pdu encodes and decodes NVMe/TCP protocol data units (NVMe TCP
// Transport Specification 1.0, section 3.6; include/linux/nvme-tcp.h).
//
// Every PDU starts with the 8-byte common header (struct nvme_tcp_hdr),
// followed by a PDU specific header, an optional header digest, optional
// padding up to the data offset (PDO), optional data and an optional data
// digest. Digests are CRC32C (Castagnoli), stored little-endian.
//
// Decoders never trust a length from the wire: the common header is checked
// against the PDU type, the direction, the negotiated digests and the
// caller's data limit before a single further byte is read, and a failure is
// a *ProtocolError carrying the Fatal Error Status to put in a TermReq.
package pdu

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// Type is the PDU type (enum nvme_tcp_pdu_type).
type Type uint8

const (
	TypeICReq       Type = 0x0 // nvme_tcp_icreq
	TypeICResp      Type = 0x1 // nvme_tcp_icresp
	TypeH2CTermReq  Type = 0x2 // nvme_tcp_h2c_term
	TypeC2HTermReq  Type = 0x3 // nvme_tcp_c2h_term
	TypeCapsuleCmd  Type = 0x4 // nvme_tcp_cmd
	TypeCapsuleResp Type = 0x5 // nvme_tcp_rsp
	TypeH2CData     Type = 0x6 // nvme_tcp_h2c_data
	TypeC2HData     Type = 0x7 // nvme_tcp_c2h_data
	TypeR2T         Type = 0x9 // nvme_tcp_r2t
)

func (t Type) String() string {
	switch t {
	case TypeICReq:
		return "ICReq"
	case TypeICResp:
		return "ICResp"
	case TypeH2CTermReq:
		return "H2CTermReq"
	case TypeC2HTermReq:
		return "C2HTermReq"
	case TypeCapsuleCmd:
		return "CapsuleCmd"
	case TypeCapsuleResp:
		return "CapsuleResp"
	case TypeH2CData:
		return "H2CData"
	case TypeC2HData:
		return "C2HData"
	case TypeR2T:
		return "R2T"
	}
	return fmt.Sprintf("Type(%#x)", uint8(t))
}

// Common header flags (enum nvme_tcp_pdu_flags).
const (
	NVME_TCP_F_HDGST        = 1 << 0
	NVME_TCP_F_DDGST        = 1 << 1
	NVME_TCP_F_DATA_LAST    = 1 << 2
	NVME_TCP_F_DATA_SUCCESS = 1 << 3
)

// ICReq/ICResp digest field (enum nvme_tcp_digest_option).
const (
	NVME_TCP_HDR_DIGEST_ENABLE  = 1 << 0
	NVME_TCP_DATA_DIGEST_ENABLE = 1 << 1
)

// Fatal Error Status of a TermReq (enum nvme_tcp_fatal_error_status).
const (
	NVME_TCP_FES_INVALID_PDU_HDR     = 0x01
	NVME_TCP_FES_PDU_SEQ_ERR         = 0x02
	NVME_TCP_FES_HDR_DIGEST_ERR      = 0x03
	NVME_TCP_FES_DATA_OUT_OF_RANGE   = 0x04
	NVME_TCP_FES_DATA_LIMIT_EXCEEDED = 0x05
	NVME_TCP_FES_UNSUPPORTED_PARAM   = 0x06
)

// Sizes from include/linux/nvme-tcp.h.
const (
	NVME_TCP_PFV_1_0          = 0x0
	NVME_TCP_DIGEST_LENGTH    = 4
	NVME_TCP_ADMIN_CCSZ       = 8192
	NVME_TCP_MIN_MAXH2CDATA   = 4096
	NVME_TCP_MIN_C2HTERM_PLEN = 24
	NVME_TCP_MAX_C2HTERM_PLEN = 152
	NVME_TCP_DISC_PORT        = 8009

	CommonHeaderSize = 8
	// MaxHeaderSize is the longest header: ICReq/ICResp.
	MaxHeaderSize = 128
	// maxTermData is how much of the offending PDU a TermReq may carry.
	maxTermData = NVME_TCP_MAX_C2HTERM_PLEN - 24
)

// HeaderLength is the fixed HLEN of each PDU type, 0 for unknown types.
func (t Type) HeaderLength() int {
	switch t {
	case TypeICReq, TypeICResp:
		return 128
	case TypeH2CTermReq, TypeC2HTermReq, TypeCapsuleResp, TypeH2CData, TypeC2HData, TypeR2T:
		return 24
	case TypeCapsuleCmd:
		return 72
	}
	return 0
}

// Direction says who sends a PDU.
type Direction uint8

const (
	HostToController Direction = iota
	ControllerToHost
)

func (d Direction) String() string {
	if d == HostToController {
		return "host-to-controller"
	}
	return "controller-to-host"
}

// Direction returns the direction the type travels in.
func (t Type) Direction() Direction {
	switch t {
	case TypeICResp, TypeC2HTermReq, TypeCapsuleResp, TypeC2HData, TypeR2T:
		return ControllerToHost
	}
	return HostToController
}

// hasDigests reports whether header and data digests apply to the type:
// never to the connection setup and termination PDUs.
func (t Type) hasDigests() bool {
	switch t {
	case TypeCapsuleCmd, TypeCapsuleResp, TypeH2CData, TypeC2HData, TypeR2T:
		return true
	}
	return false
}

// carriesData reports whether a PDU of the type may have a data part.
func (t Type) carriesData() bool {
	switch t {
	case TypeCapsuleCmd, TypeH2CData, TypeC2HData:
		return true
	}
	return false
}

// CommonHeader is struct nvme_tcp_hdr, the raw first 8 bytes of every PDU.
type CommonHeader struct {
	Type  Type
	Flags uint8
	HLen  uint8  // header length, without the header digest
	PDO   uint8  // PDU data offset from the start of the PDU
	PLen  uint32 // total PDU length including digests and padding
}

// ParseCommonHeader decodes the first 8 bytes of b.
func ParseCommonHeader(b []byte) CommonHeader {
	_ = b[7]
	return CommonHeader{Type: Type(b[0]), Flags: b[1], HLen: b[2], PDO: b[3], PLen: binary.LittleEndian.Uint32(b[4:])}
}

// ICReq is struct nvme_tcp_icreq_pdu without the common header (NVMe/TCP
// 1.0, Figure 26).
type ICReq struct {
	PFV    uint16 // protocol format version, NVME_TCP_PFV_1_0
	HPDA   uint8  // host PDU data alignment: (HPDA+1)*4 bytes
	Digest uint8  // NVME_TCP_HDR_DIGEST_ENABLE | NVME_TCP_DATA_DIGEST_ENABLE
	MaxR2T uint32 // maximum outstanding R2Ts per command, 0's based
}

// ICResp is struct nvme_tcp_icresp_pdu without the common header (Figure
// 27).
type ICResp struct {
	PFV        uint16
	CPDA       uint8 // controller PDU data alignment for H2C data
	Digest     uint8
	MaxH2CData uint32 // the largest H2CData the controller accepts (maxdata)
}

// TermReq is struct nvme_tcp_term_pdu without the common header (H2CTermReq
// and C2HTermReq, Figures 22 and 23); the offending PDU header follows as
// data.
type TermReq struct {
	FES uint16 // fatal error status, NVME_TCP_FES_*
	FEI uint32 // fatal error information (feil | feiu << 16): field offset or limit
}

// DataHeader is struct nvme_tcp_data_pdu without the common header
// (H2CData and C2HData, Figures 30 and 29).
type DataHeader struct {
	CommandID  uint16
	TTag       uint16 // transfer tag from the R2T (H2CData only)
	DataOffset uint32
	DataLength uint32
}

// R2T is struct nvme_tcp_r2t_pdu without the common header (Figure 31).
type R2T struct {
	CommandID uint16
	TTag      uint16
	Offset    uint32
	Length    uint32
}

// Header is a decoded PDU header: the common header and the PDU specific
// header of its type (only the field matching Type is meaningful). Encoders
// compute HLen, PDO, PLen and the digest flags; Flags carries only
// NVME_TCP_F_DATA_LAST and NVME_TCP_F_DATA_SUCCESS when encoding.
type Header struct {
	CommonHeader
	ICReq  ICReq
	ICResp ICResp
	Term   TermReq
	Cmd    nvme.Command    // CapsuleCmd
	Resp   nvme.Completion // CapsuleResp
	Data   DataHeader      // H2CData, C2HData
	R2T    R2T

	// DataLen is the number of data bytes that follow the header, as
	// checked by the decoder.
	DataLen int
}

// Options are what the ICReq/ICResp exchange negotiated for a connection.
type Options struct {
	HeaderDigest bool
	DataDigest   bool
	// PDA is the receiver's PDU data alignment: data in PDUs sent to it
	// starts at a multiple of (PDA+1)*4 bytes (0: right after the header).
	PDA uint8
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Digest is the NVMe/TCP header or data digest of b: CRC32C.
func Digest(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

// ProtocolError is a violation of the NVMe/TCP protocol by the peer. FES and
// FEI are what to report in a TermReq before closing the connection.
type ProtocolError struct {
	FES uint16
	FEI uint32 // byte offset of the offending field, or the limit exceeded
	Msg string
}

func (e *ProtocolError) Error() string {
	return fmt.Sprintf("nvme-tcp protocol error (fes %#x, fei %d): %s", e.FES, e.FEI, e.Msg)
}

func errHeader(field uint32, format string, args ...any) error {
	return &ProtocolError{FES: NVME_TCP_FES_INVALID_PDU_HDR, FEI: field, Msg: fmt.Sprintf(format, args...)}
}

// Field offsets in the common header, for FEI.
const (
	feiType  = 0
	feiFlags = 1
	feiHLen  = 2
	feiPDO   = 3
	feiPLen  = 4
)

// Check validates a common header received in direction dir on a
// connection with options o, where at most maxData data bytes are
// acceptable in one PDU. It returns the number of data bytes that follow.
func (ch CommonHeader) Check(dir Direction, o Options, maxData uint32) (dataLen int, err error) {
	t := ch.Type
	hlen := t.HeaderLength()
	if hlen == 0 {
		return 0, errHeader(feiType, "unknown PDU type %#x", uint8(t))
	}
	if t.Direction() != dir {
		return 0, errHeader(feiType, "%v PDU received %v", t, dir)
	}
	if int(ch.HLen) != hlen {
		return 0, errHeader(feiHLen, "%v with hlen %d, want %d", t, ch.HLen, hlen)
	}
	plen := int64(ch.PLen)
	if !t.hasDigests() {
		if ch.Flags != 0 {
			return 0, errHeader(feiFlags, "%v with flags %#x", t, ch.Flags)
		}
		switch t {
		case TypeICReq, TypeICResp:
			if plen != int64(hlen) {
				return 0, errHeader(feiPLen, "%v with plen %d, want %d", t, plen, hlen)
			}
			return 0, nil
		default: // TermReq: header plus up to 128 bytes of the offending PDU
			if plen < NVME_TCP_MIN_C2HTERM_PLEN || plen > NVME_TCP_MAX_C2HTERM_PLEN {
				return 0, errHeader(feiPLen, "%v with plen %d", t, plen)
			}
			return int(plen) - hlen, nil
		}
	}

	allowed := uint8(NVME_TCP_F_HDGST | NVME_TCP_F_DDGST)
	switch t {
	case TypeH2CData:
		allowed |= NVME_TCP_F_DATA_LAST
	case TypeC2HData:
		allowed |= NVME_TCP_F_DATA_LAST | NVME_TCP_F_DATA_SUCCESS
	}
	if ch.Flags&^allowed != 0 {
		return 0, errHeader(feiFlags, "%v with flags %#x", t, ch.Flags)
	}
	if ch.Flags&NVME_TCP_F_DATA_SUCCESS != 0 && ch.Flags&NVME_TCP_F_DATA_LAST == 0 {
		return 0, errHeader(feiFlags, "%v with SUCCESS but not LAST", t)
	}
	if (ch.Flags&NVME_TCP_F_HDGST != 0) != o.HeaderDigest {
		return 0, &ProtocolError{FES: NVME_TCP_FES_HDR_DIGEST_ERR, FEI: feiFlags, Msg: fmt.Sprintf("%v header digest flag does not match the negotiated %v", t, o.HeaderDigest)}
	}
	hdgst := 0
	if o.HeaderDigest {
		hdgst = NVME_TCP_DIGEST_LENGTH
	}
	ddgstFlag := ch.Flags&NVME_TCP_F_DDGST != 0
	if plen == int64(hlen+hdgst) {
		// No data. The data digest flag must then be clear (and PDO
		// is reserved).
		if t == TypeH2CData || t == TypeC2HData {
			return 0, errHeader(feiPLen, "%v without data", t)
		}
		if ddgstFlag {
			return 0, errHeader(feiFlags, "%v without data has the data digest flag", t)
		}
		return 0, nil
	}
	if !t.carriesData() {
		return 0, errHeader(feiPLen, "%v with plen %d, want %d", t, plen, hlen+hdgst)
	}
	if ddgstFlag != o.DataDigest {
		return 0, errHeader(feiFlags, "%v data digest flag does not match the negotiated %v", t, o.DataDigest)
	}
	ddgst := 0
	if o.DataDigest {
		ddgst = NVME_TCP_DIGEST_LENGTH
	}
	pdo := int64(ch.PDO)
	if pdo < int64(hlen+hdgst) {
		return 0, errHeader(feiPDO, "%v with pdo %d inside the header (%d)", t, pdo, hlen+hdgst)
	}
	n := plen - pdo - int64(ddgst)
	if n <= 0 {
		return 0, errHeader(feiPLen, "%v with plen %d, pdo %d: no room for data", t, plen, pdo)
	}
	if n > int64(maxData) {
		return 0, &ProtocolError{FES: NVME_TCP_FES_DATA_LIMIT_EXCEEDED, FEI: maxData, Msg: fmt.Sprintf("%v with %d data bytes, limit %d", t, n, maxData)}
	}
	return int(n), nil
}

// parsePSH decodes the PDU specific header b (hlen-8 bytes) of type t.
func (h *Header) parsePSH(b []byte) error {
	le := binary.LittleEndian
	switch h.Type {
	case TypeICReq:
		h.ICReq = ICReq{PFV: le.Uint16(b[0:]), HPDA: b[2], Digest: b[3], MaxR2T: le.Uint32(b[4:])}
	case TypeICResp:
		h.ICResp = ICResp{PFV: le.Uint16(b[0:]), CPDA: b[2], Digest: b[3], MaxH2CData: le.Uint32(b[4:])}
	case TypeH2CTermReq, TypeC2HTermReq:
		h.Term = TermReq{FES: le.Uint16(b[0:]), FEI: uint32(le.Uint16(b[2:])) | uint32(le.Uint16(b[4:]))<<16}
	case TypeCapsuleCmd:
		copy(h.Cmd[:], b)
	case TypeCapsuleResp:
		copy(h.Resp[:], b)
	case TypeH2CData, TypeC2HData:
		h.Data = DataHeader{CommandID: le.Uint16(b[0:]), TTag: le.Uint16(b[2:]), DataOffset: le.Uint32(b[4:]), DataLength: le.Uint32(b[8:])}
		if int64(h.Data.DataLength) != int64(h.DataLen) {
			return errHeader(16, "%v data length %d, but the PDU carries %d", h.Type, h.Data.DataLength, h.DataLen)
		}
	case TypeR2T:
		h.R2T = R2T{CommandID: le.Uint16(b[0:]), TTag: le.Uint16(b[2:]), Offset: le.Uint32(b[4:]), Length: le.Uint32(b[8:])}
	}
	return nil
}

func (h *Header) appendPSH(b []byte) []byte {
	le := binary.LittleEndian
	var psh [MaxHeaderSize - CommonHeaderSize]byte
	p := psh[:h.Type.HeaderLength()-CommonHeaderSize]
	switch h.Type {
	case TypeICReq:
		le.PutUint16(p[0:], h.ICReq.PFV)
		p[2], p[3] = h.ICReq.HPDA, h.ICReq.Digest
		le.PutUint32(p[4:], h.ICReq.MaxR2T)
	case TypeICResp:
		le.PutUint16(p[0:], h.ICResp.PFV)
		p[2], p[3] = h.ICResp.CPDA, h.ICResp.Digest
		le.PutUint32(p[4:], h.ICResp.MaxH2CData)
	case TypeH2CTermReq, TypeC2HTermReq:
		le.PutUint16(p[0:], h.Term.FES)
		le.PutUint16(p[2:], uint16(h.Term.FEI))
		le.PutUint16(p[4:], uint16(h.Term.FEI>>16))
	case TypeCapsuleCmd:
		copy(p, h.Cmd[:])
	case TypeCapsuleResp:
		copy(p, h.Resp[:])
	case TypeH2CData, TypeC2HData:
		le.PutUint16(p[0:], h.Data.CommandID)
		le.PutUint16(p[2:], h.Data.TTag)
		le.PutUint32(p[4:], h.Data.DataOffset)
		le.PutUint32(p[8:], h.Data.DataLength)
	case TypeR2T:
		le.PutUint16(p[0:], h.R2T.CommandID)
		le.PutUint16(p[2:], h.R2T.TTag)
		le.PutUint32(p[4:], h.R2T.Offset)
		le.PutUint32(p[8:], h.R2T.Length)
	}
	return append(b, p...)
}

// AppendHeader appends everything of the PDU h that comes before its data:
// common header, PDU specific header, header digest and padding up to the
// data offset, for a PDU carrying dataLen data bytes on a connection with
// options o. The caller appends or writes the data and then, if
// o.DataDigest and dataLen > 0, the data digest (AppendDataDigest). For
// H2CData and C2HData, h.Data.DataLength is set to dataLen.
func AppendHeader(b []byte, h *Header, dataLen int, o Options) []byte {
	t := h.Type
	hlen := t.HeaderLength()
	if hlen == 0 {
		panic(fmt.Sprintf("pdu: AppendHeader of unknown type %#x", uint8(t)))
	}
	flags := h.Flags & (NVME_TCP_F_DATA_LAST | NVME_TCP_F_DATA_SUCCESS)
	hdgst, ddgst, pdo := 0, 0, 0
	if t.hasDigests() {
		if o.HeaderDigest {
			flags |= NVME_TCP_F_HDGST
			hdgst = NVME_TCP_DIGEST_LENGTH
		}
		if o.DataDigest && dataLen > 0 {
			flags |= NVME_TCP_F_DDGST
			ddgst = NVME_TCP_DIGEST_LENGTH
		}
		if dataLen > 0 {
			pdo = hlen + hdgst
			if o.PDA > 0 {
				align := (int(o.PDA) + 1) * 4
				pdo = (pdo + align - 1) / align * align
			}
		}
	} else {
		flags = 0
	}
	if t == TypeH2CData || t == TypeC2HData {
		h.Data.DataLength = uint32(dataLen)
	}
	plen := hlen + hdgst + dataLen + ddgst
	if pdo > 0 {
		plen = pdo + dataLen + ddgst
	}
	start := len(b)
	b = append(b, byte(t), flags, byte(hlen), byte(pdo), 0, 0, 0, 0)
	binary.LittleEndian.PutUint32(b[start+4:], uint32(plen))
	b = h.appendPSH(b)
	if hdgst > 0 {
		b = binary.LittleEndian.AppendUint32(b, Digest(b[start:]))
	}
	for len(b)-start < pdo {
		b = append(b, 0)
	}
	h.CommonHeader = CommonHeader{Type: t, Flags: flags, HLen: uint8(hlen), PDO: uint8(pdo), PLen: uint32(plen)}
	h.DataLen = dataLen
	return b
}

// AppendDataDigest appends the data digest of data.
func AppendDataDigest(b []byte, data []byte) []byte {
	return binary.LittleEndian.AppendUint32(b, Digest(data))
}

// Append appends a whole PDU: header, data and, when negotiated, the data
// digest.
func Append(b []byte, h *Header, data []byte, o Options) []byte {
	b = AppendHeader(b, h, len(data), o)
	b = append(b, data...)
	if o.DataDigest && len(data) > 0 && h.Type.hasDigests() {
		b = AppendDataDigest(b, data)
	}
	return b
}
