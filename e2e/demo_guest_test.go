package e2e

import (
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
)

// TestGuestDemo is the main job (`make demo`), and an end-to-end test: a
// Linux nvmet-tcp target exports a RAM disk; `ublk-nvmeof attach` exposes
// it as /dev/ublkbN; an ext4 file system is made on it and files are
// written and verified across a remount; list and status are shown; the
// device is detached; then the Linux kernel's own nvme-tcp initiator mounts
// the same namespace and finds the same files.
func TestGuestDemo(t *testing.T) {
	guest.Require(t)
	t.Setenv("UBLK_NVMEOF_RUN_DIR", t.TempDir())
	step := func(format string, args ...any) { t.Logf("==> "+format, args...) }
	start := time.Now()

	const nqn = "nqn.2026-11.io.ublk-nvmeof:demo"
	step("Linux nvmet-tcp target: subsystem %s, namespace 1 on /dev/ram0 (64 MiB), 127.0.0.1:4420", nqn)
	tg := guest.NewTarget(t, guest.TargetOptions{NQN: nqn, Device: "/dev/ram0"})

	step("ublk-nvmeof attach -a 127.0.0.1 -s 4420 -n %s", nqn)
	daemon := startAttached(t, "attach", "-a", "127.0.0.1", "-s", "4420", "-n", nqn, "-k", "5")
	dev := daemon.Device
	step("device ready: %s (%s after start)", dev, time.Since(start).Round(time.Millisecond))

	run := func(name string, args ...string) string {
		t.Helper()
		out, err := exec.Command(name, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s: %v\n%s\ndaemon log:\n%s", name, strings.Join(args, " "), err, out, daemon.Logs())
		}
		return string(out)
	}
	step("mkfs.ext4 %s", dev)
	run("mkfs.ext4", "-q", "-F", dev)
	mnt := "/mnt/demo"
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	mount := func(src string, flags uintptr) {
		t.Helper()
		if err := unix.Mount(src, mnt, "ext4", flags, ""); err != nil {
			t.Fatalf("mount %s: %v", src, err)
		}
	}
	umount := func() {
		t.Helper()
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Fatalf("umount: %v", err)
		}
	}
	mount(dev, 0)

	const files, size = 8, 1 << 20
	sums := map[string][32]byte{}
	for i := range files {
		b := make([]byte, size)
		if _, err := rand.Read(b); err != nil {
			t.Fatal(err)
		}
		name := fmt.Sprintf("file%d", i)
		if err := os.WriteFile(filepath.Join(mnt, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
		sums[name] = sha256.Sum256(b)
	}
	unix.Sync()
	step("wrote %d files of %d KiB on ext4 over ublk-nvmeof", files, size>>10)
	verify := func(where string) {
		t.Helper()
		for name, want := range sums {
			b, err := os.ReadFile(filepath.Join(mnt, name))
			if err != nil {
				t.Fatalf("%s: %v", where, err)
			}
			if sha256.Sum256(b) != want {
				t.Fatalf("%s: %s differs from what was written", where, name)
			}
		}
		step("verified %d files (sha256) %s", len(sums), where)
	}
	umount()
	_ = os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0)
	mount(dev, 0)
	verify("after a remount")
	umount()

	step("ublk-nvmeof list\n%s", run(DaemonPath, "list"))
	step("ublk-nvmeof status %s\n%s", dev, run(DaemonPath, "status", dev))

	step("ublk-nvmeof detach %s", dev)
	run(DaemonPath, "detach", dev)
	if err := daemon.wait(t); err != nil {
		t.Fatalf("daemon exited with %v\n%s", err, daemon.Logs())
	}
	if _, err := os.Stat(dev); err == nil {
		t.Fatalf("%s still exists after detach", dev)
	}
	step("%s removed; daemon exited 0", dev)

	step("cross-check: the Linux kernel's nvme-tcp initiator mounts the same namespace")
	kc, err := guest.ConnectKernel(tg)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := kc.Disconnect(); err != nil {
			t.Error(err)
		}
	}()
	mount(kc.NamespaceDevice(1), unix.MS_RDONLY)
	verify("through " + kc.NamespaceDevice(1))
	umount()

	step("summary: target %s on /dev/ram0; %s attached, ext4 made, %d MiB written and verified twice, detached; "+
		"data confirmed through the kernel initiator; %s in all",
		nqn, dev, files*size>>20, time.Since(start).Round(time.Millisecond))
	t.Logf("daemon log:\n%s", daemon.Logs())
}
