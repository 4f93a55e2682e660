package nvme

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
)

// IdentifySize is the size of every Identify data structure.
const IdentifySize = 4096

// ErrShortBuffer is returned by decoders given fewer bytes than the
// structure needs.
var ErrShortBuffer = errors.New("nvme: buffer too short for structure")

// IdentifyController holds the fields of struct nvme_id_ctrl (NVMe Base
// 2.0, Figure 275; NVMe over Fabrics 1.1 for IOCCSZ and following) that the
// host uses. Offsets are those of the raw 4096-byte structure.
type IdentifyController struct {
	VID    uint16 // 0
	SSVID  uint16 // 2
	SN     string // 4, 20 bytes
	MN     string // 24, 40 bytes
	FR     string // 64, 8 bytes
	MDTS   uint8  // 77, max data transfer 2^MDTS min pages, 0: no limit
	CNTLID uint16 // 78
	VER    uint32 // 80
	// RTD3E is the RTD3 Entry Latency (88), in microseconds: how long a
	// shutdown notification (CC.SHN) may take to complete; 0: not
	// reported.
	RTD3E     uint32
	OAES      uint32 // 92, optional asynchronous events supported
	CTRATT    uint32 // 96, controller attributes
	CNTRLTYPE uint8  // 111
	// CRDT are Command Retry Delay Times 1..3 (134, 136, 138), in
	// 100 ms units: the delay a completion's CRD field selects.
	CRDT   [3]uint16
	AERL   uint8  // 259, 0's based
	KAS    uint16 // 320, keep alive support, 100 ms units
	SQES   uint8  // 512
	CQES   uint8  // 513
	MAXCMD uint16 // 514
	NN     uint32 // 516
	ONCS   uint16 // 520
	VWC    uint8  // 525
	SGLS   uint32 // 536
	SubNQN string // 768, 256 bytes
	IOCCSZ uint32 // 1792, I/O command capsule size in 16-byte units
	IORCSZ uint32 // 1796
	ICDOFF uint16 // 1800
	MSDBD  uint8  // 1803
}

func trimField(b []byte) string {
	return strings.TrimRight(strings.TrimRight(string(b), "\x00"), " ")
}

func putField(dst []byte, s string, pad byte) {
	n := copy(dst, s)
	for i := n; i < len(dst); i++ {
		dst[i] = pad
	}
}

// ParseIdentifyController decodes a 4096-byte Identify Controller structure.
func ParseIdentifyController(b []byte) (*IdentifyController, error) {
	if len(b) < IdentifySize {
		return nil, fmt.Errorf("identify controller: %w (%d bytes)", ErrShortBuffer, len(b))
	}
	le := binary.LittleEndian
	return &IdentifyController{
		VID: le.Uint16(b[0:]), SSVID: le.Uint16(b[2:]),
		SN: trimField(b[4:24]), MN: trimField(b[24:64]), FR: trimField(b[64:72]),
		MDTS: b[77], CNTLID: le.Uint16(b[78:]), VER: le.Uint32(b[80:]), RTD3E: le.Uint32(b[88:]),
		OAES: le.Uint32(b[92:]), CTRATT: le.Uint32(b[96:]), CNTRLTYPE: b[111],
		CRDT: [3]uint16{le.Uint16(b[134:]), le.Uint16(b[136:]), le.Uint16(b[138:])}, AERL: b[259],
		KAS: le.Uint16(b[320:]), SQES: b[512], CQES: b[513],
		MAXCMD: le.Uint16(b[514:]), NN: le.Uint32(b[516:]), ONCS: le.Uint16(b[520:]),
		VWC: b[525], SGLS: le.Uint32(b[536:]), SubNQN: trimField(b[768:1024]),
		IOCCSZ: le.Uint32(b[1792:]), IORCSZ: le.Uint32(b[1796:]),
		ICDOFF: le.Uint16(b[1800:]), MSDBD: b[1803],
	}, nil
}

