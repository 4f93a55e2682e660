package uapi

// Zero copy: the ublk request's own pages as an io_uring registered buffer.
// io_uring half from include/uapi/linux/io_uring.h, ublk half from
// include/uapi/linux/ublk_cmd.h; the release that brought each is noted.

// enum io_uring_op: the fixed-buffer and zero-copy operations
// (include/uapi/linux/io_uring.h).
const (
	IORING_OP_READ_FIXED  = 4  // 5.1
	IORING_OP_WRITE_FIXED = 5  // 5.1
	IORING_OP_SEND_ZC     = 47 // 6.0
)

// io_uring_register(2) opcodes (include/uapi/linux/io_uring.h).
const (
	IORING_REGISTER_BUFFERS   = 0
	IORING_UNREGISTER_BUFFERS = 1
	IORING_REGISTER_BUFFERS2  = 15 // 5.13
)

// IORING_RSRC_REGISTER_SPARSE, in io_uring_rsrc_register.flags: a table of
// nr empty slots, filled later (5.19) — here by the ublk driver, one slot
// per tag (UBLK_F_AUTO_BUF_REG or UBLK_U_IO_REGISTER_IO_BUF).
const IORING_RSRC_REGISTER_SPARSE = 1 << 0

// IoUringRsrcRegister mirrors struct io_uring_rsrc_register
// (include/uapi/linux/io_uring.h), the argument of IORING_REGISTER_BUFFERS2.
type IoUringRsrcRegister struct {
	Nr    uint32
	Flags uint32
	Resv2 uint64
	Data  uint64 // struct iovec *, 0 for a sparse table
	Tags  uint64 // __u64 *, 0 for none
}

// Send/receive flags in sqe->ioprio (include/uapi/linux/io_uring.h).
const (
	IORING_RECVSEND_POLL_FIRST = 1 << 0
	IORING_RECVSEND_FIXED_BUF  = 1 << 2 // SEND_ZC, SENDMSG_ZC: buf_index names a registered buffer (6.0)
)

// CQE flags (include/uapi/linux/io_uring.h): a SEND_ZC posts its result
// with IORING_CQE_F_MORE, then a notification (IORING_CQE_F_NOTIF) once
// the kernel no longer reads the buffer.
const (
	IORING_CQE_F_BUFFER = 1 << 0
	IORING_CQE_F_MORE   = 1 << 1
	IORING_CQE_F_NOTIF  = 1 << 3
)

// ublk I/O commands for registering a request's buffer by hand
// (include/uapi/linux/ublk_cmd.h, 6.15, UBLK_F_SUPPORT_ZERO_COPY):
// ublksrv_io_cmd.addr is the index in the ring's buffer table.
var (
	UBLK_U_IO_REGISTER_IO_BUF   = _IOWR('u', 0x23, ioCmdSize)
	UBLK_U_IO_UNREGISTER_IO_BUF = _IOWR('u', 0x24, ioCmdSize)
)

// UBLK_IO_F_NEED_REG_BUF is set in ublksrv_io_desc.op_flags when an
// automatic registration failed and UBLK_AUTO_BUF_REG_FALLBACK was passed:
// the server must register the buffer itself (include/uapi/linux/ublk_cmd.h).
const UBLK_IO_F_NEED_REG_BUF = 1 << 17

// ublk_auto_buf_reg.flags (include/uapi/linux/ublk_cmd.h, 6.16).
const (
	UBLK_AUTO_BUF_REG_FALLBACK = 1 << 0
	UBLK_AUTO_BUF_REG_F_MASK   = UBLK_AUTO_BUF_REG_FALLBACK
)

// UblkAutoBufReg mirrors struct ublk_auto_buf_reg
// (include/uapi/linux/ublk_cmd.h, 6.16). With UBLK_F_AUTO_BUF_REG it is
// carried in the SQE's addr field of FETCH_REQ and COMMIT_AND_FETCH_REQ
// (not in ublksrv_io_cmd): the driver registers the request's buffer at
// Index of the issuing ring's buffer table before the fetch completes, and
// unregisters it when the COMMIT_AND_FETCH_REQ is issued on that ring.
type UblkAutoBufReg struct {
	Index     uint16
	Flags     uint8
	Reserved0 uint8
	Reserved1 uint32 // must be 0
}

// SQEAddr is ublk_auto_buf_reg_to_sqe_addr (include/uapi/linux/ublk_cmd.h):
// bits 0-15 index, 16-23 flags, 24-31 reserved0, 32-63 reserved1.
func (b UblkAutoBufReg) SQEAddr() uint64 {
	return uint64(b.Index) | uint64(b.Flags)<<16 | uint64(b.Reserved0)<<24 | uint64(b.Reserved1)<<32
}
