// Package uapi mirrors the kernel's user-space ABI for io_uring and ublk.
//
// Names are the kernel's, verbatim, so that a reader can grep the uapi
// headers for them. Each struct says which header it mirrors; the unit tests
// check sizes and field offsets against the C layout. Nothing here does
// anything: the wrappers live in package uring and package ublk.
package uapi

// Syscall numbers are the same on every architecture for these (they were
// added after the syscall tables were unified, asm-generic numbering).
const (
	SYS_IO_URING_SETUP    = 425
	SYS_IO_URING_ENTER    = 426
	SYS_IO_URING_REGISTER = 427
)

// io_uring_setup flags (include/uapi/linux/io_uring.h).
const (
	IORING_SETUP_IOPOLL        = 1 << 0
	IORING_SETUP_SQPOLL        = 1 << 1
	IORING_SETUP_SQ_AFF        = 1 << 2
	IORING_SETUP_CQSIZE        = 1 << 3
	IORING_SETUP_CLAMP         = 1 << 4
	IORING_SETUP_ATTACH_WQ     = 1 << 5
	IORING_SETUP_R_DISABLED    = 1 << 6
	IORING_SETUP_SUBMIT_ALL    = 1 << 7
	IORING_SETUP_COOP_TASKRUN  = 1 << 8
	IORING_SETUP_TASKRUN_FLAG  = 1 << 9
	IORING_SETUP_SQE128        = 1 << 10
	IORING_SETUP_CQE32         = 1 << 11
	IORING_SETUP_SINGLE_ISSUER = 1 << 12
	IORING_SETUP_DEFER_TASKRUN = 1 << 13
)

// io_uring_params.features (include/uapi/linux/io_uring.h).
const (
	IORING_FEAT_SINGLE_MMAP   = 1 << 0
	IORING_FEAT_NODROP        = 1 << 1
	IORING_FEAT_SUBMIT_STABLE = 1 << 2
	IORING_FEAT_EXT_ARG       = 1 << 8
)

// io_uring_enter flags (include/uapi/linux/io_uring.h).
const (
	IORING_ENTER_GETEVENTS = 1 << 0
	IORING_ENTER_SQ_WAKEUP = 1 << 1
	IORING_ENTER_SQ_WAIT   = 1 << 2
	IORING_ENTER_EXT_ARG   = 1 << 3
)

// mmap offsets of the rings (include/uapi/linux/io_uring.h).
const (
	IORING_OFF_SQ_RING = 0
	IORING_OFF_CQ_RING = 0x8000000
	IORING_OFF_SQES    = 0x10000000
)

// enum io_uring_op, the values this project uses (include/uapi/linux/io_uring.h).
const (
	IORING_OP_NOP          = 0
	IORING_OP_SENDMSG      = 9  // 5.3
	IORING_OP_RECVMSG      = 10 // 5.3
	IORING_OP_ASYNC_CANCEL = 14 // 5.5
	IORING_OP_READ         = 22 // 5.6
	IORING_OP_WRITE        = 23
	IORING_OP_SEND         = 26 // 5.6
	IORING_OP_RECV         = 27 // 5.6
	IORING_OP_URING_CMD    = 46 // 5.19
)

// io_uring_sqe.flags, the IOSQE_* bits (include/uapi/linux/io_uring.h).
const (
	IOSQE_FIXED_FILE       = 1 << 0
	IOSQE_IO_DRAIN         = 1 << 1
	IOSQE_IO_LINK          = 1 << 2
	IOSQE_IO_HARDLINK      = 1 << 3
	IOSQE_ASYNC            = 1 << 4
	IOSQE_BUFFER_SELECT    = 1 << 5
	IOSQE_CQE_SKIP_SUCCESS = 1 << 6
)

// io_uring_sqe.cancel_flags of IORING_OP_ASYNC_CANCEL
// (include/uapi/linux/io_uring.h): without a flag the request whose
// user_data is sqe->addr is cancelled; ALL cancels every match instead of
// the first, FD matches on sqe->fd instead of user_data, ANY matches every
// request (5.19).
const (
	IORING_ASYNC_CANCEL_ALL      = 1 << 0
	IORING_ASYNC_CANCEL_FD       = 1 << 1
	IORING_ASYNC_CANCEL_ANY      = 1 << 2
	IORING_ASYNC_CANCEL_FD_FIXED = 1 << 3
)

// Sizes of one submission queue entry: 64 bytes, or 128 with
// IORING_SETUP_SQE128 (which big commands like ublksrv_ctrl_cmd need).
const (
	SQESize    = 64
	SQE128Size = 128
	CQESize    = 16
	// SQECmdOffset is offsetof(struct io_uring_sqe, cmd): the inline
	// command payload of IORING_OP_URING_CMD starts here (16 bytes in a
	// 64-byte SQE, 80 bytes in a 128-byte SQE).
	SQECmdOffset = 48
)

// IoSqringOffsets mirrors struct io_sqring_offsets (include/uapi/linux/io_uring.h).
type IoSqringOffsets struct {
	Head        uint32
	Tail        uint32
	RingMask    uint32
	RingEntries uint32
	Flags       uint32
	Dropped     uint32
	Array       uint32
	Resv1       uint32
	UserAddr    uint64
}

// IoCqringOffsets mirrors struct io_cqring_offsets (include/uapi/linux/io_uring.h).
type IoCqringOffsets struct {
	Head        uint32
	Tail        uint32
	RingMask    uint32
	RingEntries uint32
	Overflow    uint32
	Cqes        uint32
	Flags       uint32
	Resv1       uint32
	UserAddr    uint64
}

// IoUringParams mirrors struct io_uring_params (include/uapi/linux/io_uring.h).
type IoUringParams struct {
	SqEntries    uint32
	CqEntries    uint32
	Flags        uint32
	SqThreadCPU  uint32
	SqThreadIdle uint32
	Features     uint32
	WqFd         uint32
	Resv         [3]uint32
	SqOff        IoSqringOffsets
	CqOff        IoCqringOffsets
}

// IoUringSqe mirrors the 64-byte struct io_uring_sqe
// (include/uapi/linux/io_uring.h) with the unions resolved to the members
// this project uses: Off is also cmd_op (low 32 bits) for URING_CMD, OpFlags
// is rw_flags / uring_cmd_flags / msg_flags / cancel_flags, Addr3 and Pad2
// are where cmd[] begins.
type IoUringSqe struct {
	Opcode      uint8
	Flags       uint8
	Ioprio      uint16
	Fd          int32
	Off         uint64
	Addr        uint64
	Len         uint32
	OpFlags     uint32
	UserData    uint64
	BufIndex    uint16
	Personality uint16
	SpliceFdIn  int32
	Addr3       uint64
	Pad2        [1]uint64
}

// IoUringCqe mirrors struct io_uring_cqe (include/uapi/linux/io_uring.h),
// without the big_cqe[] tail of IORING_SETUP_CQE32.
type IoUringCqe struct {
	UserData uint64
	Res      int32
	Flags    uint32
}
