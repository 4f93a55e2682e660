package e2e

// Helpers of the hot-remove scenarios (scenarios_guest_test.go): the
// daemon as a child process whose log is followed, the timeline each
// scenario prints, the load and its verification through every path.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	"go.uber.org/goleak"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/load"
	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/vm"
)

// Hang detection: no step of a scenario may take longer than this. It is
// not an expectation of speed (TCG is slow), only the point where waiting
// longer says nothing more.
const hangTimeout = 90 * time.Second

// timeline collects what happened when, to print as fault -> detection ->
// recovery or removal.
type timeline struct {
	mu sync.Mutex
	t0 time.Time
	ev []tlEvent
}

type tlEvent struct {
	at   time.Time
	what string
}

func newTimeline() *timeline { return &timeline{t0: time.Now()} }

func (tl *timeline) add(format string, args ...any) time.Time {
	now := time.Now()
	tl.addAt(now, fmt.Sprintf(format, args...))
	return now
}

func (tl *timeline) addAt(at time.Time, what string) {
	tl.mu.Lock()
	defer tl.mu.Unlock()
	tl.ev = append(tl.ev, tlEvent{at, what})
}

func (tl *timeline) String() string {
	tl.mu.Lock()
	ev := append([]tlEvent(nil), tl.ev...)
	tl.mu.Unlock()
	sort.SliceStable(ev, func(i, j int) bool { return ev[i].at.Before(ev[j].at) })
	var b strings.Builder
	for _, e := range ev {
		fmt.Fprintf(&b, "  T+%8.3fs  %s\n", e.at.Sub(tl.t0).Seconds(), e.what)
	}
	return b.String()
}

// daemon is a running `ublk-nvmeof attach` whose log is followed.
type daemon struct {
	t      *testing.T
	tl     *timeline
	cmd    *exec.Cmd
	device string

	mu     sync.Mutex
	log    bytes.Buffer
	states []stateChange
	exited chan struct{} // closed once the process was waited for
	err    error         // of Wait, once exited
}

type stateChange struct {
	at       time.Time // when the line arrived
	logged   time.Time // the daemon's own timestamp
	from, to string
	reason   string
}

var (
	// The attributes the daemon adds to every line (subsys, addr) come
	// between msg and the transition's own; device comes last.
	stateLine = regexp.MustCompile(`msg="controller state"(?: [^ =]+=(?:"(?:[^"\\]|\\.)*"|\S+))*? from=(\S+) to=(\S+)(?: reason=("(?:[^"\\]|\\.)*"|\S+))?`)
	timeField = regexp.MustCompile(`^time=(\S+)`)
	levelWarn = regexp.MustCompile(`level=(WARN|ERROR)`)
)

