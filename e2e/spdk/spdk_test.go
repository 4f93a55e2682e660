package spdk

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestFindWithoutBuild(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("SPDK_CACHE", dir)
	_, err := Find()
	if !errors.Is(err, ErrNoBuild) {
		t.Fatalf("Find in an empty cache: %v, want ErrNoBuild", err)
	}
	// The skip reason says where it looked and how to build.
	for _, want := range []string{dir, "make spdk SPDK_SRC="} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Find's error %q lacks %q", err, want)
		}
	}

	// BUILT without the programs: an incomplete build, named.
	writeFile(t, filepath.Join(dir, "BUILT"))
	if _, err := Find(); !errors.Is(err, ErrNoBuild) || !strings.Contains(err.Error(), "nvmf_tgt") {
		t.Fatalf("Find with BUILT only: %v", err)
	}
}

func TestFindBuild(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("SPDK_CACHE", dir)
	for _, p := range []string{"BUILT", "bin/nvmf_tgt", "bin/spdk_nvme_perf", "bin/spdk_nvme_identify", "bin/spdk_nvme_discover", "scripts/rpc.py"} {
		writeFile(t, filepath.Join(dir, p))
	}
	b, err := Find()
	if err != nil {
		t.Fatal(err)
	}
	if b.Dir != dir || b.NvmfTgt != filepath.Join(dir, "bin/nvmf_tgt") || b.RPCPy != filepath.Join(dir, "scripts/rpc.py") {
		t.Fatalf("Find: %+v", b)
	}
}

func TestCacheDirDefault(t *testing.T) {
	t.Setenv("SPDK_CACHE", "")
	t.Setenv("XDG_CACHE_HOME", "/xdg")
	if got, want := CacheDir(), "/xdg/ublk-nvmeof/spdk/v24.01"; got != want {
		t.Fatalf("CacheDir = %q, want %q", got, want)
	}
}

// Two reservations never share a port, and a released one is free again.
func TestPortReservations(t *testing.T) {
	var first int
	t.Run("hold", func(t *testing.T) {
		first = Port(t)
		second := Port(t)
		if first == second || first < FirstPort || second > LastPort {
			t.Fatalf("ports %d and %d", first, second)
		}
		if f, ok := lockPort(first); ok {
			_ = f.Close()
			t.Fatalf("port %d reserved twice", first)
		}
	})
	f, ok := lockPort(first)
	if !ok {
		t.Fatalf("port %d still reserved after its test ended", first)
	}
	_ = f.Close()
}

func writeFile(t *testing.T, name string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(name), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(name, nil, 0o755); err != nil {
		t.Fatal(err)
	}
}

// The real nvmf_tgt: started, configured through JSON-RPC, seen through
// rpc.py, stopped by the cleanup.
func TestSPDKTargetExport(t *testing.T) {
	b := Require(t)
	tg := StartTarget(t, b, TargetOptions{})
	e := tg.Export(t, ExportConfig{NQN: "nqn.2016-06.io.spdk:export-test", Discovery: true})

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := tg.RPCPy(ctx, "nvmf_get_subsystems")
	if err != nil {
		t.Fatal(err)
	}
	var subs []struct {
		NQN             string `json:"nqn"`
		ListenAddresses []struct {
			Trsvcid string `json:"trsvcid"`
		} `json:"listen_addresses"`
		Namespaces []struct {
			NSID int `json:"nsid"`
		} `json:"namespaces"`
	}
	if err := json.Unmarshal([]byte(out), &subs); err != nil {
		t.Fatalf("rpc.py nvmf_get_subsystems: %v: %s", err, out)
	}
	found := false
	for _, s := range subs {
		if s.NQN == e.NQN {
			found = len(s.Namespaces) == 1 && s.Namespaces[0].NSID == 1 &&
				len(s.ListenAddresses) == 1 && s.ListenAddresses[0].Trsvcid == strings.TrimPrefix(e.Addr, "127.0.0.1:")
		}
	}
	if !found {
		t.Fatalf("nvmf_get_subsystems lacks %s with namespace 1 on %s: %s", e.NQN, e.Addr, out)
	}
	if _, err := tg.Call("no_such_method", nil); err == nil {
		t.Fatal("an unknown method succeeded")
	}
	if err := tg.Stop(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-tg.Exited():
	default:
		t.Fatal("Stop returned before nvmf_tgt exited")
	}
}
