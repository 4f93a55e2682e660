package nvme

import (
	"encoding/binary"
	"fmt"
)

// ConnectDataSize is sizeof(struct nvmf_connect_data).
const ConnectDataSize = 1024

// NVME_CNTLID_DYNAMIC asks the subsystem to allocate a controller ID.
const NVME_CNTLID_DYNAMIC = 0xffff

// ConnectData is struct nvmf_connect_data (NVMe over Fabrics 1.1, Figure
// 20): host ID at 0, controller ID at 16, subsystem NQN at 256, host NQN at
// 512.
type ConnectData struct {
	HostID    [16]byte
	CNTLID    uint16
	SubsysNQN string
	HostNQN   string
}

// Marshal encodes d into a new 1024-byte buffer.
func (d *ConnectData) Marshal() []byte {
	b := make([]byte, ConnectDataSize)
	copy(b[0:16], d.HostID[:])
	binary.LittleEndian.PutUint16(b[16:], d.CNTLID)
	putField(b[256:512], d.SubsysNQN, 0)
	putField(b[512:768], d.HostNQN, 0)
	return b
}

// ParseConnectData decodes a 1024-byte Connect data block. NQNs must be
// NUL-terminated within their 256-byte fields.
func ParseConnectData(b []byte) (*ConnectData, error) {
	if len(b) < ConnectDataSize {
		return nil, fmt.Errorf("connect data: %w (%d bytes)", ErrShortBuffer, len(b))
	}
	d := &ConnectData{CNTLID: binary.LittleEndian.Uint16(b[16:])}
	copy(d.HostID[:], b[0:16])
	var err error
	if d.SubsysNQN, err = cString(b[256:512]); err != nil {
		return nil, fmt.Errorf("connect data: subsystem NQN: %w", err)
	}
	if d.HostNQN, err = cString(b[512:768]); err != nil {
		return nil, fmt.Errorf("connect data: host NQN: %w", err)
	}
	return d, nil
}

func cString(b []byte) (string, error) {
	for i, c := range b {
		if c == 0 {
			return string(b[:i]), nil
		}
	}
	return "", fmt.Errorf("not NUL-terminated in %d bytes", len(b))
}

// Connect command fields (struct nvmf_connect_command).
type Connect struct {
	RecFmt uint16 // 0
	QID    uint16
	SQSize uint16 // 0's based
	CAttr  uint8
	KATO   uint32 // milliseconds, admin queue only
}

// SetConnect fills c as a Fabrics Connect command; the caller adds the SGL.
func (c *Command) SetConnect(f Connect) {
	*c = Command{}
	c[0] = NVME_FABRICS_COMMAND
	c[4] = NVME_FABRICS_TYPE_CONNECT
	le := binary.LittleEndian
	le.PutUint16(c[40:], f.RecFmt)
	le.PutUint16(c[42:], f.QID)
	le.PutUint16(c[44:], f.SQSize)
	c[46] = f.CAttr
	le.PutUint32(c[48:], f.KATO)
}

// Connect decodes the Connect command fields.
func (c *Command) Connect() Connect {
	le := binary.LittleEndian
	return Connect{RecFmt: le.Uint16(c[40:]), QID: le.Uint16(c[42:]), SQSize: le.Uint16(c[44:]), CAttr: c[46], KATO: le.Uint32(c[48:])}
}

// SetPropertyGet fills c as Property Get of the property at offset; size8
// selects an 8-byte property (attrib 1).
func (c *Command) SetPropertyGet(offset uint32, size8 bool) {
	*c = Command{}
	c[0] = NVME_FABRICS_COMMAND
	c[4] = NVME_FABRICS_TYPE_PROPERTY_GET
	if size8 {
		c[40] = 1
	}
	binary.LittleEndian.PutUint32(c[44:], offset)
}

// SetPropertySet fills c as Property Set.
func (c *Command) SetPropertySet(offset uint32, size8 bool, value uint64) {
	*c = Command{}
	c[0] = NVME_FABRICS_COMMAND
	c[4] = NVME_FABRICS_TYPE_PROPERTY_SET
	if size8 {
		c[40] = 1
	}
	binary.LittleEndian.PutUint32(c[44:], offset)
	binary.LittleEndian.PutUint64(c[48:], value)
}

// Property decodes a Property Get/Set command: offset, 8-byte size, value.
func (c *Command) Property() (offset uint32, size8 bool, value uint64) {
	return binary.LittleEndian.Uint32(c[44:]), c[40]&1 != 0, binary.LittleEndian.Uint64(c[48:])
}

