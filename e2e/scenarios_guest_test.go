package e2e

// The hot-remove scenarios (issue 7): the real daemon against the Linux
// nvmet-tcp target in the VM, each fault injected under a mixed load whose
// every acknowledged write is checked at the end through the ublk device
// (when it still exists), through the kernel's own nvme-tcp initiator, and
// on the RAM disk itself. Each prints its timeline. The harness fails a test
// during which the kernel logged a WARNING, BUG, Oops or hung task; each
// scenario checks the daemon's exit status and that it did not panic, and
// where it survives the fault, that it runs no more goroutines afterwards
// than before (the metrics' go_goroutines).
//
// Run them alone (one VM boot, about 6 minutes under TCG, most of it the
// attach/detach cycles of g):
//
//	E2E_PACKAGES=./e2e E2E_RUN='^TestGuestScenario' go test -count=1 -v -run TestVM ./e2e/
//
// and g longer: E2E_SOAK_CYCLES=1000 go test -count=1 -v -run TestScenarioSoak ./e2e/

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/load"
)

func scenarioNQN(name string) string { return "nqn.2026-11.io.ublk-nvmeof:scenario-" + name }

// Exit statuses of ublk-nvmeof (cmd/ublk-nvmeof).
const exitControllerLost = 8

// noNetns runs the daemon in this network namespace.
var noNetns = netns.None()

// daemonGoroutines reads the daemon's goroutine count, failing t.
func daemonGoroutines(t *testing.T, addr string) int {
	t.Helper()
	var n int
	var err error
	// The metrics server may need a moment after the device is ready.
	waitUntil(t, "daemon metrics at "+addr, func() bool {
		n, err = goroutines(addr)
		return err == nil
	})
	return n
}

// a. Detach (SIGTERM) under load: in-flight I/O completes or fails with
// EIO, the device disappears, the target sees the host disconnect, nothing
// hangs.
func TestGuestScenarioDetachUnderLoad(t *testing.T) {
	guest.Require(t)
	s := newScenario(t, guest.TargetOptions{NQN: scenarioNQN("detach"), Device: "/dev/ram0", Port: 4440, PortID: 10})
	d := startDaemon(t, s.tl, noNetns, s.attachArgs("-l", "5")...)
	if n := targetConnections(t, s.opts.Port); n == 0 {
		t.Fatalf("the target has no connection on port %d while attached", s.opts.Port)
	}
	s.startLoad(d.device, 1)

	s.tl.add("FAULT: SIGTERM (detach) under load")
	d.signal(syscall.SIGTERM)
	waitUntil(t, d.device+" removed", func() bool { return gone(d.device) })
	s.tl.add("%s removed", d.device)
	// The device is deleted only once nobody holds it open: the load's
	// file is closed here, failed I/Os included.
	s.finishLoad(errorsOfRemoval)
	if code := d.wait(); code != 0 {
		t.Errorf("the daemon exited %d after SIGTERM, want 0\n%s", code, d.Log())
	}
	d.checkClean()
	waitUntil(t, "the target to see the host disconnect", func() bool { return targetConnections(t, s.opts.Port) == 0 })
	s.tl.add("target: no connection left on port %d", s.opts.Port)
	if devs := ublkDevices(t); len(devs) != 0 {
		t.Errorf("ublk devices left: %v", devs)
	}
	s.verifyBehindTarget()
}

// b. The target's port removed under load and re-added before
// ctrl_loss_tmo: I/O resumes, nothing is lost, no I/O fails.
func TestGuestScenarioPortReadded(t *testing.T) {
	guest.Require(t)
	s := newScenario(t, guest.TargetOptions{NQN: scenarioNQN("port-readded"), Device: "/dev/ram0", Port: 4441, PortID: 11})
	const metrics = "127.0.0.1:9441"
	d := startDaemon(t, s.tl, noNetns, s.attachArgs("-l", "60", "--metrics-addr", metrics)...)
	baseline := daemonGoroutines(t, metrics)
	s.startLoad(d.device, 2)

	n := s.unlinkPort(d, "")
	s.tl.addAt(s.l.LastSuccess(), "last I/O completed before the stall")
	// Re-add only once the daemon found the port gone.
	d.waitLog("reconnect failed")
	s.tl.add("port re-added")
	if err := s.tg.LinkPort(); err != nil {
		t.Fatal(err)
	}
	d.waitState(n, "LIVE")
	s.resumed("the reconnect")

	s.end(d, nil, metrics, baseline)
}

