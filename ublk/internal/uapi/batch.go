package uapi

// Batched I/O commands (include/uapi/linux/ublk_cmd.h, 7.0,
// UBLK_F_BATCH_IO): in place of one FETCH_REQ / COMMIT_AND_FETCH_REQ per
// tag, PREP_IO_CMDS readies a queue's tags once, one multishot
// FETCH_IO_CMDS hands over the tags of new requests (a __u16 each) in
// provided buffers, and COMMIT_IO_CMDS completes any number of requests
// and readies their tags again. The payload in sqe->cmd is struct
// ublk_batch_io; PREP and COMMIT read an array of elements from sqe->addr
// while they are issued.

// ublkBatchIOSize is sizeof(struct ublk_batch_io).
const ublkBatchIOSize = 16

var (
	UBLK_U_IO_PREP_IO_CMDS   = _IOWR('u', 0x25, ublkBatchIOSize)
	UBLK_U_IO_COMMIT_IO_CMDS = _IOWR('u', 0x26, ublkBatchIOSize)
	UBLK_U_IO_FETCH_IO_CMDS  = _IOWR('u', 0x27, ublkBatchIOSize)
)

// UblkBatchIO mirrors struct ublk_batch_io (include/uapi/linux/ublk_cmd.h).
// NrElem is at most the queue depth (-E2BIG); ElemBytes must be exactly
// the size the flags give (UblkBatchElemBytes), and 2 (one __u16 tag) for
// FETCH_IO_CMDS, whose Flags must be 0.
type UblkBatchIO struct {
	QID       uint16
	Flags     uint16 // UBLK_BATCH_F_*
	NrElem    uint16
	ElemBytes uint8
	Reserved  uint8
	Reserved2 uint64
}

// ublk_batch_io.flags.
const (
	// UBLK_BATCH_F_HAS_ZONE_LBA: each element ends with a __u64
	// zone_lba (zoned devices only).
	UBLK_BATCH_F_HAS_ZONE_LBA = 1 << 0
	// UBLK_BATCH_F_HAS_BUF_ADDR: each element carries a __u64 buf_addr,
	// the tag's data buffer (devices that copy through the daemon's
	// buffers: no USER_COPY, SUPPORT_ZERO_COPY or AUTO_BUF_REG).
	UBLK_BATCH_F_HAS_BUF_ADDR = 1 << 1
	// UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK: a request whose pages cannot be
	// registered is handed over with UBLK_IO_F_NEED_REG_BUF instead of
	// being failed.
	UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK = 1 << 2
)

// UblkElemHeader mirrors struct ublk_elem_header
// (include/uapi/linux/ublk_cmd.h), the start of each PREP and COMMIT
// element. With AUTO_BUF_REG, BufIndex is the slot of the ring's buffer
// table the tag's next request is registered in, and on COMMIT also the
// slot unregistered: keep it the same for a tag. Result is COMMIT's.
type UblkElemHeader struct {
	Tag      uint16
	BufIndex uint16
	Result   int32
}

// UblkBatchElemBytes is the element size the kernel requires for flags
// (ublk_check_batch_cmd_flags): the header, then buf_addr and zone_lba
// where their flags say so.
func UblkBatchElemBytes(flags uint16) int {
	n := 8
	if flags&UBLK_BATCH_F_HAS_BUF_ADDR != 0 {
		n += 8
	}
	if flags&UBLK_BATCH_F_HAS_ZONE_LBA != 0 {
		n += 8
	}
	return n
}
