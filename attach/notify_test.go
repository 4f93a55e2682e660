package attach

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle"
	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle/nvmeofconn"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
)

// notifyListener is a real NOTIFY_SOCKET, as systemd opens one for a
// Type=notify service.
func notifyListener(t *testing.T) *net.UnixConn {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	t.Setenv("NOTIFY_SOCKET", path)
	return conn
}

func readMsg(t *testing.T, c *net.UnixConn) string {
	t.Helper()
	buf := make([]byte, 4096)
	if err := c.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("no notification: %v", err)
	}
	return string(buf[:n])
}

func TestNotifyReadyStatusStopping(t *testing.T) {
	l := notifyListener(t)
	var n ServiceNotifier
	if err := n.Ready("/dev/ublkb3", "LIVE"); err != nil {
		t.Fatal(err)
	}
	if got := readMsg(t, l); got != "READY=1\nSTATUS=serving /dev/ublkb3, controller LIVE" {
		t.Errorf("ready: %q", got)
	}
	if err := n.Status("controller RESETTING"); err != nil {
		t.Fatal(err)
	}
	if got := readMsg(t, l); got != "STATUS=controller RESETTING" {
		t.Errorf("status: %q", got)
	}
	if err := n.Stopping(); err != nil {
		t.Fatal(err)
	}
	if got := readMsg(t, l); got != "STOPPING=1" {
		t.Errorf("stopping: %q", got)
	}
}

func TestNotifyWithoutSystemdIsQuiet(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	os.Unsetenv("NOTIFY_SOCKET")
	var n ServiceNotifier
	if err := n.Ready("/dev/ublkb0", "LIVE"); err != nil {
		t.Fatal(err)
	}
	if err := n.Watchdog(context.Background(), func(context.Context) bool { return true }); err != nil {
		t.Fatal(err)
	}
}