// c. The port removed for good: after ctrl_loss_tmo held I/O fails with
// EIO, the device is removed, the daemon exits non-zero with a clear
// message.
func TestGuestScenarioPortRemoved(t *testing.T) {
	guest.Require(t)
	s := newScenario(t, guest.TargetOptions{NQN: scenarioNQN("port-removed"), Device: "/dev/ram0", Port: 4442, PortID: 12})
	d := startDaemon(t, s.tl, noNetns, s.attachArgs("-l", "3")...)
	s.startLoad(d.device, 3)

	n := s.unlinkPort(d, ", for good")
	s.tl.addAt(s.l.LastSuccess(), "last I/O completed before the stall")
	d.waitState(n, "DELETING")
	waitUntil(t, d.device+" removed", func() bool { return gone(d.device) })
	s.tl.add("%s removed", d.device)
	st := s.finishLoad(errorsOfRemoval)
	if st.WritesFailed+st.ReadsFailed == 0 {
		t.Errorf("no I/O failed although the controller was lost under load: %v", st)
	}
	if code := d.wait(); code != exitControllerLost {
		t.Errorf("the daemon exited %d, want %d (controller lost)\n%s", code, exitControllerLost, d.Log())
	}
	if last := d.lastLine(); !strings.HasPrefix(last, "ublk-nvmeof: ") || !strings.Contains(last, "controller lost") {
		t.Errorf("the daemon's last line is %q, want its error saying the controller was lost", last)
	}
	s.tl.add("daemon said: %s", d.lastLine())
	d.checkClean()
	if devs := ublkDevices(t); len(devs) != 0 {
		t.Errorf("ublk devices left: %v", devs)
	}
	// The data behind the target: every acknowledged write is there.
	if err := s.tg.LinkPort(); err != nil {
		t.Fatal(err)
	}
	s.verifyBehindTarget()
}

// d. The namespace disabled on the target under load is now held, not
// failed, while it is away: TestGuestNamespaceDisabledBriefly
// (namespace_guest_test.go).

// Network namespace and veth pair for the link cut: the daemon runs in a
// namespace of its own; the target stays in the initial one (nvmet-tcp
// listens there).
const (
	vethTarget = "ublkt0" // in the initial namespace
	vethHost   = "ublkh0" // in the daemon's
	targetIP   = "10.99.0.1"
	hostIP     = "10.99.0.2"
)

