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
	makeInaccessibleNodes(t)
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

// unitRig is ublk-nvmeof@inst.service, as shipped (only the binary's and
// the environment file's paths changed, its output sent to a file, and the
// test's drop-ins added), under a real systemd --user, against a Linux
// nvmet-tcp target.
type unitRig struct {
	t         *testing.T
	dir       string
	tg        *guest.Target
	m         *userManager
	runDir    string
	daemonLog string
}

const rigService = "ublk-nvmeof@inst.service"

// rigProps are the unit's properties the tests look at.
var rigProps = []string{"ActiveState", "SubState", "StatusText", "MainPID", "NRestarts", "Result", "ExecMainStatus"}

// newUnitRig writes the unit, its environment file and dropIns (file name
// in ublk-nvmeof@.service.d/ to contents) and starts the user manager. The
// service is stopped when the test ends.
func newUnitRig(t *testing.T, tg *guest.Target, dropIns map[string]string) *unitRig {
	t.Helper()
	dir := t.TempDir()
	// The unit's RuntimeDirectory=, which a user manager makes in
	// $XDG_RUNTIME_DIR (a system one in /run): the only place the
	// sandbox lets the daemon write (ProtectSystem=strict, PrivateTmp=).
	r := &unitRig{t: t, dir: dir, tg: tg, runDir: "/run/user/0/ublk-nvmeof", daemonLog: filepath.Join(dir, "daemon.log")}
	envFile := filepath.Join(dir, "inst.env")
	if err := os.WriteFile(envFile, []byte(strings.Join([]string{
		"UBLK_NVMEOF_TRADDR=127.0.0.1",
		"UBLK_NVMEOF_TRSVCID=" + strconv.Itoa(tg.Opts.Port),
		"UBLK_NVMEOF_NQN=" + tg.Opts.NQN,
		"UBLK_NVMEOF_NR_IO_QUEUES=2",
		"UBLK_NVMEOF_RUN_DIR=" + r.runDir,
	}, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	unit := strings.ReplaceAll(unitText, "/usr/local/bin/ublk-nvmeof", e2e.DaemonPath)
	unit = strings.ReplaceAll(unit, "/etc/ublk-nvmeof/%i.env", filepath.Join(dir, "%i.env"))
	units := filepath.Join(dir, "config", "systemd", "user")
	files := map[string]string{
		"ublk-nvmeof@.service": unit,
		// Test plumbing only: the daemon's log in a file (there is no
		// journal in the VM), and the manager's targets.
		"ublk-nvmeof@.service.d/log.conf": "[Service]\nStandardOutput=append:" + r.daemonLog + "\nStandardError=append:" + r.daemonLog + "\n",
		// ProtectHome=yes also hides /run/user, where a user manager
		// (this test's) has its notify socket and the unit's
		// RuntimeDirectory; a system manager has both in /run. Here
		// /home, /root and /run/user are read-only instead.
		"ublk-nvmeof@.service.d/user-manager.conf": "[Service]\nProtectHome=read-only\n",
		"default.target": "[Unit]\nDescription=default\n",
		// What a service's default dependencies need (the distribution's
		// user units are not in the VM).
		"basic.target": "[Unit]\nDescription=basic\n",
	}
	for name, text := range dropIns {
		files["ublk-nvmeof@.service.d/"+name] = text
	}
	for name, text := range files {
		p := filepath.Join(units, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// Units first: a user manager without a default target gives up.
	r.m = startUserManager(t, dir)
	t.Cleanup(func() { _, _ = r.m.systemctl(t, "stop", rigService) })
	return r
}

// logs is the daemon's log and systemctl status, for failure messages.
func (r *unitRig) logs() string {
	b, _ := os.ReadFile(r.daemonLog)
	st, _ := r.m.systemctl(r.t, "status", rigService)
	return fmt.Sprintf("daemon log:\n%s\nsystemctl status:\n%s", b, st)
}

func (r *unitRig) show() map[string]string { return r.m.show(r.t, rigService, rigProps...) }

// start starts the service (Type=notify: systemctl returns after READY=1)
// and returns the device it serves and the daemon's PID.
func (r *unitRig) start() (device string, pid int) {
	r.t.Helper()
	if out, err := r.m.systemctl(r.t, "start", rigService); err != nil {
		r.t.Fatalf("start: %v\n%s\n%s", err, out, r.logs())
	}
	p := r.show()
	if p["ActiveState"] != "active" || !strings.Contains(p["StatusText"], "controller LIVE") {
		r.t.Fatalf("after start: %v\n%s", p, r.logs())
	}
	device, _, _ = strings.Cut(strings.TrimPrefix(p["StatusText"], "serving "), ",")
	if !strings.HasPrefix(device, "/dev/ublkb") {
		r.t.Fatalf("STATUS= does not name the device: %q", p["StatusText"])
	}
	pid, _ = strconv.Atoi(p["MainPID"])
	r.t.Logf("active: %v", p)
	return device, pid
}

// waitRestarted waits until systemd has restarted the service (restarts
// times in all) with a daemon other than oldPID serving device LIVE, that
// took the device over.
func (r *unitRig) waitRestarted(device string, oldPID, restarts int) map[string]string {
	r.t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	var p map[string]string
	for {
		p = r.show()
		if pid, _ := strconv.Atoi(p["MainPID"]); p["ActiveState"] == "active" && pid != 0 && pid != oldPID &&
			p["NRestarts"] == strconv.Itoa(restarts) && strings.Contains(p["StatusText"], "controller LIVE") {
			break
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("not restarted: %v\n%s", p, r.logs())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !strings.HasPrefix(p["StatusText"], "serving "+device+",") {
		r.t.Fatalf("restarted daemon serves %q, want %s\n%s", p["StatusText"], device, r.logs())
	}
	if b, _ := os.ReadFile(r.daemonLog); bytes.Count(b, []byte("recovering the device a dead daemon left")) != restarts {
		r.t.Fatalf("the restarted daemon did not recover the device\n%s", r.logs())
	}
	return p
}

// stop stops the service: SIGTERM, graceful detach, exit 0, the device
// deleted, no ublk device left.
func (r *unitRig) stop(device string) {
	r.t.Helper()
	if out, err := r.m.systemctl(r.t, "stop", rigService); err != nil {
		r.t.Fatalf("stop: %v\n%s\n%s", err, out, r.logs())
	}
	p := r.show()
	if p["ActiveState"] != "inactive" || p["Result"] != "success" || p["ExecMainStatus"] != "0" {
		r.t.Fatalf("after stop: %v\n%s", p, r.logs())
	}
	if _, err := os.Stat(device); !errors.Is(err, os.ErrNotExist) {
		r.t.Fatalf("%s after stop: %v\n%s", device, err, r.logs())
	}
	if m, _ := filepath.Glob("/dev/ublk[bc]*"); len(m) != 0 {
		r.t.Fatalf("ublk devices left after stop: %v", m)
	}
}

// writePattern writes 1 MiB of random data at 1 MiB and returns it;
// checkPattern reads it back.
func writePattern(t *testing.T, device string) []byte {
	t.Helper()
	pattern := guest.AlignedBuf(t, 1<<20)
	if _, err := rand.Read(pattern); err != nil {
		t.Fatal(err)
	}
	guest.DirectIO(t, device, pattern, 1<<20, true)
	return pattern
}

func checkPattern(t *testing.T, device string, pattern []byte, when string) {
	t.Helper()
	back := guest.AlignedBuf(t, len(pattern))
	guest.DirectIO(t, device, back, 1<<20, false)
	if !bytes.Equal(back, pattern) {
		t.Fatalf("data written before %s does not read back after it", when)
	}
}

// makeInaccessibleNodes makes /run/systemd/inaccessible/, as the system
// manager (PID 1) does at boot: the nodes a unit's sandbox mounts over what
// it hides (ProtectKernelTunables= hides /proc/kcore with "reg",
// ProtectKernelLogs= /dev/kmsg with "chr", ProtectKernelModules= the
// module directories with "dir"). The VM's /init is not systemd.
func makeInaccessibleNodes(t *testing.T) {
	t.Helper()
	dir := "/run/systemd/inaccessible"
	if _, err := os.Stat(dir); err == nil {
		return
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	old := unix.Umask(0)
	defer unix.Umask(old)
	for name, mk := range map[string]func(string) error{
		"dir":  func(p string) error { return os.Mkdir(p, 0) },
		"reg":  func(p string) error { return os.WriteFile(p, nil, 0) },
		"fifo": func(p string) error { return unix.Mkfifo(p, 0) },
		"chr":  func(p string) error { return unix.Mknod(p, unix.S_IFCHR, int(unix.Mkdev(0, 0))) },
		"blk":  func(p string) error { return unix.Mknod(p, unix.S_IFBLK, int(unix.Mkdev(0, 0))) },
		"sock": func(p string) error {
			l, err := net.Listen("unix", p)
			if err != nil {
				return err
			}
			l.(*net.UnixListener).SetUnlinkOnClose(false)
			if err := l.Close(); err != nil {
				return err
			}
			return os.Chmod(p, 0)
		},
	} {
		if err := mk(filepath.Join(dir, name)); err != nil {
			t.Fatalf("inaccessible node %s: %v", name, err)
		}
	}
}

// TestGuestSystemdUnit runs the unit under a real systemd: start waits for
// READY=1 and the unit is active with STATUS= naming the device and the
// controller state, and the daemon runs in the unit's sandbox
// (checkSandbox); a SIGKILLed daemon is restarted (Restart=on-failure)
// and its successor takes the same device over (attach --recover), data
// intact; stop detaches and the device is gone.
func TestGuestSystemdUnit(t *testing.T) {
	guest.Require(t)
	tg := guest.NewTarget(t, guest.TargetOptions{NQN: "nqn.2026-11.io.ublk-nvmeof:systemd", Device: "/dev/ram1", Port: 4438, PortID: 8})
	// A probe in the service's sandbox (ExecStartPost= shares it): may a
	// process of the unit open a block device DeviceAllow= does not
	// list? (The test itself, outside, can.)
	probe := "/run/user/0/ublk-nvmeof/devprobe"
	r := newUnitRig(t, tg, map[string]string{
		"devprobe.conf": "[Service]\nExecStartPost=-/bin/sh -c '( exec 3</dev/ram0 ) 2>>" + probe + " && echo opened >>" + probe + " || echo refused >>" + probe + "'\n",
	})
	device, firstPID := r.start()
	checkSandbox(t, firstPID)
	if b, err := os.ReadFile(probe); err != nil || !strings.Contains(string(b), "refused") || !strings.Contains(string(b), "not permitted") {
		t.Errorf("the unit's device ACL: a process of the service opening /dev/ram0: %q %v, want refused (EPERM)", b, err)
	}
	if f, err := os.Open("/dev/ram0"); err != nil {
		t.Errorf("the test cannot open /dev/ram0 either: %v", err)
	} else {
		f.Close()
	}
	pattern := writePattern(t, device)

	// A crash: Restart=on-failure starts attach --recover, which takes the
	// device over (ublk user recovery kept it while no daemon served it).
	if err := unix.Kill(firstPID, unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	p := r.waitRestarted(device, firstPID, 1)
	checkPattern(t, device, pattern, "the crash")
	// The restarted daemon answers on its control socket.
	st := exec.Command(e2e.DaemonPath, "status", "--json", device)
	st.Env = append(os.Environ(), "UBLK_NVMEOF_RUN_DIR="+r.runDir)
	out, err := st.Output()
	var status struct {
		PID   int    `json:"pid"`
		State string `json:"state"`
	}
	if err != nil || json.Unmarshal(out, &status) != nil || strconv.Itoa(status.PID) != p["MainPID"] || status.State != "LIVE" {
		t.Fatalf("status after restart: %v %s; MainPID %s", err, out, p["MainPID"])
	}
	t.Logf("restarted: %v", p)
	r.stop(device)
	t.Logf("%s", r.logs())
}

// TestGuestSystemdWatchdogRestartsWedged: a daemon whose controller
// supervisor is wedged in a recovery teardown (the test hook
// UBLK_NVMEOF_TEST_WEDGE_TEARDOWN blocks it before the sockets are shut,
// as a teardown bug would; the rest of the process runs on) stops feeding
// the watchdog, systemd kills it (WatchdogSec, SIGABRT) and restarts it,
// and the new daemon takes the device over with the data intact.
func TestGuestSystemdWatchdogRestartsWedged(t *testing.T) {
	guest.Require(t)
	tg := guest.NewTarget(t, guest.TargetOptions{NQN: "nqn.2026-11.io.ublk-nvmeof:watchdog", Device: "/dev/ram1", Port: 4460, PortID: 40})
	// In the run directory: the daemon's /tmp is its own (PrivateTmp=).
	wedge := filepath.Join("/run/user/0/ublk-nvmeof", "wedge")
	r := newUnitRig(t, tg, map[string]string{
		"watchdog.conf": "[Service]\nWatchdogSec=4s\nEnvironment=UBLK_NVMEOF_TEST_WEDGE_TEARDOWN=" + wedge + "\n",
	})
	if err := os.MkdirAll(filepath.Dir(wedge), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(wedge, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	device, firstPID := r.start()
	pattern := writePattern(t, device)

	// The target drops the association: the daemon starts recovery, and
	// its teardown wedges.
	if err := tg.DeleteControllers(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		if b, _ := os.ReadFile(r.daemonLog); bytes.Contains(b, []byte("test hook: wedging the teardown")) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the daemon's teardown did not reach the wedge\n%s", r.logs())
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Only the first daemon wedges.
	if err := os.Remove(wedge); err != nil {
		t.Fatal(err)
	}
	r.waitRestarted(device, firstPID, 1)
	// systemd's watchdog kills with SIGABRT (WatchdogSignal=): the Go
	// runtime's dump of it is in the old daemon's log.
	if b, _ := os.ReadFile(r.daemonLog); !bytes.Contains(b, []byte("SIGABRT")) {
		t.Fatalf("the wedged daemon was not killed by the watchdog's SIGABRT\n%s", r.logs())
	}
	checkPattern(t, device, pattern, "the wedge and the restart")
	r.stop(device)
}

// checkSandbox checks, from /proc, that the daemon pid runs with the unit's
// hardening applied: CAP_SYS_ADMIN its only capability, in its bounding set
// too (CapabilityBoundingSet=); no_new_privs (NoNewPrivileges=); a seccomp
// filter (SystemCallFilter=, SystemCallArchitectures=); in its own mount
// namespace, the root file system and /sys read-only (ProtectSystem=strict,
// ProtectKernelTunables=) with its run directory writable
// (RuntimeDirectory=), its own /tmp (PrivateTmp=), the module directory and
// /dev/kmsg masked (ProtectKernelModules=, ProtectKernelLogs=), /proc with
// other processes and non-process files hidden (ProtectProc=, ProcSubset=),
// /run/user read-only (ProtectHome=, as the test's drop-in sets it).
func checkSandbox(t *testing.T, pid int) {
	t.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	const capSysAdmin = "0000000000200000" // 1 << CAP_SYS_ADMIN (21)
	for _, want := range []string{"CapBnd:\t" + capSysAdmin, "CapEff:\t" + capSysAdmin, "NoNewPrivs:\t1", "Seccomp:\t2"} {
		if !strings.Contains(string(status), want+"\n") {
			t.Errorf("daemon's /proc/%d/status lacks %q:\n%s", pid, want, status)
		}
	}
	mounts, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", pid))
	if err != nil {
		t.Fatal(err)
	}
	// mountinfo: ID parent major:minor root mountpoint options ... - type
	// source super-options; the last mount on a point is the one in
	// effect.
	type mount struct{ root, opts, super string }
	at := map[string]mount{}
	for _, l := range strings.Split(string(mounts), "\n") {
		f := strings.Fields(l)
		if len(f) < 10 {
			continue
		}
		at[f[4]] = mount{root: f[3], opts: f[5], super: f[len(f)-1]}
	}
	for point, ok := range map[string]func(mount) bool{
		"/":                       func(m mount) bool { return strings.HasPrefix(m.opts, "ro") },
		"/sys":                    func(m mount) bool { return strings.HasPrefix(m.opts, "ro") },
		"/run/user":               func(m mount) bool { return strings.HasPrefix(m.opts, "ro") },
		"/run/user/0/ublk-nvmeof": func(m mount) bool { return strings.HasPrefix(m.opts, "rw") },
		"/tmp":                    func(m mount) bool { return strings.Contains(m.root, "systemd-private-") },
		"/lib/modules":            func(m mount) bool { return strings.HasSuffix(m.root, "/inaccessible/dir") },
		"/dev/kmsg":               func(m mount) bool { return strings.HasSuffix(m.root, "/inaccessible/chr") },
		"/proc": func(m mount) bool {
			return strings.Contains(m.super, "hidepid=invisible") && strings.Contains(m.super, "subset=pid")
		},
	} {
		if m, found := at[point]; !found || !ok(m) {
			t.Errorf("daemon's mount on %s: %+v (mounted: %v): not as the sandbox makes it", point, m, found)
		}
	}
	if t.Failed() {
		t.Logf("daemon's mountinfo:\n%s", mounts)
	}
}
