package nvme

import "encoding/binary"

// CommandSize is sizeof(struct nvme_command), the submission queue entry.
const CommandSize = 64

// CompletionSize is sizeof(struct nvme_completion).
const CompletionSize = 16

// Command is a raw submission queue entry (struct nvme_command, NVMe Base
// Specification 2.0, Figure 88 "Common Command Format"). Fields are
// little-endian at fixed offsets; accessors below name them.
type Command [CommandSize]byte

// Offsets in struct nvme_common_command.
const (
	offOpcode    = 0
	offFlags     = 1
	offCommandID = 2
	offNSID      = 4
	offCDW2      = 8
	offMetadata  = 16
	offDPTR      = 24 // union nvme_data_ptr; for fabrics an SGL descriptor
	offCDW10     = 40
)

// NVME_CMD_SGL_METABUF in the flags byte: PSDT = 01b, the data pointer is an
// SGL (the only choice on fabrics).
const NVME_CMD_SGL_METABUF = 1 << 6

// SGL descriptor type byte, struct nvme_sgl_desc.type = (type << 4) | subtype.
const (
	NVME_SGL_FMT_DATA_DESC       = 0x00
	NVME_SGL_FMT_OFFSET          = 0x01
	NVME_SGL_FMT_TRANSPORT_A     = 0x0a
	NVME_TRANSPORT_SGL_DATA_DESC = 0x05

	// SGLInCapsule describes data that follows the SQE in the command
	// capsule (nvme_tcp_set_sg_inline).
	SGLInCapsule = NVME_SGL_FMT_DATA_DESC<<4 | NVME_SGL_FMT_OFFSET
	// SGLTransport describes data moved by the transport with R2T/H2CData
	// or C2HData (nvme_tcp_set_sg_host_data, nvme_tcp_set_sg_null).
	SGLTransport = NVME_TRANSPORT_SGL_DATA_DESC<<4 | NVME_SGL_FMT_TRANSPORT_A
)

func (c *Command) Opcode() uint8          { return c[offOpcode] }
func (c *Command) SetOpcode(op uint8)     { c[offOpcode] = op }
func (c *Command) Flags() uint8           { return c[offFlags] }
func (c *Command) SetFlags(f uint8)       { c[offFlags] = f }
func (c *Command) CommandID() uint16      { return binary.LittleEndian.Uint16(c[offCommandID:]) }
func (c *Command) SetCommandID(id uint16) { binary.LittleEndian.PutUint16(c[offCommandID:], id) }
func (c *Command) NSID() uint32           { return binary.LittleEndian.Uint32(c[offNSID:]) }
func (c *Command) SetNSID(n uint32)       { binary.LittleEndian.PutUint32(c[offNSID:], n) }

// CDW returns command dword i (0..15) as the specification numbers them.
func (c *Command) CDW(i int) uint32 { return binary.LittleEndian.Uint32(c[4*i:]) }

// SetCDW sets command dword i (0..15).
func (c *Command) SetCDW(i int, v uint32) { binary.LittleEndian.PutUint32(c[4*i:], v) }

// FabricsType is the fctype byte of a Fabrics command (opcode 0x7f).
func (c *Command) FabricsType() uint8 { return c[4] }

// SGL returns the SGL data block descriptor in DPTR: address, length, type.
func (c *Command) SGL() (addr uint64, length uint32, typ uint8) {
	return binary.LittleEndian.Uint64(c[offDPTR:]), binary.LittleEndian.Uint32(c[offDPTR+8:]), c[offDPTR+15]
}

// SetSGL sets DPTR to a single SGL data block descriptor and marks the
// command as using SGLs.
func (c *Command) SetSGL(addr uint64, length uint32, typ uint8) {
	binary.LittleEndian.PutUint64(c[offDPTR:], addr)
	binary.LittleEndian.PutUint32(c[offDPTR+8:], length)
	c[offDPTR+12], c[offDPTR+13], c[offDPTR+14] = 0, 0, 0
	c[offDPTR+15] = typ
	c[offFlags] |= NVME_CMD_SGL_METABUF
}

// Completion is a raw completion queue entry (struct nvme_completion, NVMe
// Base Specification 2.0, Figure 89).
type Completion [CompletionSize]byte

// Result is command specific dwords 0 and 1 (union nvme_result).
func (c *Completion) Result() uint64        { return binary.LittleEndian.Uint64(c[0:]) }
func (c *Completion) SetResult(v uint64)    { binary.LittleEndian.PutUint64(c[0:], v) }
func (c *Completion) SQHead() uint16        { return binary.LittleEndian.Uint16(c[8:]) }
func (c *Completion) SetSQHead(v uint16)    { binary.LittleEndian.PutUint16(c[8:], v) }
func (c *Completion) SQID() uint16          { return binary.LittleEndian.Uint16(c[10:]) }
func (c *Completion) SetSQID(v uint16)      { binary.LittleEndian.PutUint16(c[10:], v) }
func (c *Completion) CommandID() uint16     { return binary.LittleEndian.Uint16(c[12:]) }
func (c *Completion) SetCommandID(v uint16) { binary.LittleEndian.PutUint16(c[12:], v) }

// Status is the status field without the phase tag (bit 0 on the wire).
func (c *Completion) Status() Status { return Status(binary.LittleEndian.Uint16(c[14:]) >> 1) }

// SetStatus sets the status field; the phase tag stays 0 (unused on fabrics).
func (c *Completion) SetStatus(s Status) { binary.LittleEndian.PutUint16(c[14:], uint16(s)<<1) }