// newHostNetns creates a network namespace joined to this one by a veth
// pair (targetIP here, hostIP there, both up) and returns it with the
// target-side link. Both go when t ends.
func newHostNetns(t *testing.T) (netns.NsHandle, netlink.Link) {
	t.Helper()
	type res struct {
		ns  netns.NsHandle
		err error
	}
	ch := make(chan res, 1)
	go func() {
		// netns.New switches the calling thread; it is never unlocked, so
		// it dies with this goroutine instead of serving others.
		runtime.LockOSThread()
		ns, err := netns.New()
		ch <- res{ns, err}
	}()
	r := <-ch
	if r.err != nil {
		t.Fatalf("new network namespace: %v", r.err)
	}
	ns := r.ns
	t.Cleanup(func() { ns.Close() })

	// Route sockets only: a handle for every family fails on a kernel
	// without some of them (EPROTONOSUPPORT).
	here, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatalf("netlink: %v", err)
	}
	defer here.Close()
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: vethTarget}, PeerName: vethHost, PeerNamespace: netlink.NsFd(int(ns))}
	if err := here.LinkAdd(veth); err != nil {
		t.Fatalf("veth: %v", err)
	}
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(vethTarget); err == nil {
			_ = netlink.LinkDel(l)
		}
	})
	link, err := here.LinkByName(vethTarget)
	if err != nil {
		t.Fatalf("veth: %v", err)
	}
	addr := func(h *netlink.Handle, l netlink.Link, ip string) {
		t.Helper()
		a, err := netlink.ParseAddr(ip + "/24")
		if err != nil {
			t.Fatal(err)
		}
		if err := h.AddrAdd(l, a); err != nil {
			t.Fatalf("address %s on %s: %v", ip, l.Attrs().Name, err)
		}
		if err := h.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	addr(here, link, targetIP)
	there, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatalf("netlink in the host namespace: %v", err)
	}
	defer there.Close()
	hl, err := there.LinkByName(vethHost)
	if err != nil {
		t.Fatal(err)
	}
	addr(there, hl, hostIP)
	lo, err := there.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := there.LinkSetUp(lo); err != nil {
		t.Fatal(err)
	}
	return ns, link
}

// e. The link cut: the daemon in its own network namespace, joined to the
// target by a veth pair; the link goes down under load (no FIN, no RST: the
// packets vanish) and comes back. The daemon notices by keep-alive timeout,
// reconnects once the link is up, and no I/O fails or is lost.
func TestGuestScenarioLinkCut(t *testing.T) {
	guest.Require(t)
	ns, link := newHostNetns(t)
	s := newScenario(t, guest.TargetOptions{NQN: scenarioNQN("link-cut"), Device: "/dev/ram0", Addr: targetIP, Port: 4444, PortID: 14})
	metrics := net.JoinHostPort(hostIP, "9444") // reachable through the veth
	d := startDaemon(t, s.tl, ns, s.attachArgs("-l", "120", "--metrics-addr", metrics)...)
	baseline := daemonGoroutines(t, metrics)
	s.startLoad(d.device, 5)

	n := d.nStates()
	s.tl.add("FAULT: link %s down", vethTarget)
	if err := netlink.LinkSetDown(link); err != nil {
		t.Fatal(err)
	}
	det := d.waitState(n, "RESETTING")
	s.tl.addAt(s.l.LastSuccess(), "last I/O completed before the stall")
	// The keep-alive timeout is reported by the keeper ("keep-alive did
	// not complete within KATO") or, when its timer fires first, by the
	// admin queue timing the Keep Alive command (opcode 0x18) out.
	if !strings.Contains(det.reason, "keep-alive") && !strings.Contains(det.reason, "opcode 0x18") {
		t.Errorf("the link cut was detected by %q, want the keep-alive timeout", det.reason)
	}
	d.waitState(n, "CONNECTING")
	s.tl.add("link %s up", vethTarget)
	if err := netlink.LinkSetUp(link); err != nil {
		t.Fatal(err)
	}
	d.waitState(n, "LIVE")
	s.resumed("the link came back")

	s.end(d, nil, metrics, baseline)
}

