package systemd

import (
	"bytes"
	"crypto/rand"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e"
	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
)

// The guest has no source tree: the unit under test travels in the test
// binary.
//
//go:embed ublk-nvmeof@.service
var unitText string

// userManager is `systemd --user` running as root in the VM: a real
// service manager (Type=notify, NOTIFY_SOCKET, WatchdogSec, Restart=,
// KillMode=, SuccessExitStatus=) without D-Bus; systemctl --user talks to
// it on $XDG_RUNTIME_DIR/systemd/private.
type userManager struct {
	cmd     *exec.Cmd
	env     []string
	logPath string // the manager's stdout and stderr
	exited  chan error
}

func (m *userManager) systemctl(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command("systemctl", append([]string{"--user", "--no-pager"}, args...)...)
	cmd.Env = m.env
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// show returns the unit's properties.
func (m *userManager) show(t *testing.T, unit string, props ...string) map[string]string {
	t.Helper()
	args := []string{"show", unit}
	for _, p := range props {
		args = append(args, "-p", p)
	}
	out, err := m.systemctl(t, args...)
	if err != nil {
		t.Fatalf("systemctl show: %v\n%s", err, out)
	}
	res := map[string]string{}
	for _, l := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(l, "="); ok {
			res[k] = v
		}
	}
	return res
}

func (m *userManager) managerLog() string {
	b, _ := os.ReadFile(m.logPath)
	return string(b)
}

func startUserManager(t *testing.T, dir string) *userManager {
	t.Helper()
	systemd, err := exec.LookPath("systemd")
	if err != nil {
		t.Skip("systemd is not in the VM: the host that built it has no /lib/systemd/systemd (apt-get install systemd)")
	}
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err != nil {
		if err := unix.Mount("cgroup2", "/sys/fs/cgroup", "cgroup2", 0, ""); err != nil {
			t.Fatalf("mount cgroup2 (systemd needs it): %v", err)
		}
		t.Cleanup(func() { _ = unix.Unmount("/sys/fs/cgroup", 0) })
	}
	// A user manager runs only where the system was booted with systemd
	// (sd_booted: /run/systemd/system exists). The VM's /init is the
	// harness's; say so for the time of the test.
	if _, err := os.Stat("/run/systemd/system"); errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll("/run/systemd/system", 0o755); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = os.Remove("/run/systemd/system") })
	}
	// root's runtime directory, short enough for the sockets in it.
	runtime := "/run/user/0"
	if err := os.MkdirAll(runtime, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(runtime) })
	m := &userManager{
		env: append(os.Environ(),
			"XDG_RUNTIME_DIR="+runtime,
			"XDG_CONFIG_HOME="+filepath.Join(dir, "config"),
			"HOME="+dir,
		),
		logPath: filepath.Join(dir, "manager.log"),
		exited:  make(chan error, 1),
	}
	m.cmd = exec.Command(systemd, "--user")
	// Its log goes to the kernel log, which the harness reports with a
	// failed test.
	m.cmd.Env = append(m.env, "SYSTEMD_LOG_TARGET=kmsg", "SYSTEMD_LOG_LEVEL=info")
	logFile, err := os.Create(m.logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close() // the manager has its own descriptor
	m.cmd.Stdout, m.cmd.Stderr = logFile, logFile
	if err := m.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { m.exited <- m.cmd.Wait() }()
	t.Cleanup(func() {
		// The test stops its service first (a later cleanup); a user
		// manager without exit.target cannot exit by itself.
		_ = m.cmd.Process.Kill()
		<-m.exited
	})
	private := filepath.Join(runtime, "systemd", "private")
	deadline := time.Now().Add(time.Minute)
	for {
		if _, err := os.Stat(private); err == nil {
			break
		}
		select {
		case err := <-m.exited:
			m.exited <- err
			t.Fatalf("systemd --user exited: %v\n%s (its log is in the kernel log)", err, m.managerLog())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("systemd --user did not open %s\n%s", private, m.managerLog())
		}
		time.Sleep(50 * time.Millisecond)
	}
	// The socket exists before the manager answers on it.
	for {
		out, err := m.systemctl(t, "show-environment")
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			c, derr := net.Dial("unix", private)
			if c != nil {
				c.Close()
			}
			t.Fatalf("systemctl --user: %v\n%s\ndial %s: %v\n%s", err, out, private, derr, m.managerLog())
		}
		time.Sleep(200 * time.Millisecond)
	}
	return m
}

