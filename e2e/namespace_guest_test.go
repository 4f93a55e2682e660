package e2e

// Namespace changes against Linux nvmet in the VM (issue 11, items 6-8),
// each under the verified load with no application error:
//
//   - the backing file of a file namespace grown and shrunk while attached
//     (nvmet's revalidate_size sends Namespace Attribute Changed): on a
//     kernel with UBLK_F_UPDATE_SIZE the device follows; without it the
//     device keeps its size, one WARN line per change says so, and I/O past
//     the namespace's end fails with EIO. The shrink chosen: the load runs
//     on the first half, which every size keeps; the part a shrink cuts off
//     is only touched by the test's own single I/Os, which check that it
//     is refused while it is gone and usable once it is back.
//   - the namespace disabled for a few seconds then enabled again: I/O is
//     held while it is away and nothing fails or is lost;
//   - attach --recover onto a namespace that was replaced behind the same
//     NSID: refused with exit 7 and one line, the device left; the right
//     namespace back, a recover takes the device over and the load
//     completes.
//
//	E2E_PACKAGES=./e2e E2E_RUN='^TestGuestNamespace' go test -count=1 -v -run TestVM ./e2e/

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/load"
	"github.com/ublk-nvmeof/ublk-nvmeof/ublk"
)

// exitNoNamespace is ublk-nvmeof's exit status for a missing (or, with
// --recover, another) namespace.
const exitNoNamespace = 7

// updateSize reports whether the kernel's ublk driver can resize a device.
func updateSize(t *testing.T) (bool, ublk.Features) {
	t.Helper()
	c, err := ublk.OpenControl()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	f, err := c.Features()
	if err != nil {
		t.Fatal(err)
	}
	return f.Has(ublk.FeatureUpdateSize), f
}

// deviceSize is the kernel's size of a block device, in bytes.
func deviceSize(t *testing.T, dev string) int64 {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "size"))
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n << 9
}

// newFileScenario is a scenario (scenarioNQN(name) on port, portID) whose
// namespace is a file of 8 MiB, written through the page cache so that it
// can be resized under the target.
func newFileScenario(t *testing.T, name string, port, portID int) *scenario {
	t.Helper()
	file := filepath.Join(t.TempDir(), "ns1.img")
	if err := guest.CreateFile(file, 8<<20); err != nil {
		t.Fatal(err)
	}
	return newScenario(t, guest.TargetOptions{NQN: scenarioNQN(name), Device: file, BufferedIO: true, Port: port, PortID: portID})
}

// checkGrown12 checks d's device once its 8 MiB namespace has grown to
// 12 MiB while no host was connected: the device follows where the kernel
// has UPDATE_SIZE (and the grown area is usable), else it keeps its size
// with one WARN line. The timeline gets the device's size.
func checkGrown12(t *testing.T, s *scenario, d *daemon, follows bool) {
	t.Helper()
	const mib = 1 << 20
	if follows {
		waitUntil(t, d.device+" to be 12 MiB", func() bool { return deviceSize(t, d.device) == 12*mib })
		if err := probe(d.device, 10*mib); err != nil {
			t.Errorf("I/O in the grown area: %v", err)
		}
	} else {
		if got := deviceSize(t, d.device); got != 8*mib {
			t.Errorf("%s is %d bytes, want it to keep its 8 MiB without UPDATE_SIZE", d.device, got)
		}
		if n := d.countLog("level=WARN", "keeps its size"); n != 1 {
			t.Errorf("%d WARN lines about the device keeping its size, want 1\n%s", n, d.Log())
		}
	}
	s.tl.add("%s is %d MiB", d.device, deviceSize(t, d.device)/mib)
}

// probe writes one stamped 4 KiB block at off through dev with O_DIRECT
// and reads it back; it returns the first error.
func probe(dev string, off int64) error {
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	buf, err := unix.Mmap(-1, 0, load.BlockSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return err
	}
	defer unix.Munmap(buf)
	copy(buf, fmt.Sprintf("probe at %d", off))
	if _, err := f.WriteAt(buf, off); err != nil {
		return fmt.Errorf("write at %d: %w", off, err)
	}
	clear(buf)
	if _, err := f.ReadAt(buf, off); err != nil {
		return fmt.Errorf("read at %d: %w", off, err)
	}
	if want := fmt.Sprintf("probe at %d", off); !strings.HasPrefix(string(buf), want) {
		return fmt.Errorf("read at %d returned %q, want %q", off, buf[:len(want)], want)
	}
	return nil
}