// Discovery log page (NVMe Base 2.0, Figures 262-264; struct
// nvmf_disc_rsp_page_hdr and nvmf_disc_rsp_page_entry).
const (
	DiscoveryLogHeaderSize = 1024
	DiscoveryLogEntrySize  = 1024
)

// Discovery log entry codes (NVMF_TRTYPE_*, NVMF_ADDR_FAMILY_*, NVME_NQN_*).
const (
	NVMF_TRTYPE_TCP         = 3
	NVMF_ADDR_FAMILY_IP4    = 1
	NVMF_ADDR_FAMILY_IP6    = 2
	NVME_NQN_DISC           = 1
	NVME_NQN_NVME           = 2
	NVME_NQN_CURR           = 3
	NVMF_TREQ_NOT_SPECIFIED = 0
	NVMF_TCP_SECTYPE_NONE   = 0
)

// DiscoveryLogHeader is the start of the discovery log page.
type DiscoveryLogHeader struct {
	GenCtr uint64
	NumRec uint64
	RecFmt uint16
}

// ParseDiscoveryLogHeader decodes the first 1024 bytes of the log.
func ParseDiscoveryLogHeader(b []byte) (DiscoveryLogHeader, error) {
	if len(b) < 18 {
		return DiscoveryLogHeader{}, fmt.Errorf("discovery log header: %w", ErrShortBuffer)
	}
	le := binary.LittleEndian
	return DiscoveryLogHeader{GenCtr: le.Uint64(b[0:]), NumRec: le.Uint64(b[8:]), RecFmt: le.Uint16(b[16:])}, nil
}

// AppendDiscoveryLogHeader appends the 1024-byte header.
func AppendDiscoveryLogHeader(b []byte, h DiscoveryLogHeader) []byte {
	e := make([]byte, DiscoveryLogHeaderSize)
	binary.LittleEndian.PutUint64(e[0:], h.GenCtr)
	binary.LittleEndian.PutUint64(e[8:], h.NumRec)
	binary.LittleEndian.PutUint16(e[16:], h.RecFmt)
	return append(b, e...)
}

// DiscoveryLogEntry is one 1024-byte discovery log entry.
type DiscoveryLogEntry struct {
	TrType  uint8  // 0
	AdrFam  uint8  // 1
	SubType uint8  // 2
	TReq    uint8  // 3
	PortID  uint16 // 4
	CNTLID  uint16 // 6
	ASQSZ   uint16 // 8
	EFlags  uint16 // 10
	TrSvcID string // 32, 32 bytes
	SubNQN  string // 256, 256 bytes
	TrAddr  string // 512, 256 bytes
	SecType uint8  // 768, tsas.tcp.sectype
}

// ParseDiscoveryLogEntry decodes one entry.
func ParseDiscoveryLogEntry(b []byte) (DiscoveryLogEntry, error) {
	if len(b) < DiscoveryLogEntrySize {
		return DiscoveryLogEntry{}, fmt.Errorf("discovery log entry: %w", ErrShortBuffer)
	}
	le := binary.LittleEndian
	return DiscoveryLogEntry{
		TrType: b[0], AdrFam: b[1], SubType: b[2], TReq: b[3],
		PortID: le.Uint16(b[4:]), CNTLID: le.Uint16(b[6:]), ASQSZ: le.Uint16(b[8:]), EFlags: le.Uint16(b[10:]),
		TrSvcID: trimField(b[32:64]), SubNQN: trimField(b[256:512]), TrAddr: trimField(b[512:768]),
		SecType: b[768],
	}, nil
}

// AppendDiscoveryLogEntry appends the 1024-byte encoding of e. Strings are
// space padded as the specification asks for TRSVCID and TRADDR.
func AppendDiscoveryLogEntry(b []byte, e DiscoveryLogEntry) []byte {
	r := make([]byte, DiscoveryLogEntrySize)
	le := binary.LittleEndian
	r[0], r[1], r[2], r[3] = e.TrType, e.AdrFam, e.SubType, e.TReq
	le.PutUint16(r[4:], e.PortID)
	le.PutUint16(r[6:], e.CNTLID)
	le.PutUint16(r[8:], e.ASQSZ)
	le.PutUint16(r[10:], e.EFlags)
	putField(r[32:64], e.TrSvcID, ' ')
	putField(r[256:512], e.SubNQN, 0)
	putField(r[512:768], e.TrAddr, ' ')
	r[768] = e.SecType
	return append(b, r...)
}
