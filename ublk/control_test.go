package ublk

import (
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
)

func TestOpenControlMissing(t *testing.T) {
	if _, err := os.Stat(ControlPath); err == nil {
		t.Skipf("%s exists here; the missing-driver path cannot be exercised", ControlPath)
	}
	_, err := OpenControl()
	if !errors.Is(err, ErrNotLoaded) {
		t.Fatalf("OpenControl() = %v, want ErrNotLoaded", err)
	}
	if !strings.Contains(err.Error(), "ublk_drv not loaded (modprobe ublk_drv)") {
		t.Errorf("error %q does not tell how to load the driver", err)
	}
}

func TestGuestGetFeatures(t *testing.T) {
	guest.Require(t)
	if _, err := os.Stat(ControlPath); err != nil {
		t.Fatalf("%s: %v", ControlPath, err)
	}
	c, err := OpenControl()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	f, err := c.Features()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("ublk features %#x: %v", uint64(f), f)
	for _, want := range []Features{FeatureUserRecovery, FeatureCmdIoctlEncode} {
		if !f.Has(want) {
			t.Errorf("features %v lack %v", f, want)
		}
	}
}
