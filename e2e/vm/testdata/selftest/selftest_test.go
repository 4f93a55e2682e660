// Package selftest holds guest tests that the harness's own tests
// (e2e/vm/vm_test.go) run in the VM to prove that it reports them right.
// It lives under testdata so that `go test ./...` never runs it by itself.
package selftest

import (
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
)

func TestGuestPasses(t *testing.T) {
	guest.Require(t)
	if os.Getuid() != 0 {
		t.Fatalf("guest tests run as root, got uid %d", os.Getuid())
	}
	if _, err := os.Stat("/dev/ublk-control"); err != nil {
		t.Fatal(err)
	}
	t.Log("selftest: passing")
}

func TestGuestFailsOnPurpose(t *testing.T) {
	guest.Require(t)
	t.Fatal("selftest: this guest test fails on purpose")
}

func TestGuestSkips(t *testing.T) {
	guest.Require(t)
	t.Skip("selftest: skipped on purpose")
}

func TestGuestPanics(t *testing.T) {
	guest.Require(t)
	var m map[string]int
	m["x"] = 1 // a test binary that dies is a failure, not a pass
}

// TestGuestHangs never returns; the harness must kill the VM at its timeout
// and name this test.
func TestGuestHangs(t *testing.T) {
	guest.Require(t)
	if os.Getenv("SELFTEST_HANG") != "1" {
		t.Skip("SELFTEST_HANG not set")
	}
	time.Sleep(time.Hour)
}

// TestGuestCrashesKernel panics the kernel (sysrq c); the harness must fail
// this test with the console log.
func TestGuestCrashesKernel(t *testing.T) {
	guest.Require(t)
	if os.Getenv("SELFTEST_CRASH") != "1" {
		t.Skip("SELFTEST_CRASH not set")
	}
	if err := os.WriteFile("/proc/sysrq-trigger", []byte("c"), 0); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Minute)
}

// TestGuestDataRace races on purpose; built with Config.Race the race
// detector must fail it.
func TestGuestDataRace(t *testing.T) {
	guest.Require(t)
	if os.Getenv("SELFTEST_RACE") != "1" {
		t.Skip("SELFTEST_RACE not set")
	}
	x := 0
	done := make(chan bool)
	go func() { x++; done <- true }()
	x++
	<-done
	t.Log(x)
}

// TestGuestKernelRelease: the kernel running is the one the harness says it
// booted (E2E_KERNEL_RELEASE, see e2e/vm), and its ublk driver is there.
func TestGuestKernelRelease(t *testing.T) {
	guest.Require(t)
	want := os.Getenv("E2E_KERNEL_RELEASE")
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		t.Fatal(err)
	}
	got := unix.ByteSliceToString(uts.Release[:])
	if want == "" || got != want {
		t.Fatalf("running kernel %q, the harness says %q", got, want)
	}
	if _, err := os.Stat("/dev/ublk-control"); err != nil {
		t.Fatal(err)
	}
	t.Logf("selftest: kernel %s", got)
}

// TestGuestDiesOfTCGFlakeOnce, on the first boot, logs the console line of
// the TCG int3 flake at emergency level and panics the kernel; on any later
// boot it passes. The harness must boot again and run it (only it) there.
func TestGuestDiesOfTCGFlakeOnce(t *testing.T) {
	guest.Require(t)
	if os.Getenv("SELFTEST_FLAKE") != "1" {
		t.Skip("SELFTEST_FLAKE not set")
	}
	if boot := os.Getenv("E2E_BOOT"); boot != "1" {
		t.Logf("selftest: boot %s, passing", boot)
		return
	}
	if err := os.WriteFile("/dev/kmsg", []byte("<0>Oops: int3: 0000 [#1] (written by the harness self-test)\n"), 0); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile("/proc/sysrq-trigger", []byte("c"), 0); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Minute)
}
