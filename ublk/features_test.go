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
