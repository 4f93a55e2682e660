package uapi

import (
	"testing"
	"unsafe"
)

// Sizes and offsets below are the C layouts of include/uapi/linux/io_uring.h
// and include/uapi/linux/ublk_cmd.h on LP64 (x86_64, arm64).
func TestStructLayout(t *testing.T) {
	var (
		p   IoUringParams
		sqe IoUringSqe
		cc  UblksrvCtrlCmd
		di  UblksrvCtrlDevInfo
		d   UblksrvIODesc
		ic  UblksrvIOCmd
		up  UblkParams
	)
	cases := []struct {
		name      string
		got, want uintptr
	}{
		{"sizeof(io_sqring_offsets)", unsafe.Sizeof(IoSqringOffsets{}), 40},
		{"sizeof(io_cqring_offsets)", unsafe.Sizeof(IoCqringOffsets{}), 40},
		{"sizeof(io_uring_params)", unsafe.Sizeof(p), 120},
		{"offsetof(io_uring_params, sq_off)", unsafe.Offsetof(p.SqOff), 40},
		{"offsetof(io_uring_params, cq_off)", unsafe.Offsetof(p.CqOff), 80},
		{"sizeof(io_uring_sqe)", unsafe.Sizeof(sqe), SQESize},
		{"offsetof(io_uring_sqe, fd)", unsafe.Offsetof(sqe.Fd), 4},
		{"offsetof(io_uring_sqe, off)", unsafe.Offsetof(sqe.Off), 8},
		{"offsetof(io_uring_sqe, addr)", unsafe.Offsetof(sqe.Addr), 16},
		{"offsetof(io_uring_sqe, len)", unsafe.Offsetof(sqe.Len), 24},
		{"offsetof(io_uring_sqe, rw_flags)", unsafe.Offsetof(sqe.OpFlags), 28},
		{"offsetof(io_uring_sqe, user_data)", unsafe.Offsetof(sqe.UserData), 32},
		{"offsetof(io_uring_sqe, buf_index)", unsafe.Offsetof(sqe.BufIndex), 40},
		{"offsetof(io_uring_sqe, addr3) == cmd", unsafe.Offsetof(sqe.Addr3), SQECmdOffset},
		{"sizeof(io_uring_cqe)", unsafe.Sizeof(IoUringCqe{}), CQESize},
		{"sizeof(ublksrv_ctrl_cmd)", unsafe.Sizeof(cc), ctrlCmdSize},
		{"offsetof(ublksrv_ctrl_cmd, addr)", unsafe.Offsetof(cc.Addr), 8},
		{"offsetof(ublksrv_ctrl_cmd, data)", unsafe.Offsetof(cc.Data), 16},
		{"offsetof(ublksrv_ctrl_cmd, dev_path_len)", unsafe.Offsetof(cc.DevPathLen), 24},
		{"sizeof(ublksrv_ctrl_dev_info)", unsafe.Sizeof(di), 64},
		{"offsetof(ublksrv_ctrl_dev_info, max_io_buf_bytes)", unsafe.Offsetof(di.MaxIOBufBytes), 8},
		{"offsetof(ublksrv_ctrl_dev_info, dev_id)", unsafe.Offsetof(di.DevID), 12},
		{"offsetof(ublksrv_ctrl_dev_info, ublksrv_pid)", unsafe.Offsetof(di.UblksrvPid), 16},
		{"offsetof(ublksrv_ctrl_dev_info, flags)", unsafe.Offsetof(di.Flags), 24},
		{"offsetof(ublksrv_ctrl_dev_info, owner_uid)", unsafe.Offsetof(di.OwnerUID), 40},
		{"sizeof(ublksrv_io_desc)", unsafe.Sizeof(d), 24},
		{"offsetof(ublksrv_io_desc, start_sector)", unsafe.Offsetof(d.StartSector), 8},
		{"offsetof(ublksrv_io_desc, addr)", unsafe.Offsetof(d.Addr), 16},
		{"sizeof(ublksrv_io_cmd)", unsafe.Sizeof(ic), ioCmdSize},
		{"offsetof(ublksrv_io_cmd, result)", unsafe.Offsetof(ic.Result), 4},
		{"offsetof(ublksrv_io_cmd, addr)", unsafe.Offsetof(ic.Addr), 8},
		{"sizeof(ublk_param_basic)", unsafe.Sizeof(UblkParamBasic{}), 32},
		{"sizeof(ublk_param_discard)", unsafe.Sizeof(UblkParamDiscard{}), 20},
		{"sizeof(ublk_param_devt)", unsafe.Sizeof(UblkParamDevt{}), 16},
		{"sizeof(ublk_param_zoned)", unsafe.Sizeof(UblkParamZoned{}), 32},
		{"offsetof(ublk_params, basic)", unsafe.Offsetof(up.Basic), 8},
		{"offsetof(ublk_params, discard)", unsafe.Offsetof(up.Discard), 40},
		{"offsetof(ublk_params, devt)", unsafe.Offsetof(up.Devt), 60},
		{"offsetof(ublk_params, zoned)", unsafe.Offsetof(up.Zoned), 76},
		{"sizeof(ublk_params) (6.12)", unsafe.Sizeof(up), 112},
	}
	for _, c := range cases {
		if c.got != c.want {
			t.Errorf("%s = %d, want %d", c.name, c.got, c.want)
		}
	}
}