// Marshal encodes the structure into a new 4096-byte buffer.
func (c *IdentifyController) Marshal() []byte {
	b := make([]byte, IdentifySize)
	le := binary.LittleEndian
	le.PutUint16(b[0:], c.VID)
	le.PutUint16(b[2:], c.SSVID)
	putField(b[4:24], c.SN, ' ')
	putField(b[24:64], c.MN, ' ')
	putField(b[64:72], c.FR, ' ')
	b[77] = c.MDTS
	le.PutUint16(b[78:], c.CNTLID)
	le.PutUint32(b[80:], c.VER)
	le.PutUint32(b[88:], c.RTD3E)
	le.PutUint32(b[92:], c.OAES)
	le.PutUint32(b[96:], c.CTRATT)
	b[111] = c.CNTRLTYPE
	for i, d := range c.CRDT {
		le.PutUint16(b[134+2*i:], d)
	}
	b[259] = c.AERL
	le.PutUint16(b[320:], c.KAS)
	b[512], b[513] = c.SQES, c.CQES
	le.PutUint16(b[514:], c.MAXCMD)
	le.PutUint32(b[516:], c.NN)
	le.PutUint16(b[520:], c.ONCS)
	b[525] = c.VWC
	le.PutUint32(b[536:], c.SGLS)
	putField(b[768:1024], c.SubNQN, 0)
	le.PutUint32(b[1792:], c.IOCCSZ)
	le.PutUint32(b[1796:], c.IORCSZ)
	le.PutUint16(b[1800:], c.ICDOFF)
	b[1803] = c.MSDBD
	return b
}

// NVME_CTRL_CTRATT_TBKAS: traffic-based keep-alive support.
const NVME_CTRL_CTRATT_TBKAS = 1 << 14

// SGL support (SGLS bits 1:0, NVME_CTRL_SGLS_*): 0 means SGLs are not
// supported, which no NVMe over Fabrics controller may say (the Linux host:
// nvme_ctrl_sgl_supported).
const (
	NVME_CTRL_SGLS_BYTE_ALIGNED  = 1
	NVME_CTRL_SGLS_DWORD_ALIGNED = 2
	NVME_CTRL_SGLS_MASK          = 3
)

// IdentifyControllerNVM is struct nvme_id_ctrl_nvm: Identify CNS 06h with
// CSI 0, the I/O Command Set specific Identify Controller data structure for
// the NVM Command Set (NVM Command Set 1.0, Figure 102).
type IdentifyControllerNVM struct {
	VSL   uint8  // 0, Verify Size Limit, 2^n CAP.MPSMIN pages, 0: none
	WZSL  uint8  // 1, Write Zeroes Size Limit, same units
	WUSL  uint8  // 2, Write Uncorrectable Size Limit, same units
	DMRL  uint8  // 3, Dataset Management Ranges Limit, 0: none
	DMRSL uint32 // 4, Dataset Management Range Size Limit, logical blocks, 0: none
	DMSL  uint64 // 8, Dataset Management Size Limit, logical blocks, 0: none
}

// ParseIdentifyControllerNVM decodes a 4096-byte CNS 06h structure.
func ParseIdentifyControllerNVM(b []byte) (*IdentifyControllerNVM, error) {
	if len(b) < IdentifySize {
		return nil, fmt.Errorf("identify controller (NVM command set): %w (%d bytes)", ErrShortBuffer, len(b))
	}
	le := binary.LittleEndian
	return &IdentifyControllerNVM{VSL: b[0], WZSL: b[1], WUSL: b[2], DMRL: b[3],
		DMRSL: le.Uint32(b[4:]), DMSL: le.Uint64(b[8:])}, nil
}

// Marshal encodes the structure into a new 4096-byte buffer.
func (c *IdentifyControllerNVM) Marshal() []byte {
	b := make([]byte, IdentifySize)
	b[0], b[1], b[2], b[3] = c.VSL, c.WZSL, c.WUSL, c.DMRL
	binary.LittleEndian.PutUint32(b[4:], c.DMRSL)
	binary.LittleEndian.PutUint64(b[8:], c.DMSL)
	return b
}

// HostBehaviorSize is sizeof(struct nvme_feat_host_behavior), the data of
// Set Features Host Behavior Support (FID 16h).
const HostBehaviorSize = 512

// NVME_ENABLE_ACRE is the Advanced Command Retry Enable byte of struct
// nvme_feat_host_behavior (byte 0): the controller may then ask for a
// Command Retry Delay in a completion's CRD field.
const NVME_ENABLE_ACRE = 1

