package attach

import (
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestMetricsCountIO(t *testing.T) {
	m := NewMetrics("127.0.0.1:4420", "nqn.test")
	m.IOStarted(1)
	m.IOStarted(1)
	m.IODone(1, "read", 4096, 50*time.Microsecond, nil)
	if got := testutil.ToFloat64(m.inflight.WithLabelValues("1")); got != 1 {
		t.Errorf("in flight %v, want 1", got)
	}
	m.IODone(1, "write", 8192, time.Millisecond, errors.New("EIO"))
	if got := testutil.ToFloat64(m.ios.WithLabelValues("1", "read")); got != 1 {
		t.Errorf("reads %v", got)
	}
	if got := testutil.ToFloat64(m.bytes.WithLabelValues("1", "read")); got != 4096 {
		t.Errorf("read bytes %v", got)
	}
	if got := testutil.ToFloat64(m.errors.WithLabelValues("1", "write")); got != 1 {
		t.Errorf("write errors %v", got)
	}
	if got := testutil.ToFloat64(m.bytes.WithLabelValues("1", "write")); got != 0 {
		t.Errorf("failed write counted %v bytes", got)
	}
	m.SetState("LIVE")
	m.SetState("RESETTING")
	if testutil.ToFloat64(m.state.WithLabelValues("LIVE")) != 0 || testutil.ToFloat64(m.state.WithLabelValues("RESETTING")) != 1 {
		t.Error("state gauge does not follow the state")
	}
}

func TestMetricsServer(t *testing.T) {
	m := NewMetrics("127.0.0.1:4420", "nqn.test")
	m.Reconnected()
	m.KeepAliveDone(3 * time.Millisecond)
	m.HeldFrom(func() int { return 7 })
	s, err := ServeMetrics("127.0.0.1:0", m)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	c := &http.Client{Timeout: 10 * time.Second}
	defer c.CloseIdleConnections()
	resp, err := c.Get("http://" + s.Addr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`ublk_nvmeof_reconnects_total{nqn="nqn.test",target="127.0.0.1:4420"} 1`,
		`ublk_nvmeof_keep_alive_rtt_seconds{nqn="nqn.test",target="127.0.0.1:4420"} 0.003`,
		`ublk_nvmeof_io_held{nqn="nqn.test",target="127.0.0.1:4420"} 7`,
		"go_goroutines",
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	// The metrics listener serves metrics only: no profiles, no command
	// line, whatever the path.
	for _, path := range []string{"/debug/pprof/", "/debug/pprof/goroutine?debug=1", "/debug/pprof/cmdline", "/"} {
		resp, err := c.Get("http://" + s.Addr() + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound {
			t.Errorf("%s on the metrics listener: %s\n%.200s", path, resp.Status, body)
		}
	}
}

func TestPprofServer(t *testing.T) {
	s, err := ServePprof("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	c := &http.Client{Timeout: 10 * time.Second}
	defer c.CloseIdleConnections()
	resp, err := c.Get("http://" + s.Addr() + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "goroutine profile:") {
		t.Errorf("/debug/pprof/goroutine: %s\n%.200s", resp.Status, body)
	}
	resp, err = c.Get("http://" + s.Addr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("/metrics on the profiling listener: %s", resp.Status)
	}
}

func TestPprofListenAddr(t *testing.T) {
	for in, want := range map[string]string{
		"6060":           "127.0.0.1:6060",
		":6060":          "127.0.0.1:6060",
		"127.0.0.1:6060": "127.0.0.1:6060",
		"127.0.0.2:6060": "127.0.0.2:6060",
		"[::1]:6060":     "[::1]:6060",
		"localhost:6060": "localhost:6060",
	} {
		if got, err := PprofListenAddr(in); err != nil || got != want {
			t.Errorf("PprofListenAddr(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"0.0.0.0:6060", "[::]:6060", "192.0.2.1:6060", "example.com:6060", "127.0.0.1", "127.0.0.1:http-alt", "70000", ""} {
		if got, err := PprofListenAddr(in); !errors.Is(err, ErrInvalidOptions) || !strings.Contains(err.Error(), "--pprof-addr") {
			t.Errorf("PprofListenAddr(%q) = %q, %v; want an ErrInvalidOptions naming --pprof-addr", in, got, err)
		}
	}
}
