package ublk

import (
	"errors"
	"strings"
	"testing"
)

func TestFeaturesString(t *testing.T) {
	cases := []struct {
		f    Features
		want string
	}{
		{0, "0"},
		{FeatureUserRecovery, "USER_RECOVERY"},
		// The feature set of Debian's 6.12 kernel, as GET_FEATURES reports it.
		{0x1fe, "URING_CMD_COMP_IN_TASK|NEED_GET_DATA|USER_RECOVERY|USER_RECOVERY_REISSUE|UNPRIVILEGED_DEV|CMD_IOCTL_ENCODE|USER_COPY|ZONED"},
		{FeatureSupportZeroCopy | 1<<63, "SUPPORT_ZERO_COPY|0x8000000000000000"},
	}
	for _, c := range cases {
		if got := c.f.String(); got != c.want {
			t.Errorf("Features(%#x).String() = %q, want %q", uint64(c.f), got, c.want)
		}
	}
}

func TestFeaturesNames(t *testing.T) {
	if got := Features(0).Names(); got == nil || len(got) != 0 {
		t.Errorf("Features(0).Names() = %#v, want an empty list (JSON [])", got)
	}
	// Debian's 7.3.4 kernel: every named flag, and bit 20, unnamed here.
	got := strings.Join(Features(0x1fffff).Names(), " ")
	want := "SUPPORT_ZERO_COPY URING_CMD_COMP_IN_TASK NEED_GET_DATA USER_RECOVERY USER_RECOVERY_REISSUE " +
		"UNPRIVILEGED_DEV CMD_IOCTL_ENCODE USER_COPY ZONED USER_RECOVERY_FAIL_IO UPDATE_SIZE AUTO_BUF_REG " +
		"QUIESCE PER_IO_DAEMON BUF_REG_OFF_DAEMON BATCH_IO INTEGRITY SAFE_STOP_DEV NO_AUTO_PART_SCAN SHMEM_ZC 0x100000"
	if got != want {
		t.Errorf("Names:\n got %s\nwant %s", got, want)
	}
}

// DataPath names zero copy only for a device that uses AUTO_BUF_REG, and
// otherwise says why the data is copied: not used, or not offered (with
// the release that has it).
func TestDataPath(t *testing.T) {
	const v612, v73 = Features(0x1fe), Features(0x1fffff)
	cases := []struct {
		offered, inUse Features
		want           string
	}{
		{v612, FeatureUserRecovery, "copy (zero copy needs UBLK_F_AUTO_BUF_REG, Linux 6.16)"},
		{v73, FeatureUserRecovery, "copy (the kernel offers AUTO_BUF_REG, not in use)"},
		{v73, FeatureAutoBufReg | FeatureCmdIoctlEncode, "zero copy (AUTO_BUF_REG)"},
	}
	for _, c := range cases {
		if got := DataPath(c.offered, c.inUse); got != c.want {
			t.Errorf("DataPath(%v, %v) = %q, want %q", c.offered, c.inUse, got, c.want)
		}
	}
}

func TestFeaturesHas(t *testing.T) {
	f := FeatureUserRecovery | FeatureCmdIoctlEncode
	if !f.Has(FeatureUserRecovery) || !f.Has(FeatureUserRecovery|FeatureCmdIoctlEncode) {
		t.Error("Has misses set flags")
	}
	if f.Has(FeatureUserRecovery | FeatureZoned) {
		t.Error("Has(set|unset) = true")
	}
}

func TestFeatureError(t *testing.T) {
	err := missing(FeatureUserRecoveryFailIO)
	if !errors.Is(err, ErrNotSupported) {
		t.Errorf("%v does not match ErrNotSupported", err)
	}
	if msg := err.Error(); !strings.Contains(msg, "UBLK_F_USER_RECOVERY_FAIL_IO") || !strings.Contains(msg, "6.13") {
		t.Errorf("error %q does not name the feature and the kernel release", msg)
	}
}