// countLog counts the daemon's log lines containing every one of parts.
func (d *daemon) countLog(parts ...string) int {
	n := 0
	for _, l := range strings.Split(d.Log(), "\n") {
		all := true
		for _, p := range parts {
			all = all && strings.Contains(l, p)
		}
		if all {
			n++
		}
	}
	return n
}

// waitCount waits until countLog(parts...) reaches n.
func (d *daemon) waitCount(n int, parts ...string) {
	d.t.Helper()
	waitUntil(d.t, fmt.Sprintf("%d daemon log lines with %q", n, parts), func() bool { return d.countLog(parts...) >= n })
}

func TestGuestNamespaceResizedUpdateSize(t *testing.T) {
	guest.Require(t)
	has, f := updateSize(t)
	if !has {
		t.Skipf("the kernel's ublk lacks UBLK_F_UPDATE_SIZE (Linux 6.16; features %v): TestGuestNamespaceResizedNoUpdateSize covers this kernel", f)
	}
	testNamespaceResized(t, true)
}

func TestGuestNamespaceResizedNoUpdateSize(t *testing.T) {
	guest.Require(t)
	if has, f := updateSize(t); has {
		t.Skipf("the kernel's ublk has UBLK_F_UPDATE_SIZE (features %v): the device follows the namespace, TestGuestNamespaceResizedUpdateSize covers it", f)
	}
	testNamespaceResized(t, false)
}

// testNamespaceResized: a file namespace of 8 MiB, the load on its first
// 4 MiB; the file grown to 12 MiB, shrunk to 4 MiB, grown back to 8 MiB.
func testNamespaceResized(t *testing.T, follows bool) {
	const mib = 1 << 20
	port, portID := 4466, 36
	if !follows {
		port, portID = 4467, 37
	}
	s := newFileScenario(t, fmt.Sprintf("ns-resized-%v", follows), port, portID)
	const metrics = "127.0.0.1:9466"
	d := startDaemon(t, s.tl, noNetns, s.attachArgs("-l", "30", "--metrics-addr", metrics)...)
	baseline := daemonGoroutines(t, metrics)
	if got := deviceSize(t, d.device); got != 8*mib {
		t.Fatalf("%s is %d bytes, want %d", d.device, got, 8*mib)
	}
	s.startLoad(d.device, 20) // blocks 0..1023: the first 4 MiB

	warn := func() int { return d.countLog("level=WARN", "keeps its size") }
	resize := func(size int64, changes int) {
		t.Helper()
		s.tl.add("namespace file resized to %d MiB, revalidate_size", size/mib)
		if err := s.tg.ResizeFile(size); err != nil {
			t.Fatal(err)
		}
		d.waitCount(changes, "namespace resized")
		s.waitProgress(100, fmt.Sprintf("after the resize to %d MiB", size/mib))
	}
	expectSize := func(want int64) {
		t.Helper()
		if follows {
			waitUntil(t, fmt.Sprintf("%s to be %d MiB", d.device, want/mib), func() bool { return deviceSize(t, d.device) == want })
			s.tl.add("%s is %d MiB", d.device, want/mib)
			return
		}
		if got := deviceSize(t, d.device); got != 8*mib {
			t.Errorf("%s is %d bytes, want it to keep its 8 MiB without UPDATE_SIZE", d.device, got)
		}
	}

	// Grown: the new area is usable where the device follows.
	resize(12*mib, 1)
	expectSize(12 * mib)
	if follows {
		if err := probe(d.device, 10*mib); err != nil {
			t.Errorf("I/O in the grown area: %v", err)
		}
	} else {
		d.waitCount(1, "level=WARN", "keeps its size")
		s.tl.add("daemon warned: the device keeps its size")
	}

	// Shrunk below the device's size: I/O past the namespace's end fails.
	resize(4*mib, 2)
	expectSize(4 * mib)
	err := probe(d.device, 6*mib)
	switch {
	case err == nil:
		t.Errorf("I/O at 6 MiB succeeded after the namespace shrank to 4 MiB")
	case !follows && !errors.Is(err, syscall.EIO):
		t.Errorf("I/O at 6 MiB past the namespace's end: %v, want EIO", err)
	}
	s.tl.add("I/O at 6 MiB, past the namespace's end: %v", err)

	// Grown back to the device's first size: usable again.
	resize(8*mib, 3)
	expectSize(8 * mib)
	if err := probe(d.device, 6*mib); err != nil {
		t.Errorf("I/O at 6 MiB once the namespace is 8 MiB again: %v", err)
	}
	if !follows {
		// 12 and 4 MiB: the device could not follow; 8 MiB is its size.
		if n := warn(); n != 2 {
			t.Errorf("%d WARN lines about the device keeping its size, want 2 (one per change it could not follow)\n%s", n, d.Log())
		}
	} else if n := warn(); n != 0 {
		t.Errorf("%d WARN lines about the device keeping its size on a kernel with UPDATE_SIZE\n%s", n, d.Log())
	}
	if n := d.nStates(); n != 2 { // CONNECTING, LIVE
		t.Errorf("the resizes changed the controller's state (%d changes)\n%s", n, d.Log())
	}
	s.end(d, nil, metrics, baseline)
}