// TestGuestSystemdUnit runs ublk-nvmeof@.service, as shipped (only the
// binary's and the environment file's paths changed, and its output sent
// to a file), under a real systemd: start waits for READY=1 and the unit
// is active with STATUS= naming the device and the controller state; a
// SIGKILLed daemon is restarted (Restart=on-failure) and its successor takes
// the same device over (attach --recover), data intact; stop detaches and
// the device is gone.
func TestGuestSystemdUnit(t *testing.T) {
	guest.Require(t)
	dir := t.TempDir()

	tg := guest.NewTarget(t, guest.TargetOptions{NQN: "nqn.2026-11.io.ublk-nvmeof:systemd", Device: "/dev/ram1", Port: 4438, PortID: 8})
	runDir := filepath.Join(dir, "rundir")
	daemonLog := filepath.Join(dir, "daemon.log")
	envFile := filepath.Join(dir, "inst.env")
	if err := os.WriteFile(envFile, []byte(strings.Join([]string{
		"UBLK_NVMEOF_TRADDR=127.0.0.1",
		"UBLK_NVMEOF_TRSVCID=4438",
		"UBLK_NVMEOF_NQN=" + tg.Opts.NQN,
		"UBLK_NVMEOF_NR_IO_QUEUES=2",
		"UBLK_NVMEOF_RUN_DIR=" + runDir,
	}, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	unit := strings.ReplaceAll(unitText, "/usr/local/bin/ublk-nvmeof", e2e.DaemonPath)
	unit = strings.ReplaceAll(unit, "/etc/ublk-nvmeof/%i.env", filepath.Join(dir, "%i.env"))
	units := filepath.Join(dir, "config", "systemd", "user")
	for name, text := range map[string]string{
		"ublk-nvmeof@.service": unit,
		// Test plumbing only: the daemon's log in a file (there is no
		// journal in the VM), and the manager's targets.
		"ublk-nvmeof@.service.d/log.conf": "[Service]\nStandardOutput=append:" + daemonLog + "\nStandardError=append:" + daemonLog + "\n",
		"default.target":                  "[Unit]\nDescription=default\n",
		// What a service's default dependencies need (the distribution's
		// user units are not in the VM).
		"basic.target": "[Unit]\nDescription=basic\n",
	} {
		p := filepath.Join(units, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// Units first: a user manager without a default target gives up.
	m := startUserManager(t, dir)
	const svc = "ublk-nvmeof@inst.service"
	logs := func() string {
		b, _ := os.ReadFile(daemonLog)
		st, _ := m.systemctl(t, "status", svc)
		return fmt.Sprintf("daemon log:\n%s\nsystemctl status:\n%s", b, st)
	}
	t.Cleanup(func() { _, _ = m.systemctl(t, "stop", svc) })

	// Type=notify: start returns once READY=1 was sent.
	if out, err := m.systemctl(t, "start", svc); err != nil {
		t.Fatalf("start: %v\n%s\n%s", err, out, logs())
	}
	props := []string{"ActiveState", "SubState", "StatusText", "MainPID", "NRestarts", "Result", "ExecMainStatus"}
	p := m.show(t, svc, props...)
	if p["ActiveState"] != "active" || !strings.Contains(p["StatusText"], "controller LIVE") {
		t.Fatalf("after start: %v\n%s", p, logs())
	}
	device, _, _ := strings.Cut(strings.TrimPrefix(p["StatusText"], "serving "), ",")
	if !strings.HasPrefix(device, "/dev/ublkb") {
		t.Fatalf("STATUS= does not name the device: %q", p["StatusText"])
	}
	firstPID, _ := strconv.Atoi(p["MainPID"])
	t.Logf("active: %v", p)

	pattern := guest.AlignedBuf(t, 1<<20)
	if _, err := rand.Read(pattern); err != nil {
		t.Fatal(err)
	}
	guest.DirectIO(t, device, pattern, 1<<20, true)

	// A crash: Restart=on-failure starts attach --recover, which takes the
	// device over (ublk user recovery kept it while no daemon served it).
	if err := unix.Kill(firstPID, unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		p = m.show(t, svc, props...)
		if pid, _ := strconv.Atoi(p["MainPID"]); p["ActiveState"] == "active" && pid != 0 && pid != firstPID && p["NRestarts"] == "1" &&
			strings.Contains(p["StatusText"], "controller LIVE") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not restarted after SIGKILL: %v\n%s", p, logs())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !strings.HasPrefix(p["StatusText"], "serving "+device+",") {
		t.Fatalf("restarted daemon serves %q, want %s\n%s", p["StatusText"], device, logs())
	}
	if b, _ := os.ReadFile(daemonLog); !bytes.Contains(b, []byte("recovering the device a dead daemon left")) {
		t.Fatalf("the restarted daemon did not recover the device\n%s", logs())
	}
	back := guest.AlignedBuf(t, 1<<20)
	guest.DirectIO(t, device, back, 1<<20, false)
	if !bytes.Equal(back, pattern) {
		t.Fatal("data written before the crash does not read back after the restart")
	}
	// The restarted daemon answers on its control socket.
	st := exec.Command(e2e.DaemonPath, "status", "--json", device)
	st.Env = append(os.Environ(), "UBLK_NVMEOF_RUN_DIR="+runDir)
	out, err := st.Output()
	var status struct {
		PID   int    `json:"pid"`
		State string `json:"state"`
	}
	if err != nil || json.Unmarshal(out, &status) != nil || strconv.Itoa(status.PID) != p["MainPID"] || status.State != "LIVE" {
		t.Fatalf("status after restart: %v %s; MainPID %s", err, out, p["MainPID"])
	}
	t.Logf("restarted: %v", p)

	// stop: SIGTERM, graceful detach, exit 0, the device deleted.
	if out, err := m.systemctl(t, "stop", svc); err != nil {
		t.Fatalf("stop: %v\n%s\n%s", err, out, logs())
	}
	p = m.show(t, svc, props...)
	if p["ActiveState"] != "inactive" || p["Result"] != "success" || p["ExecMainStatus"] != "0" {
		t.Fatalf("after stop: %v\n%s", p, logs())
	}
	if _, err := os.Stat(device); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s after stop: %v\n%s", device, err, logs())
	}
	if m, _ := filepath.Glob("/dev/ublk[bc]*"); len(m) != 0 {
		t.Fatalf("ublk devices left after stop: %v", m)
	}
	t.Logf("%s", logs())
}
