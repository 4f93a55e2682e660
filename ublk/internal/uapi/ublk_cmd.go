package uapi

// ioctl number encoding, asm-generic (include/uapi/asm-generic/ioctl.h);
// x86, arm64 and riscv use it. ublk uses the 'u' type for all its commands.
const (
	_IOC_NONE  = 0
	_IOC_WRITE = 1
	_IOC_READ  = 2

	_IOC_NRSHIFT   = 0
	_IOC_TYPESHIFT = 8
	_IOC_SIZESHIFT = 16
	_IOC_DIRSHIFT  = 30
)

func ioc(dir, typ, nr, size uint32) uint32 {
	return dir<<_IOC_DIRSHIFT | typ<<_IOC_TYPESHIFT | nr<<_IOC_NRSHIFT | size<<_IOC_SIZESHIFT
}

func _IOR(typ, nr, size uint32) uint32  { return ioc(_IOC_READ, typ, nr, size) }
func _IOWR(typ, nr, size uint32) uint32 { return ioc(_IOC_READ|_IOC_WRITE, typ, nr, size) }

// IOCNr returns the command number of an ioctl-encoded opcode: the legacy
// (plain) opcode that kernels without UBLK_F_CMD_IOCTL_ENCODE understand.
func IOCNr(op uint32) uint32 { return op & 0xff }

// Legacy control command opcodes (include/uapi/linux/ublk_cmd.h). Kernels
// before 6.2 only know these; newer ones accept both unless built with
// CONFIG_BLKDEV_UBLK_LEGACY_OPCODES=n.
const (
	UBLK_CMD_GET_QUEUE_AFFINITY  = 0x01
	UBLK_CMD_GET_DEV_INFO        = 0x02
	UBLK_CMD_ADD_DEV             = 0x04
	UBLK_CMD_DEL_DEV             = 0x05
	UBLK_CMD_START_DEV           = 0x06
	UBLK_CMD_STOP_DEV            = 0x07
	UBLK_CMD_SET_PARAMS          = 0x08
	UBLK_CMD_GET_PARAMS          = 0x09
	UBLK_CMD_START_USER_RECOVERY = 0x10
	UBLK_CMD_END_USER_RECOVERY   = 0x11
	UBLK_CMD_GET_DEV_INFO2       = 0x12
)

const ctrlCmdSize = 32 // sizeof(struct ublksrv_ctrl_cmd)
const ioCmdSize = 16   // sizeof(struct ublksrv_io_cmd)

// ioctl-encoded control opcodes (include/uapi/linux/ublk_cmd.h, 6.2+ except
// where noted).
var (
	UBLK_U_CMD_GET_QUEUE_AFFINITY  = _IOR('u', UBLK_CMD_GET_QUEUE_AFFINITY, ctrlCmdSize)
	UBLK_U_CMD_GET_DEV_INFO        = _IOR('u', UBLK_CMD_GET_DEV_INFO, ctrlCmdSize)
	UBLK_U_CMD_ADD_DEV             = _IOWR('u', UBLK_CMD_ADD_DEV, ctrlCmdSize)
	UBLK_U_CMD_DEL_DEV             = _IOWR('u', UBLK_CMD_DEL_DEV, ctrlCmdSize)
	UBLK_U_CMD_START_DEV           = _IOWR('u', UBLK_CMD_START_DEV, ctrlCmdSize)
	UBLK_U_CMD_STOP_DEV            = _IOWR('u', UBLK_CMD_STOP_DEV, ctrlCmdSize)
	UBLK_U_CMD_SET_PARAMS          = _IOWR('u', UBLK_CMD_SET_PARAMS, ctrlCmdSize)
	UBLK_U_CMD_GET_PARAMS          = _IOR('u', UBLK_CMD_GET_PARAMS, ctrlCmdSize)
	UBLK_U_CMD_START_USER_RECOVERY = _IOWR('u', UBLK_CMD_START_USER_RECOVERY, ctrlCmdSize)
	UBLK_U_CMD_END_USER_RECOVERY   = _IOWR('u', UBLK_CMD_END_USER_RECOVERY, ctrlCmdSize)
	UBLK_U_CMD_GET_DEV_INFO2       = _IOR('u', UBLK_CMD_GET_DEV_INFO2, ctrlCmdSize)
	UBLK_U_CMD_GET_FEATURES        = _IOR('u', 0x13, ctrlCmdSize) // 6.5, no legacy form
	UBLK_U_CMD_DEL_DEV_ASYNC       = _IOR('u', 0x14, ctrlCmdSize) // 6.9
	// UBLK_U_CMD_UPDATE_SIZE sets a started device's size to data[0]
	// sectors of 512 bytes (set_capacity_and_notify). 6.16 (98b995660bff),
	// with UBLK_F_UPDATE_SIZE; no legacy form.
	UBLK_U_CMD_UPDATE_SIZE = _IOWR('u', 0x15, ctrlCmdSize)
	// UBLK_U_CMD_QUIESCE_DEV quiesces the device for a hand-over (Device.Handoff).
	// 6.16, with UBLK_F_QUIESCE; no legacy form.
	UBLK_U_CMD_QUIESCE_DEV = _IOWR('u', 0x16, ctrlCmdSize)
)