// The encodings are the values the C macros produce (checked against
// ublksrv and the kernel selftests, which hard-code some of them).
func TestOpcodeEncoding(t *testing.T) {
	cases := []struct {
		name      string
		got, want uint32
	}{
		{"UBLK_U_CMD_GET_DEV_INFO", UBLK_U_CMD_GET_DEV_INFO, 0x80207502},
		{"UBLK_U_CMD_ADD_DEV", UBLK_U_CMD_ADD_DEV, 0xc0207504},
		{"UBLK_U_CMD_DEL_DEV", UBLK_U_CMD_DEL_DEV, 0xc0207505},
		{"UBLK_U_CMD_START_DEV", UBLK_U_CMD_START_DEV, 0xc0207506},
		{"UBLK_U_CMD_STOP_DEV", UBLK_U_CMD_STOP_DEV, 0xc0207507},
		{"UBLK_U_CMD_SET_PARAMS", UBLK_U_CMD_SET_PARAMS, 0xc0207508},
		{"UBLK_U_CMD_GET_PARAMS", UBLK_U_CMD_GET_PARAMS, 0x80207509},
		{"UBLK_U_CMD_START_USER_RECOVERY", UBLK_U_CMD_START_USER_RECOVERY, 0xc0207510},
		{"UBLK_U_CMD_END_USER_RECOVERY", UBLK_U_CMD_END_USER_RECOVERY, 0xc0207511},
		{"UBLK_U_CMD_GET_FEATURES", UBLK_U_CMD_GET_FEATURES, 0x80207513},
		{"UBLK_U_CMD_UPDATE_SIZE", UBLK_U_CMD_UPDATE_SIZE, 0xc0207515},
		{"UBLK_U_IO_FETCH_REQ", UBLK_U_IO_FETCH_REQ, 0xc0107520},
		{"UBLK_U_IO_COMMIT_AND_FETCH_REQ", UBLK_U_IO_COMMIT_AND_FETCH_REQ, 0xc0107521},
		{"UBLK_U_IO_NEED_GET_DATA", UBLK_U_IO_NEED_GET_DATA, 0xc0107522},
	}
	for _, c := range cases {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
	// The legacy opcode is the ioctl number: what the driver's
	// _IOC_NR(cmd_op) switch dispatches on.
	if IOCNr(UBLK_U_CMD_ADD_DEV) != UBLK_CMD_ADD_DEV || IOCNr(UBLK_U_IO_COMMIT_AND_FETCH_REQ) != UBLK_IO_COMMIT_AND_FETCH_REQ {
		t.Error("IOCNr does not recover the legacy opcode")
	}
}

// The zero-copy ABI: io_uring_rsrc_register's C layout, the two buffer
// registration opcodes' encodings, and ublk_auto_buf_reg_to_sqe_addr.
func TestZeroCopyABI(t *testing.T) {
	var rr IoUringRsrcRegister
	if unsafe.Sizeof(rr) != 32 || unsafe.Offsetof(rr.Data) != 16 || unsafe.Offsetof(rr.Tags) != 24 {
		t.Errorf("io_uring_rsrc_register: size %d, data at %d, tags at %d; want 32, 16, 24",
			unsafe.Sizeof(rr), unsafe.Offsetof(rr.Data), unsafe.Offsetof(rr.Tags))
	}
	if unsafe.Sizeof(UblkAutoBufReg{}) != 8 {
		t.Errorf("sizeof(ublk_auto_buf_reg) = %d, want 8", unsafe.Sizeof(UblkAutoBufReg{}))
	}
	if UBLK_U_IO_REGISTER_IO_BUF != 0xc0107523 || UBLK_U_IO_UNREGISTER_IO_BUF != 0xc0107524 {
		t.Errorf("UBLK_U_IO_(UN)REGISTER_IO_BUF = %#x, %#x", UBLK_U_IO_REGISTER_IO_BUF, UBLK_U_IO_UNREGISTER_IO_BUF)
	}
	b := UblkAutoBufReg{Index: 0x1234, Flags: UBLK_AUTO_BUF_REG_FALLBACK, Reserved0: 0x56, Reserved1: 0x789abcde}
	if got, want := b.SQEAddr(), uint64(0x789abcde_56_01_1234); got != want {
		t.Errorf("SQEAddr = %#x, want %#x", got, want)
	}
}

// Provided buffer rings: struct io_uring_buf_reg and struct io_uring_buf
// as the kernel lays them out, the tail overlaying the first entry's resv.
func TestBufRingABI(t *testing.T) {
	var reg IoUringBufReg
	var buf IoUringBuf
	for _, c := range []struct {
		what      string
		got, want uintptr
	}{
		{"sizeof(io_uring_buf_reg)", unsafe.Sizeof(reg), 40},
		{"offsetof(io_uring_buf_reg, ring_entries)", unsafe.Offsetof(reg.RingEntries), 8},
		{"offsetof(io_uring_buf_reg, bgid)", unsafe.Offsetof(reg.Bgid), 12},
		{"offsetof(io_uring_buf_reg, flags)", unsafe.Offsetof(reg.Flags), 14},
		{"sizeof(io_uring_buf)", unsafe.Sizeof(buf), 16},
		{"offsetof(io_uring_buf, bid)", unsafe.Offsetof(buf.Bid), 12},
		{"offsetof(io_uring_buf_ring, tail)", unsafe.Offsetof(buf.Resv), IoUringBufRingTailOffset},
	} {
		if c.got != c.want {
			t.Errorf("%s = %d, want %d", c.what, c.got, c.want)
		}
	}
}

// The batch ABI: ublk_batch_io and ublk_elem_header as the kernel lays
// them out, the three commands' encodings, and the element sizes
// ublk_check_batch_cmd_flags requires.
func TestBatchABI(t *testing.T) {
	var b UblkBatchIO
	var e UblkElemHeader
	if unsafe.Sizeof(b) != ublkBatchIOSize || unsafe.Offsetof(b.NrElem) != 4 || unsafe.Offsetof(b.ElemBytes) != 6 || unsafe.Offsetof(b.Reserved2) != 8 {
		t.Errorf("ublk_batch_io: size %d, nr_elem at %d, elem_bytes at %d, reserved2 at %d; want 16, 4, 6, 8",
			unsafe.Sizeof(b), unsafe.Offsetof(b.NrElem), unsafe.Offsetof(b.ElemBytes), unsafe.Offsetof(b.Reserved2))
	}
	if unsafe.Sizeof(e) != 8 || unsafe.Offsetof(e.BufIndex) != 2 || unsafe.Offsetof(e.Result) != 4 {
		t.Errorf("ublk_elem_header: size %d, buf_index at %d, result at %d; want 8, 2, 4",
			unsafe.Sizeof(e), unsafe.Offsetof(e.BufIndex), unsafe.Offsetof(e.Result))
	}
	if UBLK_U_IO_PREP_IO_CMDS != 0xc0107525 || UBLK_U_IO_COMMIT_IO_CMDS != 0xc0107526 || UBLK_U_IO_FETCH_IO_CMDS != 0xc0107527 {
		t.Errorf("batch opcodes %#x %#x %#x", UBLK_U_IO_PREP_IO_CMDS, UBLK_U_IO_COMMIT_IO_CMDS, UBLK_U_IO_FETCH_IO_CMDS)
	}
	for flags, want := range map[uint16]int{0: 8, UBLK_BATCH_F_HAS_BUF_ADDR: 16, UBLK_BATCH_F_HAS_BUF_ADDR | UBLK_BATCH_F_HAS_ZONE_LBA: 24, UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK: 8} {
		if got := UblkBatchElemBytes(flags); got != want {
			t.Errorf("UblkBatchElemBytes(%#x) = %d, want %d", flags, got, want)
		}
	}
}