// startDaemon runs `ublk-nvmeof attach args...` (inside network namespace
// ns when ns is open) and waits until it printed its device.
func startDaemon(t *testing.T, tl *timeline, ns netns.NsHandle, args ...string) *daemon {
	t.Helper()
	d, err := tryStartDaemon(t, tl, ns, args...)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// errAttachExited: the daemon exited before its device was ready.
var errAttachExited = errors.New("attach exited before the device was ready")

// tryStartDaemon is startDaemon for a test where the attach itself may
// fail: it returns an error wrapping errAttachExited (with the daemon,
// exited) when the daemon exits before printing its device.
func tryStartDaemon(t *testing.T, tl *timeline, ns netns.NsHandle, args ...string) (*daemon, error) {
	t.Helper()
	cmd := exec.Command(DaemonPath, append([]string{"attach"}, args...)...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	d := &daemon{t: t, tl: tl, cmd: cmd, exited: make(chan struct{})}
	if ns.IsOpen() {
		err = startInNetns(cmd, ns)
	} else {
		err = cmd.Start()
	}
	if err != nil {
		t.Fatal(err)
	}
	tl.add("daemon started: attach %s", strings.Join(args, " "))
	devCh := make(chan string, 1)
	var readers sync.WaitGroup
	readers.Add(2)
	go func() {
		defer readers.Done()
		sc := bufio.NewScanner(stdout)
		if sc.Scan() {
			devCh <- sc.Text()
		}
		close(devCh)
		_, _ = io.Copy(io.Discard, stdout)
	}()
	go func() {
		defer readers.Done()
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			d.logLine(sc.Text())
		}
	}()
	// The pipes are read to their end before Wait closes them.
	go func() {
		readers.Wait()
		err := cmd.Wait()
		d.mu.Lock()
		d.err = err
		d.mu.Unlock()
		close(d.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-d.exited:
		default:
			_ = cmd.Process.Kill()
			<-d.exited
		}
	})
	select {
	case dev, ok := <-devCh:
		if !ok {
			<-d.exited
			return d, fmt.Errorf("%w: %v\n%s", errAttachExited, d.exitErr(), d.Log())
		}
		d.device = dev
	case <-time.After(hangTimeout):
		t.Fatalf("attach did not print a device within %v\n%s", hangTimeout, d.Log())
	}
	if err := guest.WaitFor(d.device, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	tl.add("device %s ready", d.device)
	return d, nil
}

// startInNetns starts cmd in network namespace ns: the child is forked from
// a thread that entered ns. That thread is never handed back to other
// goroutines: it exits with the goroutine that locked it.
func startInNetns(cmd *exec.Cmd, ns netns.NsHandle) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // not unlocked on purpose: the thread dies with this goroutine
		if err := netns.Set(ns); err != nil {
			errc <- fmt.Errorf("setns: %w", err)
			return
		}
		errc <- cmd.Start()
	}()
	return <-errc
}

func (d *daemon) logLine(l string) {
	now := time.Now()
	d.mu.Lock()
	d.log.WriteString(l)
	d.log.WriteByte('\n')
	var logged time.Time
	if m := timeField.FindStringSubmatch(l); m != nil {
		logged, _ = time.Parse(time.RFC3339Nano, m[1])
	}
	if m := stateLine.FindStringSubmatch(l); m != nil {
		reason := m[3]
		if u, err := strconv.Unquote(reason); err == nil {
			reason = u
		}
		d.states = append(d.states, stateChange{at: now, logged: logged, from: m[1], to: m[2], reason: reason})
		d.mu.Unlock()
		d.tl.addAt(now, fmt.Sprintf("daemon: state %s -> %s (%s)", m[1], m[2], reason))
		return
	}
	d.mu.Unlock()
	if levelWarn.MatchString(l) {
		d.tl.addAt(now, "daemon: "+strings.TrimSpace(timeField.ReplaceAllString(l, "")))
	}
}

// Log is the daemon's stderr so far.
func (d *daemon) Log() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.log.String()
}

func (d *daemon) exitErr() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.err
}

func (d *daemon) firstState(to string) (stateChange, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, s := range d.states {
		if s.to == to {
			return s, true
		}
	}
	return stateChange{}, false
}

// nStates is how many state changes were seen so far: waitState(n, ...)
// then waits only for later ones.
func (d *daemon) nStates() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.states)
}

// waitState waits for a change to one of states after the first `after`
// changes, and returns it.
func (d *daemon) waitState(after int, states ...string) stateChange {
	d.t.Helper()
	s, _, err := d.awaitState(after, states...)
	if err != nil {
		d.t.Fatalf("%v\n%s", err, d.Log())
	}
	return s
}