// e, faster: with the link watch the same cut is noticed when the link goes
// down, not a keep-alive timeout later, and the link coming back ends the
// wait for the next reconnect attempt: with a reconnect delay of 60 s the
// daemon reconnects as the link comes up (attach --link-watch).
func TestGuestScenarioLinkCutLinkWatch(t *testing.T) {
	guest.Require(t)
	ns, link := newHostNetns(t)
	s := newScenario(t, guest.TargetOptions{NQN: scenarioNQN("link-watch"), Device: "/dev/ram0", Addr: targetIP, Port: 4445, PortID: 15})
	// A long keep-alive timeout: detection within it is the link watch's.
	d := startDaemon(t, s.tl, ns, "-a", targetIP, "-s", "4445", "-n", s.opts.NQN, "-i", "2",
		"-k", "30", "-c", "60", "-l", "120", "--link-watch")
	s.startLoad(d.device, 6)
	n := d.nStates()
	s.tl.add("FAULT: link %s down", vethTarget)
	if err := netlink.LinkSetDown(link); err != nil {
		t.Fatal(err)
	}
	det := d.waitState(n, "RESETTING")
	// lifecycle.ErrLinkDown: not a keep-alive or command timeout.
	if !strings.Contains(det.reason, "link to target down") {
		t.Errorf("detected by %q, want the link watch\n%s", det.reason, d.Log())
	}
	if strings.Contains(d.Log(), "link watch stopped") {
		t.Errorf("the link watch stopped\n%s", d.Log())
	}
	d.waitState(n, "CONNECTING")
	if err := netlink.LinkSetUp(link); err != nil {
		t.Fatal(err)
	}
	s.tl.add("link %s up", vethTarget)
	d.waitState(n, "LIVE")
	// Not a time: the daemon says why it reconnected before the delay.
	if !strings.Contains(d.Log(), "path to the target is back: reconnecting now") {
		t.Errorf("the daemon reconnected without the link watch ending the reconnect delay\n%s", d.Log())
	}
	s.waitProgress(200, "after the link came back")
	s.end(d, nil, "", 0)
}

// f. The daemon SIGKILLed under load, then `attach --recover`: the load sees
// no error and the data verifies.
func TestGuestScenarioKillRecover(t *testing.T) {
	guest.Require(t)
	s := newScenario(t, guest.TargetOptions{NQN: scenarioNQN("kill"), Device: "/dev/ram0", Port: 4446, PortID: 16})
	first := startDaemon(t, s.tl, noNetns, s.attachArgs("-l", "30")...)
	s.startLoad(first.device, 7)

	s.kill(first)
	s.tl.addAt(s.l.LastSuccess(), "last I/O completed before the stall")
	if gone(first.device) {
		t.Fatalf("%s disappeared with the daemon: user recovery should keep it", first.device)
	}
	second := s.recoverFrom(first)

	s.end(second, nil, "", 0)
}

// h. The target torn down and rebuilt (the subsystem recreated) under load.
// With the same namespace identity the daemon reconnects and nothing is
// lost; with another UUID it must not resume I/O onto what is now another
// namespace: the device is removed and the daemon exits non-zero.
func TestGuestScenarioTargetRebuiltSameNamespace(t *testing.T) {
	guest.Require(t)
	testTargetRebuilt(t, true)
}

func TestGuestScenarioTargetRebuiltOtherNamespace(t *testing.T) {
	guest.Require(t)
	testTargetRebuilt(t, false)
}

const (
	nsUUID      = "6b1e2f5c-7a1d-4c39-9a53-0d8f9e4c2a10"
	nsUUIDOther = "6b1e2f5c-7a1d-4c39-9a53-0d8f9e4c2a11"
	nsNGUID     = "4e564d65-6f66-2d73-6365-6e6172696f68"
)