// TestWatchdogOnlyWhileHealthy: pings flow while healthy, stop while the
// health check fails (a wedged lifecycle misses the watchdog), resume after.
func TestWatchdogOnlyWhileHealthy(t *testing.T) {
	l := notifyListener(t)
	t.Setenv("WATCHDOG_USEC", strconv.Itoa(int((20 * time.Millisecond).Microseconds())))
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))

	var mu sync.Mutex
	healthy := true
	checks := make(chan bool, 1000)
	ctx, cancel := context.WithCancel(context.Background())
	var n ServiceNotifier
	done := make(chan error, 1)
	go func() {
		done <- n.Watchdog(ctx, func(context.Context) bool {
			mu.Lock()
			defer mu.Unlock()
			select {
			case checks <- healthy:
			default: // the test stopped counting
			}
			return healthy
		})
	}()
	if got := readMsg(t, l); got != "WATCHDOG=1" {
		t.Fatalf("first ping: %q", got)
	}

	mu.Lock()
	healthy = false
	mu.Unlock()
	// Wait until several unhealthy checks ran, then nothing may have been
	// sent since: drain what was queued before the switch, then expect
	// silence across three unhealthy checks.
	for unhealthy := 0; unhealthy < 3; {
		if !<-checks {
			unhealthy++
		}
	}
	buf := make([]byte, 64)
	for {
		_ = l.SetReadDeadline(time.Now())
		if _, err := l.Read(buf); err != nil {
			break
		}
	}
	for unhealthy := 0; unhealthy < 3; {
		if !<-checks {
			unhealthy++
		}
	}
	_ = l.SetReadDeadline(time.Now())
	if nr, err := l.Read(buf); err == nil {
		t.Fatalf("watchdog pinged while unhealthy: %q", buf[:nr])
	}

	mu.Lock()
	healthy = true
	mu.Unlock()
	if got := readMsg(t, l); !strings.HasPrefix(got, "WATCHDOG=1") {
		t.Fatalf("after recovery: %q", got)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestWatchdogStopsWhileSupervisorIsWedged: the watchdog is fed from the
// lifecycle supervisor's own answer. A real controller, against the
// in-process target, whose recovery teardown is wedged at one step (as a
// bug would wedge it) stops the pings; they resume once it moves on and
// the controller is LIVE again.
func TestWatchdogStopsWhileSupervisorIsWedged(t *testing.T) {
	const nqn = "nqn.2026-11.io.ublk-nvmeof:watchdog"
	tg, _, o := startMemoryTarget(t, nqn)
	wedged, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	lopts := rigLifecycleOptions(quietLogger())
	lopts.TeardownHook = func(s lifecycle.Step, done bool) {
		if s == lifecycle.StepWaitCompletions && !done {
			once.Do(func() {
				close(wedged)
				<-release
			})
		}
	}
	lc, err := lifecycle.New(&nvmeofconn.Connector{
		Config: nvmeof.ControllerConfig{
			Addr: o.Addr(), SubsysNQN: nqn,
			Host:     nvmeof.HostIdentity{NQN: "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000003"},
			IOQueues: 1, QueueSize: 32, KATO: 5 * time.Second,
			Logger: quietLogger(),
		},
		NSID: 1,
	}, lopts)
	if err != nil {
		t.Fatal(err)
	}
	if err := lc.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer lc.Delete()
	var releaseOnce sync.Once
	unwedge := func() { releaseOnce.Do(func() { close(release) }) }
	defer unwedge() // before Delete, which waits for the supervisor

	l := notifyListener(t)
	t.Setenv("WATCHDOG_USEC", strconv.Itoa(int((20 * time.Millisecond).Microseconds())))
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	// Count every WATCHDOG=1 as it arrives (an unread datagram socket
	// would soon block the sender).
	var pings atomic.Int64
	firstPing := make(chan struct{})
	var reader sync.WaitGroup
	reader.Add(1)
	go func() {
		defer reader.Done()
		buf := make([]byte, 64)
		for {
			n, err := l.Read(buf)
			if err != nil {
				return // closed
			}
			if string(buf[:n]) == "WATCHDOG=1" && pings.Add(1) == 1 {
				close(firstPing)
			}
		}
	}()
	defer func() {
		l.Close()
		reader.Wait()
	}()

	health := newSupervisorHealth(lc, quietLogger())
	checks := make(chan bool, 1000)
	ctx, cancel := context.WithCancel(context.Background())
	var n ServiceNotifier
	done := make(chan error, 1)
	go func() {
		done <- n.Watchdog(ctx, func(ctx context.Context) bool {
			ok := health.check(ctx)
			select {
			case checks <- ok:
			default: // the test stopped counting
			}
			return ok
		})
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	<-firstPing

	tg.DropConnections() // recovery starts, and its teardown wedges
	<-wedged
	// Every check from here fails. Once three have, whatever was sent
	// before is counted; across three more, nothing may be sent.
	unhealthyChecks := func() {
		t.Helper()
		healthy := 0
		for unhealthy := 0; unhealthy < 3; {
			if !<-checks {
				unhealthy++
			} else if healthy++; healthy > 50 {
				t.Fatalf("the health check passes while the supervisor is wedged in teardown (%v)", lc.State())
			}
		}
	}
	unhealthyChecks()
	before := pings.Load()
	unhealthyChecks()
	if after := pings.Load(); after != before {
		t.Fatalf("watchdog pinged %d times while the supervisor was wedged in teardown (%v)", after-before, lc.State())
	}

	unwedge()
	for pings.Load() == before {
		if !<-checks {
			continue // still in teardown, or reconnecting
		}
	}
}

// TestObserveDeletingSaysStopping: a controller that deletes itself
// (ctrl_loss_tmo) tears down while its supervisor answers no health
// request; STOPPING=1 at DELETING ends the watchdog so that systemd does
// not SIGABRT the daemon in the middle of its teardown.
func TestObserveDeletingSaysStopping(t *testing.T) {
	l := notifyListener(t)
	r := &run{rc: RunConfig{Notifier: &ServiceNotifier{}}, status: &statusTracker{}}
	r.observe(lifecycle.Transition{To: lifecycle.StateResetting, Reason: "keep-alive timed out"})
	if got := readMsg(t, l); !strings.HasPrefix(got, "STATUS=") {
		t.Fatalf("resetting: %q", got)
	}
	r.observe(lifecycle.Transition{To: lifecycle.StateDeleting, Reason: "ctrl_loss_tmo expired"})
	if got := readMsg(t, l); !strings.HasPrefix(got, "STATUS=") || !strings.Contains(got, "DELETING") {
		t.Fatalf("deleting: %q", got)
	}
	if got := readMsg(t, l); got != "STOPPING=1" {
		t.Fatalf("after DELETING: %q, want STOPPING=1", got)
	}
}