// The namespace disabled under load for a few seconds, then enabled again:
// nvmet fails I/O to it with Internal Path Error (nvmet_req_find_ns, 6.10+)
// and reports it gone (Namespace Attribute Changed, not in the active
// list); the daemon holds the I/O and reconnects until it is back. No I/O
// fails and nothing acknowledged is lost. nvmet names no Command Retry
// Delay, so an I/O that gets the path status before the event is handled
// is retried at once and can use up its retries on the association
// (nvme_max_retries); then the path status is a failure of the path
// (docs/design.md, "Retries"): the controller resets, and the I/O is held
// and retried on the next association, as native multipath fails it over.
func TestGuestNamespaceDisabledBriefly(t *testing.T) {
	guest.Require(t)
	s := newScenario(t, guest.TargetOptions{NQN: scenarioNQN("ns-disabled-briefly"), Device: "/dev/ram0", Port: 4462, PortID: 32})
	const metrics = "127.0.0.1:9462"
	d := startDaemon(t, s.tl, noNetns, s.attachArgs("-l", "30", "--metrics-addr", metrics)...)
	baseline := daemonGoroutines(t, metrics)
	s.startLoad(d.device, 21)

	n := d.nStates()
	s.tl.add("FAULT: namespace %d disabled", s.opts.NSID)
	if err := s.tg.SetNamespaceEnabled(false); err != nil {
		t.Fatal(err)
	}
	d.waitState(n, "RESETTING")
	d.waitLog("reconnect failed")
	s.tl.add("namespace %d enabled again", s.opts.NSID)
	if err := s.tg.SetNamespaceEnabled(true); err != nil {
		t.Fatal(err)
	}
	d.waitState(n, "LIVE")
	s.resumed("the namespace came back")
	s.end(d, nil, metrics, baseline)
}

