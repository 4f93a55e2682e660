package main

import (
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/spdk"
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

// Without a build in the cache, the command's error is package spdk's,
// which says how to build it (main exits 2 on it).
func TestFindSPDKSaysWhatIsMissing(t *testing.T) {
	t.Setenv("SPDK_CACHE", t.TempDir())
	_, err := findSPDK()
	if !errors.Is(err, spdk.ErrNoBuild) || !strings.Contains(err.Error(), "make spdk SPDK_SRC=") {
		t.Fatalf("%v", err)
	}
}

func TestShellLine(t *testing.T) {
	got := shellLine("spdk_nvme_perf", []string{"-q", "1", "-r", "trtype:TCP traddr:127.0.0.1", "it's"})
	want := `spdk_nvme_perf -q 1 -r 'trtype:TCP traddr:127.0.0.1' 'it'\''s'`
	if got != want {
		t.Fatalf("%s, want %s", got, want)
	}
}