// Legacy and ioctl-encoded I/O command opcodes, issued on /dev/ublkcN
// (include/uapi/linux/ublk_cmd.h).
const (
	UBLK_IO_FETCH_REQ            = 0x20
	UBLK_IO_COMMIT_AND_FETCH_REQ = 0x21
	UBLK_IO_NEED_GET_DATA        = 0x22
)

var (
	UBLK_U_IO_FETCH_REQ            = _IOWR('u', UBLK_IO_FETCH_REQ, ioCmdSize)
	UBLK_U_IO_COMMIT_AND_FETCH_REQ = _IOWR('u', UBLK_IO_COMMIT_AND_FETCH_REQ, ioCmdSize)
	UBLK_U_IO_NEED_GET_DATA        = _IOWR('u', UBLK_IO_NEED_GET_DATA, ioCmdSize)
)

// I/O command results and buffer layout (include/uapi/linux/ublk_cmd.h).
const (
	UBLK_IO_RES_OK            = 0
	UBLK_IO_RES_NEED_GET_DATA = 1
	// UBLK_IO_RES_ABORT is -ENODEV: the fetch was cancelled (STOP_DEV or
	// daemon exit); the tag must not be fetched again.
	UBLK_IO_RES_ABORT = -19

	UBLKSRV_CMD_BUF_OFFSET = 0
	UBLKSRV_IO_BUF_OFFSET  = 0x80000000

	UBLK_MAX_QUEUE_DEPTH = 4096
	// UBLKSRV_IO_DESC_SIZE is sizeof(struct ublksrv_io_desc).
	UBLKSRV_IO_DESC_SIZE = 24
	UBLK_MAX_NR_QUEUES   = 4096
	UBLK_IO_BUF_BITS     = 25 // a single I/O buffer is at most 32 MiB

	// USER_COPY's pread/pwrite position: UBLKSRV_IO_BUF_OFFSET +
	// (qid << UBLK_QID_OFF) + (tag << UBLK_TAG_OFF) + byte offset.
	UBLK_TAG_OFF  = UBLK_IO_BUF_BITS
	UBLK_TAG_BITS = 16
	UBLK_QID_OFF  = UBLK_TAG_OFF + UBLK_TAG_BITS
	UBLK_QID_BITS = 12
)

// UserCopyPos is the /dev/ublkcN file position of byte off of the request
// of queue qid, tag tag, for pread and pwrite with UBLK_F_USER_COPY
// (ublk_pos_to_hwq, ublk_pos_to_tag, ublk_pos_to_buf_off).
func UserCopyPos(qid, tag uint16, off uint32) int64 {
	return UBLKSRV_IO_BUF_OFFSET + int64(qid)<<UBLK_QID_OFF + int64(tag)<<UBLK_TAG_OFF + int64(off)
}

