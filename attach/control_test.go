package attach

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target/targetproc"
)

func TestMain(m *testing.M) {
	if code, ok := targetproc.ServeIfChild(); ok {
		os.Exit(code)
	}
	goleak.VerifyTestMain(m)
}

func TestControlStatusListDetach(t *testing.T) {
	t.Setenv("UBLK_NVMEOF_RUN_DIR", t.TempDir())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	var detached atomic.Int32
	servers := map[int]*ControlServer{}
	for _, id := range []int{7, 2} {
		st := Status{Device: "/dev/ublkb" + string(rune('0'+id)), DevID: id, NQN: "nqn.test", State: "LIVE", Queues: 2}
		s, err := ListenControl(id, func() Status { return st }, func() { detached.Add(1) })
		if err != nil {
			t.Fatal(err)
		}
		servers[id] = s
	}
	defer func() {
		for _, s := range servers {
			s.Close()
		}
	}()

	// A second daemon for the same device is refused.
	if _, err := ListenControl(7, nil, nil); err == nil {
		t.Fatal("second control server for device 7 accepted")
	}

	st, err := GetStatus(ctx, 7)
	if err != nil || st.DevID != 7 || st.State != "LIVE" || st.Queues != 2 {
		t.Fatalf("status: %+v, %v", st, err)
	}
	all, err := List(ctx)
	if err != nil || len(all) != 2 || all[0].DevID != 2 || all[1].DevID != 7 {
		t.Fatalf("list: %+v, %v", all, err)
	}

	// Detach signals the daemon, then waits for its socket to go away.
	s7 := servers[7]
	delete(servers, 7)
	closed := make(chan struct{})
	go func() {
		defer close(closed)
		for detached.Load() == 0 {
			time.Sleep(time.Millisecond)
		}
		s7.Close()
	}()
	if err := Detach(ctx, 7); err != nil {
		t.Fatal(err)
	}
	<-closed
	if detached.Load() != 1 {
		t.Fatalf("detach callback ran %d times", detached.Load())
	}
	if _, err := GetStatus(ctx, 7); !errors.Is(err, ErrNoSuchDevice) {
		t.Fatalf("status after detach: %v", err)
	}
	if err := Detach(ctx, 9); !errors.Is(err, ErrNoSuchDevice) {
		t.Fatalf("detach of an unknown device: %v", err)
	}
}

// A socket left by a daemon that died is taken over, and skipped by List.
func TestControlStaleSocket(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("UBLK_NVMEOF_RUN_DIR", dir)
	if err := os.WriteFile(filepath.Join(dir, "ublkb4.sock"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	all, err := List(context.Background())
	if err != nil || len(all) != 0 {
		t.Fatalf("list with a stale socket: %+v, %v", all, err)
	}
	s, err := ListenControl(4, func() Status { return Status{DevID: 4} }, func() {})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "ublkb4.sock")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left after Close: %v", err)
	}
}

func TestParseDevice(t *testing.T) {
	for in, want := range map[string]int{"3": 3, "/dev/ublkb12": 12, "ublkb0": 0} {
		if got, err := ParseDevice(in); err != nil || got != want {
			t.Errorf("%q: %d, %v", in, got, err)
		}
	}
	for _, bad := range []string{"", "/dev/sda", "-1", "ublkbx", "/dev/ublkc1"} {
		if _, err := ParseDevice(bad); !errors.Is(err, ErrInvalidOptions) {
			t.Errorf("%q accepted: %v", bad, err)
		}
	}
}
