package ublk

import (
	"errors"
	"fmt"
)

// ErrNotLoaded means /dev/ublk-control does not exist: the ublk_drv module
// is not loaded (or the kernel lacks CONFIG_BLK_DEV_UBLK).
var ErrNotLoaded = errors.New("ublk_drv not loaded (modprobe ublk_drv)")

// ErrNotSupported is wrapped by every error about a kernel that lacks a
// ublk or io_uring feature. Use errors.As with *FeatureError for details.
var ErrNotSupported = errors.New("not supported by this kernel")

// ErrTimeout is wrapped when a control command did not complete before its
// deadline: the kernel call is reported stuck instead of hanging the caller.
var ErrTimeout = errors.New("ublk control command timed out")

// FeatureError names a missing kernel feature and the release that brought
// it. It matches ErrNotSupported with errors.Is.
type FeatureError struct {
	Feature string // e.g. "UBLK_F_USER_RECOVERY" or "UBLK_U_CMD_GET_FEATURES"
	Since   string // first kernel release with it, e.g. "6.0"
}

func (e *FeatureError) Error() string {
	if e.Since == "" {
		return fmt.Sprintf("ublk: %s not supported by this kernel", e.Feature)
	}
	return fmt.Sprintf("ublk: %s not supported by this kernel (needs Linux %s or newer)", e.Feature, e.Since)
}

func (e *FeatureError) Is(target error) bool { return target == ErrNotSupported }

// missing returns a FeatureError for the lowest flag of f.
func missing(f Features) error {
	return &FeatureError{Feature: "UBLK_F_" + f.String(), Since: f.since()}
}