// createTargetWithIdentity is guest.CreateTarget with the namespace's UUID
// and NGUID set before it is enabled and before the port is linked, so
// that no host ever sees it with another identity.
func createTargetWithIdentity(t *testing.T, opts guest.TargetOptions, uuid string) *guest.Target {
	t.Helper()
	const root = "/sys/kernel/config/nvmet"
	subsys := filepath.Join(root, "subsystems", opts.NQN)
	ns := filepath.Join(subsys, "namespaces", strconv.Itoa(opts.NSID))
	port := filepath.Join(root, "ports", strconv.Itoa(opts.PortID))
	tg := &guest.Target{Opts: opts}
	steps := []struct{ path, value string }{
		{subsys, ""}, {filepath.Join(subsys, "attr_allow_any_host"), "1"},
		{ns, ""}, {filepath.Join(ns, "device_path"), opts.Device},
		{filepath.Join(ns, "device_uuid"), uuid}, {filepath.Join(ns, "device_nguid"), nsNGUID},
		{filepath.Join(ns, "enable"), "1"},
		{port, ""}, {filepath.Join(port, "addr_trtype"), "tcp"}, {filepath.Join(port, "addr_adrfam"), "ipv4"},
		{filepath.Join(port, "addr_traddr"), opts.Addr}, {filepath.Join(port, "addr_trsvcid"), strconv.Itoa(opts.Port)},
	}
	for _, st := range steps {
		var err error
		if st.value == "" {
			err = os.Mkdir(st.path, 0o755)
		} else {
			err = os.WriteFile(st.path, []byte(st.value), 0)
		}
		if err != nil {
			t.Fatalf("nvmet: %s %q: %v (cleanup: %v)", st.path, st.value, err, tg.Remove())
		}
	}
	if err := tg.LinkPort(); err != nil {
		t.Fatalf("%v (cleanup: %v)", err, tg.Remove())
	}
	return tg
}

func testTargetRebuilt(t *testing.T, same bool) {
	name, port, portID := "rebuilt-same", 4447, 17
	if !same {
		name, port, portID = "rebuilt-other", 4448, 18
	}
	opts := guest.TargetOptions{NQN: scenarioNQN(name), Device: "/dev/ram0", Addr: "127.0.0.1", Port: port, PortID: portID, NSID: 1}
	checkNoLeaks(t)
	t.Setenv("UBLK_NVMEOF_RUN_DIR", t.TempDir())
	s := &scenario{t: t, tl: newTimeline(), opts: opts}
	t.Cleanup(func() { t.Logf("timeline:\n%s", s.tl) })
	if err := load.Zero(opts.Device, 0, scenarioBlocks, true); err != nil {
		t.Fatal(err)
	}
	s.tg = createTargetWithIdentity(t, opts, nsUUID)
	t.Cleanup(func() {
		if err := s.tg.Remove(); err != nil {
			t.Errorf("remove target: %v", err)
		}
	})
	s.tl.add("target %s: %s, namespace UUID %s", opts.NQN, opts.Device, nsUUID)
	const metrics = "127.0.0.1:9447"
	args := s.attachArgs("-l", "60")
	if same {
		args = append(args, "--metrics-addr", metrics)
	}
	d := startDaemon(t, s.tl, noNetns, args...)
	baseline := 0
	if same {
		baseline = daemonGoroutines(t, metrics)
	}
	s.startLoad(d.device, 8)

	n := d.nStates()
	s.tl.add("FAULT: target torn down (port, namespace, subsystem)")
	if err := s.tg.Remove(); err != nil {
		t.Fatal(err)
	}
	d.waitState(n, "RESETTING")
	s.tl.addAt(s.l.LastSuccess(), "last I/O completed before the stall")
	d.waitLog("reconnect failed")
	uuid := nsUUID
	if !same {
		uuid = nsUUIDOther
	}
	s.tl.add("target rebuilt: the same subsystem NQN, namespace UUID %s", uuid)
	s.tg = createTargetWithIdentity(t, opts, uuid)

	if same {
		d.waitState(n, "LIVE")
		s.tl.addAt(s.waitProgress(200, "after the target was rebuilt"), "I/O resumed (the first I/O completed after the rebuild)")
		s.end(d, nil, metrics, baseline)
		return
	}
	d.waitState(n, "DELETING")
	waitUntil(t, d.device+" removed", func() bool { return gone(d.device) })
	s.tl.add("%s removed", d.device)
	s.finishLoad(errorsOfRemoval)
	if code := d.wait(); code != exitControllerLost {
		t.Errorf("the daemon exited %d, want %d\n%s", code, exitControllerLost, d.Log())
	}
	if last := d.lastLine(); !strings.Contains(last, "namespace changed") {
		t.Errorf("the daemon's last line is %q, want it to say the namespace changed", last)
	}
	s.tl.add("daemon said: %s", d.lastLine())
	d.checkClean()
	// What was acknowledged before the teardown is on the RAM disk.
	s.verifyBehindTarget()
}

