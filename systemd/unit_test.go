package systemd

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestUnitVerifies runs systemd-analyze verify on the template unit, with
// its ExecStart and EnvironmentFile pointed at files that exist here.
func TestUnitVerifies(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not installed (apt-get install systemd)")
	}
	unit, err := os.ReadFile("ublk-nvmeof@.service")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "ublk-nvmeof")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	env := filepath.Join(dir, "demo.env")
	example, err := os.ReadFile("example.env")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(env, example, 0o600); err != nil {
		t.Fatal(err)
	}
	text := strings.ReplaceAll(string(unit), "/usr/local/bin/ublk-nvmeof", bin)
	text = strings.ReplaceAll(text, "/etc/ublk-nvmeof/%i.env", env)
	if text == string(unit) {
		t.Fatal("unit no longer names /usr/local/bin/ublk-nvmeof: update this test")
	}
	path := filepath.Join(dir, "ublk-nvmeof@demo.service")
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(analyze, "verify", "--man=no", path).CombinedOutput()
	// verify also reports problems of unrelated units installed on the
	// machine; only lines about ours count.
	var ours []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, "ublk-nvmeof") {
			ours = append(ours, l)
		}
	}
	if err != nil || len(ours) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// TestExampleEnvNamesOptions: every variable the example sets or mentions is
// an UBLK_NVMEOF_ option; the required three are set.
func TestExampleEnvNamesOptions(t *testing.T) {
	b, err := os.ReadFile("example.env")
	if err != nil {
		t.Fatal(err)
	}
	set := map[string]bool{}
	for _, l := range strings.Split(string(b), "\n") {
		l = strings.TrimSpace(l)
		commented := strings.HasPrefix(l, "#")
		l = strings.TrimPrefix(l, "#")
		name, _, ok := strings.Cut(l, "=")
		if !ok || strings.Contains(name, " ") {
			continue
		}
		if !strings.HasPrefix(name, "UBLK_NVMEOF_") {
			t.Errorf("variable %s is not an UBLK_NVMEOF_ option", name)
		}
		if !commented {
			set[name] = true
		}
	}
	for _, req := range []string{"UBLK_NVMEOF_TRADDR", "UBLK_NVMEOF_TRSVCID", "UBLK_NVMEOF_NQN"} {
		if !set[req] {
			t.Errorf("%s not set in example.env", req)
		}
	}
}
