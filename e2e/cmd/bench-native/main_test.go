package main

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseStatCPU(t *testing.T) {
	// A command name with a space and a parenthesis, utime 250 and
	// stime 50 ticks.
	stat := "4242 (ublk (nvmeof) S 1 4242 4242 0 -1 4194560 1200 0 0 0 250 50 0 0 20 0 8 0 123456 0 0"
	got, err := parseStatCPU(stat)
	if err != nil || got != 3*time.Second {
		t.Fatalf("%v %v, want 3s", got, err)
	}
	for _, bad := range []string{"4242 ublk S 1", "4242 (x) S 1 2 3", "4242 (x) S 1 4242 4242 0 -1 4194560 1200 0 0 0 -5 50"} {
		if _, err := parseStatCPU(bad); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
	// This process has used some CPU by now.
	if d, err := processCPU(os.Getpid()); err != nil || d < 0 {
		t.Fatalf("own CPU %v %v", d, err)
	}
}

// Without a build in the cache, the command names each missing piece and
// how to build it.
func TestFindSPDKSaysWhatIsMissing(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("SPDK_CACHE", dir)
	os.MkdirAll(filepath.Join(dir, "bin"), 0o755)
	os.WriteFile(filepath.Join(dir, "bin", "nvmf_tgt"), nil, 0o755)
	_, err := findSPDK()
	var missing *missingError
	if !errors.As(err, &missing) {
		t.Fatalf("%v", err)
	}
	msg := err.Error()
	for _, want := range []string{filepath.Join(dir, "BUILT"), filepath.Join(dir, "bin", "spdk_nvme_perf"), filepath.Join(dir, "scripts", "rpc.py"), "e2e/spdk/build.sh"} {
		if !strings.Contains(msg, want) {
			t.Errorf("%q lacks %q", msg, want)
		}
	}
	if strings.Contains(msg, filepath.Join(dir, "bin", "nvmf_tgt")+",") {
		t.Errorf("%q names nvmf_tgt, which is there", msg)
	}
}

func TestShellLine(t *testing.T) {
	got := shellLine("spdk_nvme_perf", []string{"-q", "1", "-r", "trtype:TCP traddr:127.0.0.1", "it's"})
	want := `spdk_nvme_perf -q 1 -r 'trtype:TCP traddr:127.0.0.1' 'it'\''s'`
	if got != want {
		t.Fatalf("%s, want %s", got, want)
	}
}