// g. The seed's race at scale: attach -> load -> detach cycles with a
// keep-alive timeout of 1 s, each detach timed to land on a keep-alive.
// Short mode (CI): 200 cycles with a tiny load, as two tests of 100 (a
// cycle takes about 1.3 s under TCG, and the VM harness gives a test 5
// minutes); the second sweeps the offsets halfway between the first's.
// UBLK_NVMEOF_E2E_SOAK_CYCLES sets the cycles of each (TestScenarioSoak).
func TestGuestScenarioDetachCycles1(t *testing.T) {
	guest.Require(t)
	testDetachCycles(t, 1)
}

func TestGuestScenarioDetachCycles2(t *testing.T) {
	guest.Require(t)
	testDetachCycles(t, 2)
}

func testDetachCycles(t *testing.T, part int) {
	n := 100
	if v := os.Getenv(envSoakCycles); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil {
			t.Fatalf("%s=%q: %v", envSoakCycles, v, err)
		}
	}
	checkNoLeaks(t)
	t.Setenv("UBLK_NVMEOF_RUN_DIR", t.TempDir())
	opts := guest.TargetOptions{NQN: scenarioNQN(fmt.Sprintf("cycles-%d", part)), Device: "/dev/ram1", Port: 4459 + part, PortID: 19 + part}
	tg := guest.NewTarget(t, opts)
	opts = tg.Opts
	const blocks = 64 // 256 KiB
	c := &cycles{capture: startKACapture(t, opts.Port)}
	start := time.Now()
	var last *load.Load
	for i := 0; i < n; i++ {
		tl := newTimeline()
		offset := time.Duration(i%15)*300*time.Microsecond - time.Millisecond
		if part == 2 {
			offset += 150 * time.Microsecond
		}
		if !c.cycle(t, tl, tg, part*1000+i, blocks, offset, &last) {
			t.Logf("cycle %d failed; its timeline:\n%s", i, tl)
			return
		}
		if i%50 == 49 {
			t.Logf("%d cycles in %v (%v)", i+1, time.Since(start).Round(time.Millisecond), c)
		}
	}
	t.Logf("%d attach -> load -> detach cycles in %v, each detach aimed at a keep-alive seen on the wire (offsets -1..+3.35 ms): %v",
		n, time.Since(start).Round(time.Millisecond), c)
	// The last cycle's data through the kernel initiator too.
	kc, err := guest.ConnectKernel(tg)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := kc.Disconnect(); err != nil {
			t.Error(err)
		}
	}()
	if err := waitOpenable(kc.NamespaceDevice(opts.NSID)); err != nil {
		t.Fatal(err)
	}
	if rep, err := last.Verify(kc.NamespaceDevice(opts.NSID)); err != nil {
		t.Errorf("the last cycle's data through the kernel initiator: %v", err)
	} else {
		t.Logf("the last cycle's data verified through the kernel initiator: %v", rep)
	}
}

const envSoakCycles = "UBLK_NVMEOF_E2E_SOAK_CYCLES"

// detachCycle is one cycle of TestGuestScenarioDetachCycles; it reports
// whether t is still fine.
// cycles is the state of the detach cycles: the keep-alive capture, the
// keep-alive period found on the wire, and what the cycles did.
type cycles struct {
	capture *kaCapture
	period  time.Duration // 0 until measured

	n, inFlight, unseen  int             // cycles; detaches that landed on a keep-alive in flight; cycles with no keep-alive seen to aim at
	sentAfter            int             // cycles where a keep-alive went out within 20 ms after SIGTERM
	corr                 time.Duration   // aim correction learnt from the cycles so far
	cutOff               int             // keep-alives near a SIGTERM that the teardown cut off before their response
	atTeardown           int             // cycles where a keep-alive may have been in flight as the teardown began
	offsets              []time.Duration // of the keep-alive nearest to each SIGTERM, from it
	rtt                  time.Duration   // the longest keep-alive round trip seen
	attach, io, aim, end time.Duration   // time spent in each phase
}

