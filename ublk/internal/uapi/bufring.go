package uapi

// Provided buffer rings (include/uapi/linux/io_uring.h, 5.19): a ring of
// buffers the application hands the kernel ahead of time; an operation
// with IOSQE_BUFFER_SELECT takes the next one of its group (sqe->buf_group)
// and its CQE names it (IORING_CQE_F_BUFFER, the buffer id in the upper 16
// bits of cqe->flags). ublk's UBLK_U_IO_FETCH_IO_CMDS (UBLK_F_BATCH_IO,
// 7.0) writes the tags of the requests it hands over into such a buffer.

// io_uring_register(2) opcodes of provided buffer rings.
const (
	IORING_REGISTER_PBUF_RING   = 22 // 5.19
	IORING_UNREGISTER_PBUF_RING = 23
)

// IORING_CQE_BUFFER_SHIFT: cqe->flags >> IORING_CQE_BUFFER_SHIFT is the id
// of the buffer the operation used, when IORING_CQE_F_BUFFER is set.
const IORING_CQE_BUFFER_SHIFT = 16

// io_uring_buf_reg.flags: IOU_PBUF_RING_MMAP, the kernel allocates the
// ring and the application maps it (6.4); IOU_PBUF_RING_INC, buffers are
// consumed incrementally (6.12). Neither is used here: the ring is the
// application's own page-aligned memory, and each completion uses up its
// buffer.
const (
	IOU_PBUF_RING_MMAP = 1
	IOU_PBUF_RING_INC  = 2
)

// IoUringBufReg mirrors struct io_uring_buf_reg
// (include/uapi/linux/io_uring.h), the argument of
// IORING_REGISTER_PBUF_RING and IORING_UNREGISTER_PBUF_RING.
type IoUringBufReg struct {
	RingAddr    uint64
	RingEntries uint32 // a power of two, at most 32768
	Bgid        uint16
	Flags       uint16
	Resv        [3]uint64
}

// IoUringBuf mirrors struct io_uring_buf (include/uapi/linux/io_uring.h),
// one entry of a provided buffer ring. struct io_uring_buf_ring overlays
// the first entry's resv with the ring's tail (a __u16 at offset 14): the
// application advances it to publish the entries before it.
type IoUringBuf struct {
	Addr uint64
	Len  uint32
	Bid  uint16
	Resv uint16
}

// IoUringBufRingTailOffset is offsetof(struct io_uring_buf_ring, tail).
const IoUringBufRingTailOffset = 14

// IORING_URING_CMD_MULTISHOT, in sqe->uring_cmd_flags: the driver may
// post several completions for one IORING_OP_URING_CMD, each with
// IORING_CQE_F_MORE but the last; it needs IOSQE_BUFFER_SELECT
// ("io_uring: uring_cmd: add multishot support", part of what
// UBLK_F_BATCH_IO builds on: every kernel with that feature has it).
const IORING_URING_CMD_MULTISHOT = 1 << 1