// LBAFormat is one entry of the LBA format list (struct nvme_lbaf).
type LBAFormat struct {
	MS uint16 // metadata bytes per LBA
	DS uint8  // LBA data size as a power of two
	RP uint8  // relative performance
}

// IdentifyNamespace holds the fields of struct nvme_id_ns (NVMe NVM Command
// Set 1.0, Figure 97) that the host uses.
type IdentifyNamespace struct {
	NSZE   uint64        // 0, size in logical blocks
	NCAP   uint64        // 8
	NUSE   uint64        // 16
	NSFEAT uint8         // 24
	NLBAF  uint8         // 25, 0's based number of formats
	FLBAS  uint8         // 26
	DLFEAT uint8         // 33
	NGUID  [16]byte      // 104
	EUI64  [8]byte       // 120
	LBAF   [64]LBAFormat // 128
}

// ParseIdentifyNamespace decodes a 4096-byte Identify Namespace structure.
func ParseIdentifyNamespace(b []byte) (*IdentifyNamespace, error) {
	if len(b) < IdentifySize {
		return nil, fmt.Errorf("identify namespace: %w (%d bytes)", ErrShortBuffer, len(b))
	}
	le := binary.LittleEndian
	ns := &IdentifyNamespace{
		NSZE: le.Uint64(b[0:]), NCAP: le.Uint64(b[8:]), NUSE: le.Uint64(b[16:]),
		NSFEAT: b[24], NLBAF: b[25], FLBAS: b[26], DLFEAT: b[33],
	}
	copy(ns.NGUID[:], b[104:120])
	copy(ns.EUI64[:], b[120:128])
	for i := range ns.LBAF {
		o := 128 + 4*i
		ns.LBAF[i] = LBAFormat{MS: le.Uint16(b[o:]), DS: b[o+2], RP: b[o+3] & 3}
	}
	return ns, nil
}

// Marshal encodes the structure into a new 4096-byte buffer.
func (ns *IdentifyNamespace) Marshal() []byte {
	b := make([]byte, IdentifySize)
	le := binary.LittleEndian
	le.PutUint64(b[0:], ns.NSZE)
	le.PutUint64(b[8:], ns.NCAP)
	le.PutUint64(b[16:], ns.NUSE)
	b[24], b[25], b[26], b[33] = ns.NSFEAT, ns.NLBAF, ns.FLBAS, ns.DLFEAT
	copy(b[104:], ns.NGUID[:])
	copy(b[120:], ns.EUI64[:])
	for i, f := range ns.LBAF {
		o := 128 + 4*i
		le.PutUint16(b[o:], f.MS)
		b[o+2], b[o+3] = f.DS, f.RP
	}
	return b
}

// FormatIndex is the LBA format in use (FLBAS bits 3:0 and 6:5).
func (ns *IdentifyNamespace) FormatIndex() int {
	return int(ns.FLBAS&0xf) | int(ns.FLBAS>>5&3)<<4
}

// BlockShift is log2 of the logical block size in use, or an error when the
// format index or size is not one a host can use (512 B .. 64 KiB, and no
// metadata interleaved with data).
func (ns *IdentifyNamespace) BlockShift() (uint8, error) {
	i := ns.FormatIndex()
	if i > int(ns.NLBAF) {
		return 0, fmt.Errorf("identify namespace: format index %d beyond NLBAF %d", i, ns.NLBAF)
	}
	f := ns.LBAF[i]
	if f.DS < 9 || f.DS > 16 {
		return 0, fmt.Errorf("identify namespace: unsupported LBA data size 2^%d", f.DS)
	}
	if f.MS != 0 {
		return 0, fmt.Errorf("identify namespace: LBA format with %d metadata bytes is not supported", f.MS)
	}
	return f.DS, nil
}

// Namespace identification descriptor types (NVME_NIDT_*).
const (
	NVME_NIDT_EUI64 = 0x01
	NVME_NIDT_NGUID = 0x02
	NVME_NIDT_UUID  = 0x03
	NVME_NIDT_CSI   = 0x04
)