func (c *cycles) String() string {
	o := slices.Clone(c.offsets)
	slices.Sort(o)
	spread := "none"
	if len(o) > 0 {
		spread = fmt.Sprintf("min %v, median %v, max %v", o[0], o[len(o)/2], o[len(o)-1])
	}
	return fmt.Sprintf("%d of %d detaches landed while a keep-alive was in flight, %d just before one went out (within 20 ms); "+
		"in %d the teardown began (LIVE -> DELETING, logged to the millisecond) while a keep-alive may have been in flight; %d keep-alives cut off by the teardown before their response; "+
		"nearest keep-alive after SIGTERM: %s; aim correction %v; longest keep-alive round trip %v, period %v, %d cycles without a keep-alive to aim at; "+
		"time in attach %v, load and read-back %v, aiming %v, detach and checks %v",
		c.inFlight, c.n, c.sentAfter, c.atTeardown, c.cutOff, spread, c.corr, c.rtt, c.period, c.unseen,
		c.attach.Round(time.Millisecond), c.io.Round(time.Millisecond), c.aim.Round(time.Millisecond), c.end.Round(time.Millisecond))
}

// cycle is one attach -> load -> detach; it reports whether t is still
// fine.
func (c *cycles) cycle(t *testing.T, tl *timeline, tg *guest.Target, i, blocks int, offset time.Duration, last **load.Load) bool {
	t.Helper()
	opts := tg.Opts
	mark := time.Now()
	phase := func(d *time.Duration) {
		now := time.Now()
		*d += now.Sub(mark)
		mark = now
	}
	if err := load.Zero(opts.Device, 0, blocks, true); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, tl, noNetns, "-a", opts.Addr, "-s", strconv.Itoa(opts.Port), "-n", opts.NQN,
		"-i", "2", "-k", "1", "-c", "1", "-l", "3")
	phase(&c.attach)
	l, err := load.Start(load.Config{Path: d.device, Blocks: blocks, RandomJobs: 1, SequentialJobs: 1,
		ReadPercent: 30, MaxIOBlocks: 4, Direct: true, Run: uint64(1000000 + i)})
	if err != nil {
		t.Fatal(err)
	}
	*last = l
	deadline := time.Now().Add(hangTimeout)
	for l.Completed() < 20 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	st := l.Stop()
	if st.WritesFailed+st.ReadsFailed+st.Mismatches != 0 || st.WritesAcked == 0 {
		n, errs := l.Errors()
		t.Errorf("cycle %d: load %v; %d errors %v; mismatches %v", i, st, n, errs, l.Mismatches())
		return false
	}
	if _, err := l.Verify(d.device); err != nil {
		t.Errorf("cycle %d: through the ublk device: %v", i, err)
		return false
	}
	idle := time.Now()
	phase(&c.io)

	// Aim: keep-alives go out every KATO/2, or KATO/4 with traffic-based
	// keep-alive, skipping a tick when other commands completed since the
	// previous one. Wait for the first one sent after the traffic stopped
	// and send SIGTERM so that the teardown begins one period after it
	// plus an offset the cycles sweep: just before, while, or just after
	// the next keep-alive is on the wire. c.corr learns, from the cycles
	// so far, how late the sleep wakes and how long the daemon takes from
	// the signal to the teardown.
	k1, ok := c.capture.waitAfter(idle, 3*time.Second)
	if ok && c.period == 0 {
		// The period, once, as the daemon really keeps it (each timer
		// fires a little late): the mean gap between idle keep-alives.
		var gaps []time.Duration
		for len(gaps) < 4 {
			k2, ok2 := c.capture.waitAfter(k1.sent, 3*time.Second)
			if !ok2 {
				break
			}
			gaps = append(gaps, k2.sent.Sub(k1.sent))
			k1 = k2
		}
		if len(gaps) > 0 {
			var sum time.Duration
			for _, g := range gaps {
				sum += g
			}
			c.period = sum / time.Duration(len(gaps))
			t.Logf("keep-alive gaps while idle: %v; aiming with a period of %v", gaps, c.period)
		}
	}
	at := time.Now()
	var next time.Time // when the next keep-alive is due
	if ok && c.period > 0 {
		next = k1.sent.Add(c.period)
		at = next.Add(c.corr + offset)
		time.Sleep(time.Until(at)) // timing the fault, not waiting for a condition
	} else {
		c.unseen++
	}
	phase(&c.aim)
	sigterm := time.Now()
	d.signal(syscall.SIGTERM)
	if code := d.wait(); code != 0 {
		t.Errorf("cycle %d: the daemon exited %d after SIGTERM\n%s", i, code, d.Log())
		return false
	}
	c.n++
	if k, inFlight := c.capture.inFlightAt(sigterm); inFlight {
		c.inFlight++
		tl.add("SIGTERM %v after a keep-alive was sent, before its response", sigterm.Sub(k.sent))
	}
	del, hasDel := d.firstState("DELETING")
	if hasDel && !del.logged.IsZero() && !next.IsZero() {
		// Feedback: the teardown began (logged to the millisecond: take
		// the middle) at td from when the keep-alive was due; it was
		// meant to begin at offset. Correct half the error. (Against
		// the due time, not the keep-alive seen: a teardown that began
		// first stopped it from being sent at all.)
		began := del.logged.Add(500 * time.Microsecond)
		if td := began.Sub(next); absDuration(td) < 100*time.Millisecond {
			c.corr -= (td - offset) / 2
		}
	}
	if k, ok := c.capture.nearest(sigterm); ok {
		d := k.sent.Sub(sigterm)
		c.offsets = append(c.offsets, d)
		if d > 0 && d < 20*time.Millisecond {
			// The keep-alive went out after the signal, while the daemon
			// was beginning its teardown.
			c.sentAfter++
		}
	}
	// The teardown began at the daemon's LIVE -> DELETING, which it logged
	// with millisecond precision and the test read a moment later: a
	// keep-alive sent before the line arrived and not answered before the
	// logged time may have been in flight when keep-alive was stopped.
	c.capture.mu.Lock()
	for _, k := range c.capture.kas {
		if hasDel && !del.logged.IsZero() && k.sent.Before(del.at) && (k.answered.IsZero() || k.answered.After(del.logged)) {
			c.atTeardown++
			tl.add("a keep-alive (sent %v after SIGTERM) may have been in flight as the teardown began", k.sent.Sub(sigterm))
			break
		}
	}
	for _, k := range c.capture.kas {
		if !k.answered.IsZero() {
			c.rtt = max(c.rtt, k.answered.Sub(k.sent))
		} else if k.sent.After(sigterm.Add(-20 * time.Millisecond)) {
			// Never answered: the teardown shut the admin queue down
			// while this keep-alive was in flight, the seed's race.
			c.cutOff++
			tl.add("a keep-alive sent %v after SIGTERM was cut off by the teardown", k.sent.Sub(sigterm))
		}
	}
	c.capture.kas = nil // this cycle's are done with
	c.capture.mu.Unlock()
	d.checkClean()
	if !gone(d.device) {
		t.Errorf("cycle %d: %s still there after the daemon exited", i, d.device)
		return false
	}
	waitUntil(t, fmt.Sprintf("cycle %d: the target to see the host disconnect", i), func() bool {
		return targetConnections(t, opts.Port) == 0
	})
	if _, err := l.Verify(opts.Device); err != nil {
		t.Errorf("cycle %d: on the RAM disk: %v", i, err)
		return false
	}
	phase(&c.end)
	return !t.Failed()
}