// Feature flags, UBLK_F_* (include/uapi/linux/ublk_cmd.h). The comment says
// which kernel release introduced each.
const (
	UBLK_F_SUPPORT_ZERO_COPY      = 1 << 0  // 6.0
	UBLK_F_URING_CMD_COMP_IN_TASK = 1 << 1  // 6.0
	UBLK_F_NEED_GET_DATA          = 1 << 2  // 6.0
	UBLK_F_USER_RECOVERY          = 1 << 3  // 6.0
	UBLK_F_USER_RECOVERY_REISSUE  = 1 << 4  // 6.0
	UBLK_F_UNPRIVILEGED_DEV       = 1 << 5  // 6.2
	UBLK_F_CMD_IOCTL_ENCODE       = 1 << 6  // 6.2
	UBLK_F_USER_COPY              = 1 << 7  // 6.4
	UBLK_F_ZONED                  = 1 << 8  // 6.6
	UBLK_F_USER_RECOVERY_FAIL_IO  = 1 << 9  // 6.13
	UBLK_F_UPDATE_SIZE            = 1 << 10 // 6.16
	UBLK_F_AUTO_BUF_REG           = 1 << 11 // 6.16
	UBLK_F_QUIESCE                = 1 << 12 // 6.16
	UBLK_F_PER_IO_DAEMON          = 1 << 13 // 6.16
	UBLK_F_BUF_REG_OFF_DAEMON     = 1 << 14 // 6.16
	UBLK_F_BATCH_IO               = 1 << 15 // 7.0
	UBLK_F_INTEGRITY              = 1 << 16
	UBLK_F_SAFE_STOP_DEV          = 1 << 17
	UBLK_F_NO_AUTO_PART_SCAN      = 1 << 18
	UBLK_F_SHMEM_ZC               = 1 << 19
)

// Device states, UBLK_S_DEV_* (include/uapi/linux/ublk_cmd.h).
const (
	UBLK_S_DEV_DEAD     = 0
	UBLK_S_DEV_LIVE     = 1
	UBLK_S_DEV_QUIESCED = 2
	UBLK_S_DEV_FAIL_IO  = 3
)

// I/O operations and flags in ublksrv_io_desc.op_flags
// (include/uapi/linux/ublk_cmd.h).
const (
	UBLK_IO_OP_READ         = 0
	UBLK_IO_OP_WRITE        = 1
	UBLK_IO_OP_FLUSH        = 2
	UBLK_IO_OP_DISCARD      = 3
	UBLK_IO_OP_WRITE_SAME   = 4
	UBLK_IO_OP_WRITE_ZEROES = 5

	UBLK_IO_F_FAILFAST_DEV       = 1 << 8
	UBLK_IO_F_FAILFAST_TRANSPORT = 1 << 9
	UBLK_IO_F_FAILFAST_DRIVER    = 1 << 10
	UBLK_IO_F_META               = 1 << 11
	UBLK_IO_F_FUA                = 1 << 13
	UBLK_IO_F_NOUNMAP            = 1 << 15
	UBLK_IO_F_SWAP               = 1 << 16
)

// ublk_param_basic.attrs and ublk_params.types (include/uapi/linux/ublk_cmd.h).
const (
	UBLK_ATTR_READ_ONLY      = 1 << 0
	UBLK_ATTR_ROTATIONAL     = 1 << 1
	UBLK_ATTR_VOLATILE_CACHE = 1 << 2
	UBLK_ATTR_FUA            = 1 << 3

	UBLK_PARAM_TYPE_BASIC     = 1 << 0
	UBLK_PARAM_TYPE_DISCARD   = 1 << 1
	UBLK_PARAM_TYPE_DEVT      = 1 << 2
	UBLK_PARAM_TYPE_ZONED     = 1 << 3
	UBLK_PARAM_TYPE_DMA_ALIGN = 1 << 4
	UBLK_PARAM_TYPE_SEGMENT   = 1 << 5
)