// NamespaceIDs are the identifiers from the Namespace Identification
// Descriptor list (CNS 03h). A zero array means "not reported".
type NamespaceIDs struct {
	EUI64 [8]byte
	NGUID [16]byte
	UUID  [16]byte
	CSI   uint8
}

// ParseNamespaceIDs decodes a Namespace Identification Descriptor list.
func ParseNamespaceIDs(b []byte) (NamespaceIDs, error) {
	var ids NamespaceIDs
	for off := 0; off+4 <= len(b); {
		typ, l := b[off], int(b[off+1])
		if typ == 0 {
			break // end of list
		}
		if off+4+l > len(b) {
			return ids, fmt.Errorf("namespace id descriptor at %d: length %d: %w", off, l, ErrShortBuffer)
		}
		v := b[off+4 : off+4+l]
		want := map[uint8]int{NVME_NIDT_EUI64: 8, NVME_NIDT_NGUID: 16, NVME_NIDT_UUID: 16, NVME_NIDT_CSI: 1}[typ]
		if want != 0 && l != want {
			return ids, fmt.Errorf("namespace id descriptor type %d: length %d, want %d", typ, l, want)
		}
		switch typ {
		case NVME_NIDT_EUI64:
			copy(ids.EUI64[:], v)
		case NVME_NIDT_NGUID:
			copy(ids.NGUID[:], v)
		case NVME_NIDT_UUID:
			copy(ids.UUID[:], v)
		case NVME_NIDT_CSI:
			ids.CSI = v[0]
		}
		off += 4 + l
	}
	return ids, nil
}

// Marshal encodes the non-zero identifiers as a 4096-byte descriptor list.
func (ids NamespaceIDs) Marshal() []byte {
	b := make([]byte, IdentifySize)
	off := 0
	add := func(typ uint8, v []byte) {
		for _, x := range v {
			if x != 0 {
				b[off], b[off+1] = typ, uint8(len(v))
				copy(b[off+4:], v)
				off += 4 + len(v)
				return
			}
		}
	}
	add(NVME_NIDT_EUI64, ids.EUI64[:])
	add(NVME_NIDT_NGUID, ids.NGUID[:])
	add(NVME_NIDT_UUID, ids.UUID[:])
	return b
}

// ParseNamespaceList decodes an active namespace ID list (CNS 02h): up to
// 1024 increasing IDs, terminated by a zero entry.
func ParseNamespaceList(b []byte) ([]uint32, error) {
	var ids []uint32
	var prev uint32
	for off := 0; off+4 <= len(b); off += 4 {
		id := binary.LittleEndian.Uint32(b[off:])
		if id == 0 {
			break
		}
		if id <= prev || id == NVME_NSID_ALL {
			return ids, fmt.Errorf("namespace list: id %#x after %#x is out of order or invalid", id, prev)
		}
		ids = append(ids, id)
		prev = id
	}
	return ids, nil
}

// DSMRange is one Dataset Management range (struct nvme_dsm_range).
type DSMRange struct {
	Attributes uint32
	NLB        uint32 // number of logical blocks, not 0's based
	SLBA       uint64
}

// DSMRangeSize is sizeof(struct nvme_dsm_range).
const DSMRangeSize = 16

// AppendDSMRange appends the 16-byte encoding of r.
func AppendDSMRange(b []byte, r DSMRange) []byte {
	b = binary.LittleEndian.AppendUint32(b, r.Attributes)
	b = binary.LittleEndian.AppendUint32(b, r.NLB)
	return binary.LittleEndian.AppendUint64(b, r.SLBA)
}

// ParseDSMRanges decodes n ranges.
func ParseDSMRanges(b []byte, n int) ([]DSMRange, error) {
	if n < 0 || n > len(b)/DSMRangeSize {
		return nil, fmt.Errorf("dsm ranges: %d ranges: %w", n, ErrShortBuffer)
	}
	rs := make([]DSMRange, n)
	for i := range rs {
		o := i * DSMRangeSize
		rs[i] = DSMRange{binary.LittleEndian.Uint32(b[o:]), binary.LittleEndian.Uint32(b[o+4:]), binary.LittleEndian.Uint64(b[o+8:])}
	}
	return rs, nil
}