// awaitState is waitState for goroutines other than the test's: it returns
// the change and how many changes there were up to and including it, or an
// error if the daemon exits or nothing comes within hangTimeout.
func (d *daemon) awaitState(after int, states ...string) (stateChange, int, error) {
	deadline := time.Now().Add(hangTimeout)
	for {
		d.mu.Lock()
		for i := after; i < len(d.states); i++ {
			for _, want := range states {
				if s := d.states[i]; s.to == want {
					d.mu.Unlock()
					return s, i + 1, nil
				}
			}
		}
		d.mu.Unlock()
		select {
		case <-d.exited:
			return stateChange{}, 0, fmt.Errorf("the daemon exited (%v) while waiting for state %v", d.exitErr(), states)
		default:
		}
		if time.Now().After(deadline) {
			return stateChange{}, 0, fmt.Errorf("no state change to %v within %v", states, hangTimeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitLog waits until the daemon logged a line containing s.
func (d *daemon) waitLog(s string) {
	d.t.Helper()
	deadline := time.Now().Add(hangTimeout)
	for !strings.Contains(d.Log(), s) {
		if time.Now().After(deadline) {
			d.t.Fatalf("the daemon did not log %q within %v\n%s", s, hangTimeout, d.Log())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (d *daemon) signal(sig os.Signal) {
	d.t.Helper()
	if err := d.cmd.Process.Signal(sig); err != nil {
		d.t.Fatal(err)
	}
}

// wait waits for the daemon to exit and returns its exit status (-1 for a
// signal).
func (d *daemon) wait() int {
	d.t.Helper()
	select {
	case <-d.exited:
	case <-time.After(hangTimeout):
		d.t.Fatalf("the daemon did not exit within %v\n%s", hangTimeout, d.Log())
	}
	code := d.cmd.ProcessState.ExitCode()
	d.tl.add("daemon exited: %v", d.cmd.ProcessState)
	return code
}

// checkClean fails t if the daemon's stderr shows a panic, a fatal runtime
// error or a race report.
func (d *daemon) checkClean() {
	d.t.Helper()
	l := d.Log()
	for _, bad := range []string{"panic:", "goroutine ", "fatal error:", "DATA RACE"} {
		if strings.Contains(l, bad) {
			d.t.Errorf("daemon log contains %q:\n%s", bad, l)
			return
		}
	}
}

// lastLine is the daemon's last line of stderr: its error, if it failed.
func (d *daemon) lastLine() string {
	lines := strings.Split(strings.TrimSpace(d.Log()), "\n")
	return lines[len(lines)-1]
}

// goroutines reads go_goroutines from the daemon's metrics at addr.
func goroutines(addr string) (int, error) {
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + addr + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "go_goroutines "); ok {
			return strconv.Atoi(strings.TrimSpace(v))
		}
	}
	return 0, errors.New("no go_goroutines in the metrics")
}

// checkGoroutines waits until the daemon runs no more goroutines than
// baseline (plus slack for the metrics request itself): what a recovery
// started must have ended.
func checkGoroutines(t *testing.T, tl *timeline, addr string, baseline int) {
	t.Helper()
	const slack = 2
	deadline := time.Now().Add(30 * time.Second)
	for {
		n, err := goroutines(addr)
		if err != nil {
			t.Errorf("daemon goroutines: %v", err)
			return
		}
		if n <= baseline+slack {
			tl.add("daemon goroutines: %d (baseline %d)", n, baseline)
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("daemon goroutine leak: %d goroutines, %d at the start", n, baseline)
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// targetConnections counts the established TCP connections whose local
// port is port: the target's side of its hosts' queues (this network
// namespace's view).
func targetConnections(t *testing.T, port int) int {
	t.Helper()
	n, err := established(port)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// established is targetConnections for goroutines other than the test's.
func established(port int) (int, error) {
	n := 0
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(f)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return 0, err
		}
		for _, l := range strings.Split(string(b), "\n")[1:] {
			fs := strings.Fields(l)
			if len(fs) < 4 {
				continue
			}
			_, p, _ := strings.Cut(fs[1], ":")
			lp, err := strconv.ParseUint(p, 16, 16)
			if err == nil && int(lp) == port && fs[3] == "01" { // TCP_ESTABLISHED
				n++
			}
		}
	}
	return n, nil
}

// waitUntil polls cond until it holds, failing t after hangTimeout.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(hangTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, hangTimeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// gone reports whether path does not exist.
func gone(path string) bool {
	_, err := os.Stat(path)
	return errors.Is(err, os.ErrNotExist)
}

// scenario is one hot-remove scenario: a Linux nvmet-tcp target on a RAM
// disk, the daemon, the load, and the timeline.
type scenario struct {
	t    *testing.T
	tl   *timeline
	tg   *guest.Target
	opts guest.TargetOptions
	lcfg load.Config
	l    *load.Load
}

// Sizes: a few MiB, so that TCG gets through them in seconds.
const (
	scenarioBlocks = 1024 // 4 MiB
	scenarioMaxIO  = 8    // 32 KiB
)

// newScenario zeroes the region on the RAM disk (the state the load
// starts from) and creates the target exporting it.
func newScenario(t *testing.T, opts guest.TargetOptions) *scenario {
	t.Helper()
	checkNoLeaks(t)
	t.Setenv("UBLK_NVMEOF_RUN_DIR", t.TempDir())
	s := &scenario{t: t, tl: newTimeline(), opts: opts}
	// The timeline is printed however the test ends.
	t.Cleanup(func() { t.Logf("timeline:\n%s", s.tl) })
	if err := load.Zero(opts.Device, 0, scenarioBlocks, true); err != nil {
		t.Fatalf("zero %s: %v", opts.Device, err)
	}
	s.tg = guest.NewTarget(t, opts)
	s.opts = s.tg.Opts
	s.tl.add("target %s: %s on %s:%d", s.opts.NQN, s.opts.Device, s.opts.Addr, s.opts.Port)
	return s
}

// attachArgs are the daemon's options for this target with small timeouts
// (keep-alive 2 s, reconnect every 1 s), plus extra.
func (s *scenario) attachArgs(extra ...string) []string {
	return append([]string{"-a", s.opts.Addr, "-s", strconv.Itoa(s.opts.Port), "-n", s.opts.NQN,
		"-i", "2", "-k", "2", "-c", "1"}, extra...)
}

// startLoad starts the mixed load on dev and waits until it is well under
// way.
func (s *scenario) startLoad(dev string, run uint64) {
	s.t.Helper()
	s.lcfg = load.Config{
		Path: dev, Blocks: scenarioBlocks,
		RandomJobs: 2, SequentialJobs: 2, ReadPercent: 30, MaxIOBlocks: scenarioMaxIO,
		Direct: true, Run: run,
	}
	l, err := load.Start(s.lcfg)
	if err != nil {
		s.t.Fatal(err)
	}
	s.l = l
	s.t.Cleanup(func() { s.stopLoad() })
	s.tl.add("load started on %s: 2 random jobs (30%% reads) + 2 sequential, I/Os of 4-32 KiB over %d MiB", dev, scenarioBlocks*load.BlockSize>>20)
	s.waitProgress(200, "before the fault")
}

// waitProgress waits until n more I/Os succeeded and returns when the
// first of them did.
func (s *scenario) waitProgress(n uint64, when string) time.Time {
	s.t.Helper()
	start := s.l.Completed()
	var first time.Time
	waitUntil(s.t, fmt.Sprintf("%d I/Os to complete %s (%v)", n, when, s.l.Stats()), func() bool {
		c := s.l.Completed()
		if first.IsZero() && c > start {
			first = time.Now()
		}
		return c >= start+n
	})
	return first
}

// stopLoad stops the load, bounded as hang detection; a second call does
// nothing.
func (s *scenario) stopLoad() load.Stats {
	s.t.Helper()
	if s.l == nil {
		return load.Stats{}
	}
	done := make(chan load.Stats, 1)
	go func() { done <- s.l.Stop() }()
	select {
	case st := <-done:
		return st
	case <-time.After(hangTimeout):
		s.t.Fatalf("the load did not stop within %v: an I/O hangs (%v)", hangTimeout, s.l.Stats())
	}
	return load.Stats{}
}

// finishLoad stops the load and checks what it saw while running: no read
// found wrong data, and allowed accepts the error of every failed I/O (nil:
// no I/O may fail).
func (s *scenario) finishLoad(allowed *errorRule) load.Stats {
	s.t.Helper()
	st := s.stopLoad()
	s.tl.add("load stopped: %v", st)
	if m := s.l.Mismatches(); len(m) > 0 {
		s.t.Errorf("reads during the load returned wrong data:\n  %s", strings.Join(m, "\n  "))
	}
	n, errs := s.l.Errors()
	if n > 0 {
		s.tl.addAt(errs[0].Time, "first I/O error: "+errs[0].String())
		s.tl.addAt(errs[len(errs)-1].Time, fmt.Sprintf("I/O errors: %d in all; the last of the first %d: %s", n, len(errs), errs[len(errs)-1]))
	}
	switch {
	case allowed == nil && n > 0:
		s.t.Errorf("%d I/Os failed, none may; the first: %v", n, errs[0])
	case allowed != nil:
		if e, ok := s.l.OnlyErrors(allowed.ok); !ok {
			s.t.Errorf("an I/O failed with %v; only %s may: %v", e.Err, allowed.what, e)
		}
	}
	return st
}

// errorRule says which I/O errors a scenario accepts.
type errorRule struct {
	what string
	ok   func(error) bool
}

// errorsOfRemoval are the errors of I/O to a device being removed: EIO for
// what was in flight or held; and for what is submitted after the kernel
// marked the disk dead (its capacity is then 0), end of file on a read and
// ENOSPC on a write.
var errorsOfRemoval = &errorRule{
	what: "EIO, or EOF/ENOSPC once the disk is dead",
	ok: func(err error) bool {
		return errors.Is(err, syscall.EIO) || errors.Is(err, io.EOF) || errors.Is(err, syscall.ENOSPC)
	},
}

// verify checks every block of the region through path.
func (s *scenario) verify(path, what string) {
	s.t.Helper()
	rep, err := s.l.Verify(path)
	if err != nil {
		s.t.Errorf("verify through %s: %v", what, err)
		return
	}
	s.tl.add("data verified through %s (%s): %v", what, path, rep)
}

// verifyBehindTarget checks the data on the RAM disk itself and through
// the kernel's own nvme-tcp initiator (the target must be reachable).
func (s *scenario) verifyBehindTarget() {
	s.t.Helper()
	s.verify(s.opts.Device, "the RAM disk")
	kc, err := guest.ConnectKernel(s.tg)
	if err != nil {
		s.t.Errorf("kernel initiator: %v", err)
		return
	}
	defer func() {
		if err := kc.Disconnect(); err != nil {
			s.t.Error(err)
		}
	}()
	dev := kc.NamespaceDevice(s.opts.NSID)
	if err := waitOpenable(dev); err != nil {
		s.t.Errorf("kernel initiator: %v", err)
		return
	}
	s.verify(dev, "the kernel's nvme-tcp initiator")
}

// waitOpenable waits until a block device that just appeared can be
// opened: its node can be there a moment before the disk is (ENXIO).
func waitOpenable(dev string) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		f, err := os.Open(dev)
		if err == nil {
			return f.Close()
		}
		if !errors.Is(err, syscall.ENXIO) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// end finishes a scenario whose device served to the last: the load
// stopped and checked (allowed: the errors it may have seen), the data
// verified through the device, the daemon's goroutines back to baseline
// where it serves metrics (metrics "": it does not), then the detach and
// the data behind the target.
func (s *scenario) end(d *daemon, allowed *errorRule, metrics string, baseline int) {
	s.t.Helper()
	s.finishLoad(allowed)
	s.verify(d.device, "the ublk device")
	if metrics != "" {
		checkGoroutines(s.t, s.tl, metrics, baseline)
	}
	s.detach(d)
	s.verifyBehindTarget()
}

// resumed waits for the load's progress after what happened and records
// the first I/O completed after it.
func (s *scenario) resumed(after string) {
	s.t.Helper()
	s.tl.addAt(s.waitProgress(200, "after "+after), "I/O resumed (the first I/O completed after "+after+")")
}

// unlinkPort unlinks the subsystem from its port under d (the timeline
// says so, with note) and waits for d to reset; it returns d's state count
// from before, for the waits that follow.
func (s *scenario) unlinkPort(d *daemon, note string) int {
	s.t.Helper()
	n := d.nStates()
	s.tl.add("FAULT: subsystem unlinked from port %d%s", s.opts.PortID, note)
	if err := s.tg.UnlinkPort(); err != nil {
		s.t.Fatal(err)
	}
	d.waitState(n, "RESETTING")
	return n
}

// kill SIGKILLs d under load and waits for it to exit.
func (s *scenario) kill(d *daemon) {
	s.t.Helper()
	s.tl.add("FAULT: SIGKILL")
	d.signal(syscall.SIGKILL)
	d.wait()
}

// recoverFrom starts attach --recover after first was killed, checks that
// it takes first's device over and waits for the load to resume.
func (s *scenario) recoverFrom(first *daemon) *daemon {
	s.t.Helper()
	second := startDaemon(s.t, s.tl, noNetns, s.attachArgs("-l", "30", "--recover")...)
	if second.device != first.device {
		s.t.Fatalf("recovered %s, want %s\n%s", second.device, first.device, second.Log())
	}
	s.resumed("recovery")
	return second
}

// detach sends SIGTERM and checks a clean exit, the device gone and the
// target's connections closed.
func (s *scenario) detach(d *daemon) {
	s.t.Helper()
	s.tl.add("SIGTERM (detach)")
	d.signal(syscall.SIGTERM)
	if code := d.wait(); code != 0 {
		s.t.Errorf("the daemon exited %d after SIGTERM\n%s", code, d.Log())
	}
	if !gone(d.device) {
		s.t.Errorf("%s still exists after the daemon exited", d.device)
	}
	d.checkClean()
	waitUntil(s.t, "the target to see the host disconnect", func() bool { return targetConnections(s.t, s.opts.Port) == 0 })
	s.tl.add("target: no connection left on port %d", s.opts.Port)
}

// ublkDevices lists the ublk device nodes there are.
func ublkDevices(t *testing.T) []string {
	t.Helper()
	m, err := filepath.Glob("/dev/ublk[bc]*")
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestScenarioSoak runs the attach/detach cycles of scenario g for longer:
// E2E_SOAK_CYCLES=N (on the host) boots the VM for those two tests with N
// cycles each and a per-test timeout to match. Skipped without it.
func TestScenarioSoak(t *testing.T) {
	n := os.Getenv("E2E_SOAK_CYCLES")
	if n == "" {
		t.Skip("E2E_SOAK_CYCLES not set")
	}
	cycles, err := strconv.Atoi(n)
	if err != nil || cycles < 1 {
		t.Fatalf("E2E_SOAK_CYCLES=%q: want a number of cycles", n)
	}
	cfg := VMConfig()
	cfg.Packages = []string{"./e2e"}
	cfg.Run = "^TestGuestScenarioDetachCycles"
	cfg.Env = append(cfg.Env, envSoakCycles+"="+n)
	// About 2 s a cycle under TCG, with room to spare.
	cfg.TestTimeout = time.Duration(cycles)*3*time.Second + 5*time.Minute
	cfg.Timeout = cfg.TestTimeout + 5*time.Minute
	vm.RunT(t, cfg)
}

// checkNoLeaks fails t if goroutines it started outlive it. Registered
// first, it runs after every other cleanup (the daemon killed and waited
// for, the load stopped).
func checkNoLeaks(t *testing.T) {
	t.Helper()
	opt := goleak.IgnoreCurrent()
	t.Cleanup(func() {
		if err := goleak.Find(opt); err != nil {
			t.Errorf("goroutines left behind by the test: %v", err)
		}
	})
}
