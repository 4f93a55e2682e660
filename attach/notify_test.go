package attach

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
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