// UblksrvCtrlCmd mirrors struct ublksrv_ctrl_cmd
// (include/uapi/linux/ublk_cmd.h), carried inline in a 128-byte SQE.
type UblksrvCtrlCmd struct {
	DevID      uint32
	QueueID    uint16 // 0xffff unless the command is for one queue
	Len        uint16
	Addr       uint64
	Data       [1]uint64
	DevPathLen uint16
	Pad        uint16
	Reserved   uint32
}

// UblksrvCtrlDevInfo mirrors struct ublksrv_ctrl_dev_info
// (include/uapi/linux/ublk_cmd.h).
type UblksrvCtrlDevInfo struct {
	NrHwQueues    uint16
	QueueDepth    uint16
	State         uint16
	Pad0          uint16
	MaxIOBufBytes uint32
	DevID         uint32
	UblksrvPid    int32
	Pad1          uint32
	Flags         uint64
	UblksrvFlags  uint64
	OwnerUID      uint32
	OwnerGID      uint32
	Reserved1     uint64
	Reserved2     uint64
}

// UblksrvIODesc mirrors struct ublksrv_io_desc
// (include/uapi/linux/ublk_cmd.h): the kernel writes one per tag into the
// queue's read-only shared descriptor array.
type UblksrvIODesc struct {
	OpFlags     uint32 // op: bits 0-7, flags: bits 8-31
	NrSectors   uint32 // nr_zones for UBLK_IO_OP_REPORT_ZONES
	StartSector uint64
	Addr        uint64
}

// UblksrvIOCmd mirrors struct ublksrv_io_cmd
// (include/uapi/linux/ublk_cmd.h), carried inline in a 64-byte SQE.
type UblksrvIOCmd struct {
	QID    uint16
	Tag    uint16
	Result int32
	Addr   uint64 // zone_append_lba for zone append commits
}

// UblkParamBasic mirrors struct ublk_param_basic (include/uapi/linux/ublk_cmd.h).
type UblkParamBasic struct {
	Attrs            uint32
	LogicalBsShift   uint8
	PhysicalBsShift  uint8
	IoOptShift       uint8
	IoMinShift       uint8
	MaxSectors       uint32
	ChunkSectors     uint32
	DevSectors       uint64
	VirtBoundaryMask uint64
}

// UblkParamDiscard mirrors struct ublk_param_discard (include/uapi/linux/ublk_cmd.h).
type UblkParamDiscard struct {
	DiscardAlignment      uint32
	DiscardGranularity    uint32
	MaxDiscardSectors     uint32
	MaxWriteZeroesSectors uint32
	MaxDiscardSegments    uint16
	Reserved0             uint16
}

// UblkParamDevt mirrors struct ublk_param_devt (include/uapi/linux/ublk_cmd.h);
// read-only, filled by GET_PARAMS.
type UblkParamDevt struct {
	CharMajor uint32
	CharMinor uint32
	DiskMajor uint32
	DiskMinor uint32
}

// UblkParamZoned mirrors struct ublk_param_zoned (include/uapi/linux/ublk_cmd.h).
type UblkParamZoned struct {
	MaxOpenZones         uint32
	MaxActiveZones       uint32
	MaxZoneAppendSectors uint32
	Reserved             [20]uint8
}

// UblkParams mirrors struct ublk_params (include/uapi/linux/ublk_cmd.h) as of
// 6.12: header, basic, discard, devt, zoned. Newer kernels append members
// (dma, seg, ...); the kernel copies min(len, its sizeof) bytes, so sending
// this shorter layout is what the ABI is designed for.
type UblkParams struct {
	Len     uint32
	Types   uint32
	Basic   UblkParamBasic
	Discard UblkParamDiscard
	Devt    UblkParamDevt
	Zoned   UblkParamZoned
}