// The daemon SIGKILLed under load; the namespace behind its NSID replaced
// (another UUID and NGUID); attach --recover refuses with exit 7 and one
// line and leaves the device; the namespace back, attach --recover takes
// the device over and the load completes without an error.
func TestGuestNamespaceRecoverReplaced(t *testing.T) {
	guest.Require(t)
	const (
		uuid, nguid           = "6b1e2f5c-7a1d-4c39-9a53-0d8f9e4c2a20", "4e564d65-6f66-2d73-6365-6e6172696f20"
		otherUUID, otherNGUID = "6b1e2f5c-7a1d-4c39-9a53-0d8f9e4c2a21", "4e564d65-6f66-2d73-6365-6e6172696f21"
	)
	s := newScenario(t, guest.TargetOptions{NQN: scenarioNQN("ns-recover-replaced"), Device: "/dev/ram0", Port: 4463, PortID: 33, UUID: uuid, NGUID: nguid})
	first := startDaemon(t, s.tl, noNetns, s.attachArgs("-l", "30")...)
	s.startLoad(first.device, 22)

	s.kill(first)
	if gone(first.device) {
		t.Fatalf("%s disappeared with the daemon: user recovery should keep it", first.device)
	}
	s.tl.add("namespace replaced: UUID %s, NGUID %s", otherUUID, otherNGUID)
	if err := s.tg.ReplaceNamespaceIdentity(otherUUID, otherNGUID); err != nil {
		t.Fatal(err)
	}
	refused, err := tryStartDaemon(t, s.tl, noNetns, s.attachArgs("-l", "30", "--recover")...)
	if !errors.Is(err, errAttachExited) {
		t.Fatalf("attach --recover onto another namespace served %s\n%s", refused.device, refused.Log())
	}
	if code := refused.cmd.ProcessState.ExitCode(); code != exitNoNamespace {
		t.Errorf("attach --recover onto another namespace exited %d, want %d\n%s", code, exitNoNamespace, refused.Log())
	}
	last := refused.lastLine()
	s.tl.add("refused: %s", last)
	if !strings.HasPrefix(last, "ublk-nvmeof: ") || !strings.Contains(last, "another namespace") || !strings.Contains(last, first.device) {
		t.Errorf("last line %q: want one error line naming %s and another namespace", last, first.device)
	}
	refused.checkClean()
	if gone(first.device) {
		t.Fatalf("%s was removed by the refused recover", first.device)
	}

	s.tl.add("namespace back: UUID %s", uuid)
	if err := s.tg.ReplaceNamespaceIdentity(uuid, nguid); err != nil {
		t.Fatal(err)
	}
	second := s.recoverFrom(first)
	s.end(second, nil, "", 0)
}

// The daemon SIGKILLed under load, the namespace's file grown meanwhile
// (no host connected: no event), then attach --recover: the same namespace
// at a new size is taken over, and the device takes the new size where
// the kernel has UPDATE_SIZE (one WARN line says it keeps its size
// otherwise); the load resumes without an error.
func TestGuestNamespaceRecoverResized(t *testing.T) {
	guest.Require(t)
	const mib = 1 << 20
	follows, _ := updateSize(t)
	s := newFileScenario(t, "ns-recover-resized", 4464, 34)
	first := startDaemon(t, s.tl, noNetns, s.attachArgs("-l", "30")...)
	s.startLoad(first.device, 23)

	s.kill(first)
	s.tl.add("namespace file grown to 12 MiB")
	if err := s.tg.ResizeFile(12 * mib); err != nil {
		t.Fatal(err)
	}
	second := s.recoverFrom(first)
	checkGrown12(t, s, second, follows)
	s.end(second, nil, "", 0)
}

// The port removed under load, the namespace's file grown while no host is
// connected (no event reaches anyone), the port back: the reconnect finds
// the same namespace at a new size and keeps the device (it used to delete
// it as another namespace); the device takes the new size where the kernel
// has UPDATE_SIZE, else keeps it with one WARN line; no I/O fails.
func TestGuestNamespaceResizedAcrossReconnect(t *testing.T) {
	guest.Require(t)
	const mib = 1 << 20
	follows, _ := updateSize(t)
	s := newFileScenario(t, "ns-resized-reconnect", 4465, 35)
	d := startDaemon(t, s.tl, noNetns, s.attachArgs("-l", "60")...)
	s.startLoad(d.device, 24)

	n := s.unlinkPort(d, "")
	d.waitLog("reconnect failed")
	s.tl.add("namespace file grown to 12 MiB; port re-added")
	if err := s.tg.ResizeFile(12 * mib); err != nil {
		t.Fatal(err)
	}
	if err := s.tg.LinkPort(); err != nil {
		t.Fatal(err)
	}
	d.waitState(n, "LIVE")
	s.resumed("the reconnect")
	checkGrown12(t, s, d, follows)
	s.end(d, nil, "", 0)
}
