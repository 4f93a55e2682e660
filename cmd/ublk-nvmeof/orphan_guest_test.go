package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ublk-nvmeof/ublk-nvmeof/attach"
	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
)

// TestGuestDetachForceOrphan: a daemon with user recovery is SIGKILLed and
// not restarted; the driver keeps its device (QUIESCED). `list` shows it as
// ORPHANED; `detach --force` refuses a device a live daemon serves and
// deletes the orphan, with its run record; nothing is left. A second
// orphan whose run record was removed is deleted all the same.
func TestGuestDetachForceOrphan(t *testing.T) {
	guest.Require(t)
	runDir := t.TempDir()
	t.Setenv("UBLK_NVMEOF_RUN_DIR", runDir)
	tg := guest.NewTarget(t, guest.TargetOptions{NQN: "nqn.2026-11.io.ublk-nvmeof:orphan", Device: "/dev/ram1", Port: 4461, PortID: 41})
	args := []string{"-a", "127.0.0.1", "-s", "4461", "-n", tg.Opts.NQN, "-i", "2", "--recovery"}

	live := startAttach(t, args...)
	if _, stderr, code := runCLI(t, "detach", "--force", live.device); code != exitServed || !strings.Contains(stderr, "served by a live daemon") {
		t.Fatalf("detach --force of a served device: exit %d %q, want %d", code, stderr, exitServed)
	}
	if _, err := os.Stat(live.device); err != nil {
		t.Fatalf("detach --force removed a served device: %v", err)
	}

	// The crash, and no restart.
	if err := live.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	live.wait(t)
	out, stderr, code := runCLI(t, "list", "--json")
	var all []attach.Status
	if code != 0 || json.Unmarshal([]byte(out), &all) != nil {
		t.Fatalf("list: exit %d %q %s", code, out, stderr)
	}
	if len(all) != 1 || all[0].Device != live.device || all[0].State != attach.StateOrphaned ||
		all[0].UblkState != "QUIESCED" || all[0].NQN != tg.Opts.NQN {
		t.Fatalf("list after the crash: %+v, want %s ORPHANED (QUIESCED)", all, live.device)
	}
	if out, _, _ := runCLI(t, "list"); !strings.Contains(out, "ORPHANED (ublk QUIESCED; detach --force)") {
		t.Fatalf("list's table does not mark the orphan:\n%s", out)
	}
	// Plain detach still says no daemon serves it.
	if _, _, code := runCLI(t, "detach", live.device); code != exitNoDevice {
		t.Fatalf("detach of the orphan without --force: exit %d, want %d", code, exitNoDevice)
	}
	if _, stderr, code := runCLI(t, "detach", "--force", live.device); code != 0 {
		t.Fatalf("detach --force: exit %d %s", code, stderr)
	}
	if devs := ublkDevices(t); len(devs) != 0 {
		t.Fatalf("devices left after detach --force: %v", devs)
	}
	if left, _ := filepath.Glob(filepath.Join(runDir, "ublkb*")); len(left) != 0 {
		t.Fatalf("run files left after detach --force: %v", left)
	}
	if out, _, code := runCLI(t, "list", "--json"); code != 0 || strings.TrimSpace(out) != "[]" {
		t.Fatalf("list after detach --force: exit %d %q", code, out)
	}

	// Again, with the run record gone too.
	second := startAttach(t, args...)
	if err := second.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	second.wait(t)
	if err := os.RemoveAll(runDir); err != nil {
		t.Fatal(err)
	}
	if _, stderr, code := runCLI(t, "detach", "--force", second.device); code != 0 {
		t.Fatalf("detach --force without a run record: exit %d %s", code, stderr)
	}
	if devs := ublkDevices(t); len(devs) != 0 {
		t.Fatalf("devices left after detach --force without a run record: %v", devs)
	}
	if _, stderr, code := runCLI(t, "detach", "--force", second.device); code != exitNoDevice {
		t.Fatalf("detach --force of a device that is gone: exit %d %s, want %d", code, stderr, exitNoDevice)
	}
}
