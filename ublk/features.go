package ublk

import (
	"fmt"
	"math/bits"
	"strings"

	"github.com/ublk-nvmeof/ublk-nvmeof/ublk/internal/uapi"
)

// Features is the ublk driver's feature mask (UBLK_F_*), as reported by
// UBLK_U_CMD_GET_FEATURES or stored in a device's flags.
type Features uint64

// Feature flags, one per UBLK_F_* of include/uapi/linux/ublk_cmd.h.
const (
	FeatureSupportZeroCopy     Features = uapi.UBLK_F_SUPPORT_ZERO_COPY
	FeatureURingCmdCompInTask  Features = uapi.UBLK_F_URING_CMD_COMP_IN_TASK
	FeatureNeedGetData         Features = uapi.UBLK_F_NEED_GET_DATA
	FeatureUserRecovery        Features = uapi.UBLK_F_USER_RECOVERY
	FeatureUserRecoveryReissue Features = uapi.UBLK_F_USER_RECOVERY_REISSUE
	FeatureUnprivilegedDev     Features = uapi.UBLK_F_UNPRIVILEGED_DEV
	FeatureCmdIoctlEncode      Features = uapi.UBLK_F_CMD_IOCTL_ENCODE
	FeatureUserCopy            Features = uapi.UBLK_F_USER_COPY
	FeatureZoned               Features = uapi.UBLK_F_ZONED
	FeatureUserRecoveryFailIO  Features = uapi.UBLK_F_USER_RECOVERY_FAIL_IO
	FeatureUpdateSize          Features = uapi.UBLK_F_UPDATE_SIZE
	FeatureAutoBufReg          Features = uapi.UBLK_F_AUTO_BUF_REG
	FeatureQuiesce             Features = uapi.UBLK_F_QUIESCE
	FeaturePerIODaemon         Features = uapi.UBLK_F_PER_IO_DAEMON
	FeatureBufRegOffDaemon     Features = uapi.UBLK_F_BUF_REG_OFF_DAEMON
	FeatureBatchIO             Features = uapi.UBLK_F_BATCH_IO
	FeatureIntegrity           Features = uapi.UBLK_F_INTEGRITY
	FeatureSafeStopDev         Features = uapi.UBLK_F_SAFE_STOP_DEV
	FeatureNoAutoPartScan      Features = uapi.UBLK_F_NO_AUTO_PART_SCAN
	FeatureShmemZeroCopy       Features = uapi.UBLK_F_SHMEM_ZC
)

type featureInfo struct {
	name  string // the UBLK_F_ suffix, verbatim
	since string // first mainline release that has it; "" where not pinned down
}

// featureTable is indexed by bit number.
var featureTable = [...]featureInfo{
	{"SUPPORT_ZERO_COPY", "6.15"},
	{"URING_CMD_COMP_IN_TASK", "6.0"},
	{"NEED_GET_DATA", "6.0"},
	{"USER_RECOVERY", "6.0"},
	{"USER_RECOVERY_REISSUE", "6.0"},
	{"UNPRIVILEGED_DEV", "6.2"},
	{"CMD_IOCTL_ENCODE", "6.2"},
	{"USER_COPY", "6.4"},
	{"ZONED", "6.6"},
	{"USER_RECOVERY_FAIL_IO", "6.13"},
	{"UPDATE_SIZE", "6.16"}, // 98b995660bff, merged for 6.16
	{"AUTO_BUF_REG", "6.16"},
	{"QUIESCE", "6.16"},
	{"PER_IO_DAEMON", ""},
	{"BUF_REG_OFF_DAEMON", ""},
	{"BATCH_IO", "7.0"}, // "ublk: add UBLK_F_BATCH_IO" series, block tree 2026-01-22, after 6.19
	{"INTEGRITY", ""},
	{"SAFE_STOP_DEV", ""},
	{"NO_AUTO_PART_SCAN", ""},
	{"SHMEM_ZC", ""},
}

// DataPath says for status displays how a device's data moves, given the
// features the kernel offers and the flags the device uses: "zero copy"
// when it uses UBLK_F_AUTO_BUF_REG, otherwise "copy" and why.
func DataPath(offered, inUse Features) string {
	switch {
	case inUse.Has(FeatureAutoBufReg):
		return "zero copy (AUTO_BUF_REG)"
	case offered.Has(FeatureAutoBufReg):
		return "copy (the kernel offers AUTO_BUF_REG, not in use)"
	}
	return "copy (zero copy needs UBLK_F_AUTO_BUF_REG, Linux " + FeatureAutoBufReg.since() + ")"
}

// Has reports whether every flag of x is set in f.
func (f Features) Has(x Features) bool { return f&x == x }

// String lists the set flags by their kernel names without the UBLK_F_
// prefix, joined by "|"; unknown bits are shown as hex.
func (f Features) String() string {
	if f == 0 {
		return "0"
	}
	return strings.Join(f.Names(), "|")
}

// Names lists the set flags by their kernel names without the UBLK_F_
// prefix, lowest bit first; unknown bits come last, together, as hex.
func (f Features) Names() []string {
	names := []string{}
	var unknown Features
	for rest := f; rest != 0; rest &= rest - 1 {
		bit := bits.TrailingZeros64(uint64(rest))
		if bit < len(featureTable) {
			names = append(names, featureTable[bit].name)
		} else {
			unknown |= 1 << bit
		}
	}
	if unknown != 0 {
		names = append(names, fmt.Sprintf("%#x", uint64(unknown)))
	}
	return names
}

// since returns the kernel release that introduced the lowest flag of f, or
// "" if unknown.
func (f Features) since() string {
	if f == 0 {
		return ""
	}
	bit := bits.TrailingZeros64(uint64(f))
	if bit < len(featureTable) {
		return featureTable[bit].since
	}
	return ""
}
