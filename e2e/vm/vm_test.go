package vm

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/vm/internal/guestproto"
)

const selftestPkg = "./e2e/vm/testdata/selftest"

func byName(res *Result) map[string]TestResult {
	m := map[string]TestResult{}
	for _, tr := range res.Tests {
		m[tr.Name] = tr
	}
	return m
}

// TestHarnessReportsGuestResults boots the VM with tests that pass, fail on
// purpose, skip and panic, and checks that each comes back as it should.
func TestHarnessReportsGuestResults(t *testing.T) {
	Require(t)
	res, err := Run(t.Context(), Config{Packages: []string{selftestPkg}, Timeout: 5 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	if !res.Done {
		t.Fatalf("VM did not finish: timed out=%v\n%s", res.TimedOut, res.ConsoleTail(40))
	}
	if strings.Contains(res.Boot, "setup errors") {
		t.Errorf("guest setup: %s", res.Boot)
	}
	want := map[string]string{
		"TestGuestPasses":         guestproto.StatusPass,
		"TestGuestFailsOnPurpose": guestproto.StatusFail,
		"TestGuestSkips":          guestproto.StatusSkip,
		"TestGuestPanics":         guestproto.StatusFail,
		"TestGuestHangs":          guestproto.StatusSkip,
		"TestGuestCrashesKernel":  guestproto.StatusSkip,
	}
	got := byName(res)
	for name, status := range want {
		tr, ok := got[name]
		if !ok {
			t.Errorf("%s: no result", name)
			continue
		}
		if tr.Status != status {
			t.Errorf("%s: status %s, want %s\n%s", name, tr.Status, status, tr.Output)
		}
		if tr.Package != "e2e/vm/testdata/selftest" {
			t.Errorf("%s: package %q", name, tr.Package)
		}
	}
	if !strings.Contains(got["TestGuestFailsOnPurpose"].Output, "fails on purpose") {
		t.Errorf("failure output not carried back: %q", got["TestGuestFailsOnPurpose"].Output)
	}
	if !res.Failed() {
		t.Error("Result.Failed() is false with a failing guest test")
	}
}

// TestHarnessKillsHungVM: a guest test that never returns (and a per-test
// timeout longer than the VM's) makes Run kill QEMU and name the test.
func TestHarnessKillsHungVM(t *testing.T) {
	Require(t)
	res, err := Run(t.Context(), Config{
		Packages:    []string{selftestPkg},
		Run:         "^TestGuestHangs$",
		Env:         []string{"SELFTEST_HANG=1"},
		TestTimeout: time.Hour,
		Timeout:     30 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	if !res.TimedOut || res.Done {
		t.Fatalf("timed out=%v done=%v, want a VM killed at its timeout", res.TimedOut, res.Done)
	}
	if res.Running != "e2e/vm/testdata/selftest.TestGuestHangs" {
		t.Errorf("running test %q, want the hanging one", res.Running)
	}
	if !res.Failed() {
		t.Error("Result.Failed() is false for a hung VM")
	}
}

// TestHarnessReportsKernelCrash: a kernel panic during a test stops the VM;
// the test is named and the console has the panic. It is not the TCG int3
// flake, so RunRebooting does not boot again.
func TestHarnessReportsKernelCrash(t *testing.T) {
	Require(t)
	res, err := RunRebooting(t.Context(), Config{
		Packages: []string{selftestPkg},
		Run:      "^TestGuestCrashesKernel$",
		Env:      []string{"SELFTEST_CRASH=1"},
		Timeout:  3 * time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.Done || res.TimedOut {
		t.Fatalf("done=%v timed out=%v, want a VM that died", res.Done, res.TimedOut)
	}
	if res.Running != "e2e/vm/testdata/selftest.TestGuestCrashesKernel" {
		t.Errorf("running test %q", res.Running)
	}
	if !strings.Contains(res.Console, "Kernel panic") {
		t.Errorf("console has no kernel panic:\n%s", res.ConsoleTail(30))
	}
	if len(res.Reboots) != 0 {
		t.Errorf("booted again after a panic that is not the TCG flake: %+v", res.Reboots)
	}
}

// TestHarnessRebootsAfterTCGFlake: a guest kernel that dies with the TCG
// int3 flake's console line is booted again; the test it died in runs
// again and passes there, the test that had passed is not run twice.
func TestHarnessRebootsAfterTCGFlake(t *testing.T) {
	Require(t)
	if acc, _ := accel(); acc != "tcg" {
		t.Skipf("the flake is only recognised under TCG, not %s", acc)
	}
	res, err := RunRebooting(t.Context(), Config{
		Packages: []string{selftestPkg},
		Run:      "^TestGuest(Passes|DiesOfTCGFlakeOnce)$",
		Env:      []string{"SELFTEST_FLAKE=1"},
		Timeout:  3 * time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	if !res.Done {
		t.Fatalf("done=%v timed out=%v after the reboot\n%s", res.Done, res.TimedOut, res.ConsoleTail(30))
	}
	const died = "e2e/vm/testdata/selftest.TestGuestDiesOfTCGFlakeOnce"
	if len(res.Reboots) != 1 || res.Reboots[0].Running != died || !strings.Contains(res.Reboots[0].Console, "Oops: int3") {
		t.Fatalf("reboots %+v, want one, during %s, with the oops", res.Reboots, died)
	}
	var got []string
	for _, tr := range res.Tests {
		got = append(got, tr.Name+" "+tr.Status)
	}
	want := "TestGuestPasses PASS, TestGuestDiesOfTCGFlakeOnce PASS"
	if strings.Join(got, ", ") != want {
		t.Errorf("tests %q, want %q", strings.Join(got, ", "), want)
	}
	if !strings.Contains(res.Tests[1].Output, "boot 2, passing") {
		t.Errorf("the rerun did not see E2E_BOOT=2:\n%s", res.Tests[1].Output)
	}
}

// TestHarnessKillsHungBoot: a guest that does not report within the boot
// timeout is killed and booted again, at most twice; then the Result says
// the boot hung (not the whole VM's timeout).
func TestHarnessKillsHungBoot(t *testing.T) {
	Require(t)
	start := time.Now()
	res, err := RunRebooting(t.Context(), Config{
		Packages:    []string{selftestPkg},
		Run:         "^TestGuestPasses$",
		BootTimeout: 2 * time.Second, // a boot takes 5 s or more under TCG
		Timeout:     time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	if !res.BootHung || res.Done || res.TimedOut || len(res.Tests) != 0 {
		t.Fatalf("boot hung=%v done=%v timed out=%v tests=%d, want a hung boot", res.BootHung, res.Done, res.TimedOut, len(res.Tests))
	}
	if len(res.Reboots) != flakeReboots || !strings.Contains(res.Reboots[0].Why, "hung") {
		t.Errorf("reboots %+v, want %d for a hung boot", res.Reboots, flakeReboots)
	}
	if el := time.Since(start); el > 50*time.Second {
		t.Errorf("three 2 s boots took %v: the boot timeout did not kill them", el)
	}
}

func TestEndedTestsAndFlakeMatch(t *testing.T) {
	got := endedTests([]TestResult{{Package: "a", Name: "TestX"}, {Package: "b/c", Name: "TestY"}, {Package: "a", Name: "TestZ"}})
	if strings.Join(got["a"], " ") != "TestX TestZ" || strings.Join(got["b/c"], " ") != "TestY" || len(got) != 2 {
		t.Errorf("endedTests: %v", got)
	}
	for console, want := range map[string]bool{
		"[  812.1] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n[  812.1] RIP: 0010:kmem_cache_alloc_noprof+0x5/0x2c0": true,
		"[   12.0] Oops: general protection fault, probably for non-canonical address":                             false,
		"[   12.0] Kernel panic - not syncing: sysrq triggered crash":                                              false,
		"[   12.0] Oops: int32_overflow":                                                                           false,
	} {
		if tcgFlake.MatchString(console) != want {
			t.Errorf("tcgFlake on %q: %v, want %v", console, !want, want)
		}
	}
	console := "a\nb [ 1.0] Oops: int3: 0000 [#1]\nc\nd\ne"
	if got := oopsLines(console, 2); got != "b [ 1.0] Oops: int3: 0000 [#1]\nc" {
		t.Errorf("oopsLines: %q", got)
	}
}

func TestComplaintPatterns(t *testing.T) {
	for _, msg := range []string{
		"WARNING: CPU: 1 PID: 42 at drivers/block/ublk_drv.c:1234 ublk_ch_release+0x12/0x30 [ublk_drv]",
		"BUG: kernel NULL pointer dereference, address: 0000000000000008",
		"Oops: general protection fault, probably for non-canonical address 0xdead000000000100: 0000 [#1] PREEMPT SMP NOPTI",
		"INFO: task kworker/u4:1:57 blocked for more than 30 seconds.",
		"BUG: KASAN: slab-use-after-free in blk_mq_run_hw_queue+0x1a/0x2b0",
		"kernel BUG at block/blk-mq.c:1000!",
		"watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [kworker/0:1:12]",
		"rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
	} {
		if !guestproto.IsComplaint(msg) {
			t.Errorf("not a complaint: %q", msg)
		}
	}
	for _, msg := range []string{
		"nvmet: creating nvm controller 1 for subsystem nqn.x for NQN nqn.2014-08.org.nvmexpress:uuid:1.",
		"nvme nvme0: new ctrl: NQN \"nqn.x\", addr 127.0.0.1:4420",
		"ublk: ublk dev 0 is stopped", "EXT4-fs (ublkb0): mounted filesystem",
	} {
		if guestproto.IsComplaint(msg) {
			t.Errorf("false complaint: %q", msg)
		}
	}
}

func TestParseKmsg(t *testing.T) {
	r, ok := guestproto.ParseKmsg("4,160,5224321,-,caller=T1;WARNING: CPU: 0 PID: 1 at x\n SUBSYSTEM=block\n")
	if !ok || r.Facility != 0 || r.Level != 4 || r.Seq != 160 || r.Micros != 5224321 || r.Message != "WARNING: CPU: 0 PID: 1 at x" {
		t.Fatalf("got %+v ok=%v", r, ok)
	}
	// A line a user wrote to /dev/kmsg carries facility 1 (LOG_USER).
	r, ok = guestproto.ParseKmsg("12,161,5224400,-;WARNING: fake")
	if !ok || r.Facility != 1 {
		t.Fatalf("user record: %+v ok=%v", r, ok)
	}
	for _, bad := range []string{"", "no semicolon", "x,1,2,-;m", "4,1;m", "-8,1,2,-;m"} {
		if _, ok := guestproto.ParseKmsg(bad); ok {
			t.Errorf("accepted %q", bad)
		}
	}
}

// TestCPIOReadableByCpio checks the initramfs format against GNU cpio when
// the host has it.
func TestCPIOReadableByCpio(t *testing.T) {
	cpio, err := exec.LookPath("cpio")
	if err != nil {
		t.Skip("cpio not installed; it is only the oracle for this test")
	}
	var buf bytes.Buffer
	c := newCPIOWriter(&buf)
	c.Bytes("a/b/c.txt", 0o644, []byte("hello"))
	c.Bytes("odd", 0o755, []byte("123"))
	c.Symlink("bin/sh", "busybox")
	c.Dir("empty/dir")
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(cpio, "-i", "-t", "--quiet")
	cmd.Stdin = bytes.NewReader(buf.Bytes())
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("cpio -t: %v\n%s", err, out)
	}
	got := strings.Fields(string(out))
	want := []string{"a", "a/b", "a/b/c.txt", "odd", "bin", "bin/sh", "empty", "empty/dir"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("cpio lists %v, want %v", got, want)
	}
	dir := t.TempDir()
	cmd = exec.Command(cpio, "-i", "-d", "--quiet")
	cmd.Dir = dir
	cmd.Stdin = bytes.NewReader(buf.Bytes())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio -i: %v\n%s", err, out)
	}
	for name, want := range map[string]string{"a/b/c.txt": "hello", "odd": "123"} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil || string(b) != want {
			t.Errorf("%s: %q, %v; want %q", name, b, err, want)
		}
	}
	if target, err := os.Readlink(filepath.Join(dir, "bin/sh")); err != nil || target != "busybox" {
		t.Errorf("bin/sh -> %q, %v", target, err)
	}
}

// TestHarnessRaceDetector: with Config.Race the guest binaries carry the
// race detector, and a data race fails the guest test.
func TestHarnessRaceDetector(t *testing.T) {
	Require(t)
	res, err := Run(t.Context(), Config{
		Packages: []string{selftestPkg},
		Run:      "^TestGuest(DataRace|Passes)$",
		Env:      []string{"SELFTEST_RACE=1"},
		Race:     true,
		Timeout:  3 * time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	got := byName(res)
	if !res.Done {
		t.Fatalf("VM did not finish:\n%s", res.ConsoleTail(30))
	}
	if tr := got["TestGuestPasses"]; tr.Status != guestproto.StatusPass {
		t.Errorf("TestGuestPasses under -race: %s\n%s", tr.Status, tr.Output)
	}
	tr := got["TestGuestDataRace"]
	if tr.Status != guestproto.StatusFail || !strings.Contains(tr.Output, "WARNING: DATA RACE") {
		t.Errorf("TestGuestDataRace: %s, want a failure by the race detector\n%s", tr.Status, tr.Output)
	}
}
