package main

import (
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/perf"
)

func TestParseOutput(t *testing.T) {
	rep := perf.Report{Runtime: "2s", Kernel: "6.12", CPUs: 2, Rows: []perf.Row{{
		Workload: perf.Workloads[0], Jobs: 1,
		Kernel: perf.Result{IOPS: 100}, Ublk: perf.Result{IOPS: 50},
	}}}
	js, _ := json.Marshal(rep)
	out := strings.Join([]string{
		"=== RUN   TestGuestPerfVersusKernel",
		"    perf_guest_test.go:95: " + perf.JSONPrefix + string(js),
		"    perf_guest_test.go:80: " + perf.ProfilePrefix + "4k-randread-qd1-j1 cpu: " + base64.StdEncoding.EncodeToString([]byte("pprof bytes")),
		"--- PASS: TestGuestPerfVersusKernel (1.00s)",
	}, "\n")
	got, profiles, err := parseOutput(out)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Rows) != 1 || got.Rows[0].Ratio() != 0.5 || got.Kernel != "6.12" {
		t.Fatalf("report %+v", got)
	}
	if string(profiles["4k-randread-qd1-j1.cpu"]) != "pprof bytes" || len(profiles) != 1 {
		t.Fatalf("profiles %q", profiles)
	}
	if _, _, err := parseOutput("--- PASS: TestGuestPerfVersusKernel"); err == nil {
		t.Fatal("output without a report parsed")
	}
}

func TestCPUAccounting(t *testing.T) {
	out := strings.Join([]string{
		"    perf_guest_test.go:99: CPU time in the guest during w on kernel (/dev/nvme0n1):",
		"                0.95s  54.3%  kworker/1:0H-nvme_tcp_wq (pid 29 tid 29)",
		"                1.75s total",
		"        perf_guest_test.go:118: ",
		"            | workload |",
	}, "\n")
	want := "CPU time in the guest during w on kernel (/dev/nvme0n1):\n0.95s  54.3%  kworker/1:0H-nvme_tcp_wq (pid 29 tid 29)\n1.75s total\n"
	if got := cpuAccounting(out); got != want {
		t.Fatalf("got %q\nwant %q", got, want)
	}
}

// writeReport writes a report with one row of the given ratio, as
// results-<name>.json in dir.
func writeReport(t *testing.T, dir, release, role string, ratio float64) {
	t.Helper()
	rep := perf.Report{Runtime: "10s", Kernel: release, CPUs: 2, Profiled: "4k-randread-qd1-j1", Rows: []perf.Row{{
		Workload: perf.Workloads[0], Jobs: 1,
		Kernel: perf.Result{IOPS: 1000}, Ublk: perf.Result{IOPS: 1000 * ratio},
	}}}
	rep.Host = &perf.Host{KernelName: rep.Name(), KernelRole: role, Date: "2026-11-30T22:00:00Z", Commit: "c-" + role}
	js, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, resultsFile(rep.Name())), js, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestRender(t *testing.T) {
	out := t.TempDir()
	base := filepath.Join(out, "baseline")
	// "newest" sorts after "lts" by role, not by name.
	writeReport(t, out, "10.1.0-amd64", "newest", 0.5)
	writeReport(t, out, "6.12.117+deb12-amd64", "lts", 0.3)
	writeReport(t, base, "6.12.117+deb12-amd64", "lts", 0.2)
	profDir := filepath.Join(out, "profile", "6.12")
	if err := os.MkdirAll(profDir, 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(profDir, "cpu-by-thread.txt"), []byte("2.00s ublk-nvmeof queue thread\n"), 0o644)
	os.WriteFile(filepath.Join(profDir, "4k-randread-qd1-j1.cpu.top.txt"), []byte("flat  flat%\n1s 40% internal/runtime/syscall.Syscall6\n"), 0o644)

	if err := render(out, base, "make bench"); err != nil {
		t.Fatal(err)
	}
	md, err := os.ReadFile(filepath.Join(out, "results.md"))
	if err != nil {
		t.Fatal(err)
	}
	page := string(md)
	for _, want := range []string{
		"| workload | jobs | 6.12 baseline | 6.12 now | 6.12 change | 10.1 baseline | 10.1 now | 10.1 change |",
		"| 4k-randread-qd1 | 1 | 0.20 | 0.30 | +50 % | — | 0.50 | — |",
		"- 10.1 baseline: none recorded",
		"2.00s ublk-nvmeof queue thread",
		"1s 40% internal/runtime/syscall.Syscall6",
	} {
		if !strings.Contains(page, want) {
			t.Errorf("results.md lacks %q:\n%s", want, page)
		}
	}
	if strings.Index(page, "## 6.12") > strings.Index(page, "## 10.1") {
		t.Error("the LTS kernel's section is not first")
	}
	for _, svg := range []string{"ratio-6.12.svg", "ratio-10.1.svg"} {
		b, err := os.ReadFile(filepath.Join(out, svg))
		if err != nil {
			t.Fatal(err)
		}
		if hasBase := strings.Contains(string(b), "(was 0.20)"); hasBase != (svg == "ratio-6.12.svg") {
			t.Errorf("%s: baseline shown %v", svg, hasBase)
		}
	}

	// No baseline directory: no baseline, no error.
	if err := render(out, filepath.Join(out, "none"), "x"); err != nil {
		t.Fatal(err)
	}
	// A report under another kernel's name is refused.
	os.Rename(filepath.Join(out, "results-10.1.json"), filepath.Join(out, "results-7.3.json"))
	if err := render(out, base, "x"); err == nil || !strings.Contains(err.Error(), "results-10.1.json") {
		t.Errorf("misnamed report: %v", err)
	}
	if err := render(t.TempDir(), "", "x"); err == nil {
		t.Error("an empty directory rendered")
	}
}

func TestCheck(t *testing.T) {
	good := options{runtime: 2 * time.Second, profile: "slowest"}
	if err := check(good); err != nil {
		t.Fatal(err)
	}
	for _, o := range []options{
		{runtime: 2 * time.Second, profile: "4k-randread-qd1"},
		{runtime: 1500 * time.Millisecond},
		{runtime: 0},
	} {
		if err := check(o); err == nil {
			t.Errorf("%+v accepted", o)
		}
	}
	if err := check(options{runtime: time.Second, profile: "128k-write-qd8-j2"}); err != nil {
		t.Error(err)
	}
}

func TestLoadWatch(t *testing.T) {
	if _, err := os.Stat("/proc/loadavg"); err != nil {
		t.Skip("no /proc/loadavg on this system")
	}
	if f := strings.Fields(loadAverage()); len(f) != 3 {
		t.Fatalf("load average %q", loadAverage())
	}
	// stop takes a last sample and keeps the highest of all.
	w := watchLoad(time.Millisecond)
	time.Sleep(5 * time.Millisecond)
	w.mu.Lock()
	w.peak = 1e6 // a sample no load reaches: stop must keep it
	w.mu.Unlock()
	if peak := w.stop(); peak != 1e6 {
		t.Fatalf("peak %v, want the highest sample kept", peak)
	}
}

func TestCommandLine(t *testing.T) {
	t.Setenv("E2E_KERNEL", "lts 7.3")
	got := commandLine([]string{"-runtime", "2s", "-baseline", "", "-profile", "it's"})
	want := `E2E_KERNEL='lts 7.3' go run ./e2e/cmd/bench -runtime 2s -baseline '' -profile 'it'\''s'`
	if got != want {
		t.Fatalf("got  %s\nwant %s", got, want)
	}
	t.Setenv("E2E_KERNEL", "")
	if got := commandLine(nil); got != "E2E_KERNEL=all go run ./e2e/cmd/bench" {
		t.Fatalf("default selection: %s", got)
	}
}

func TestWaitForLoad(t *testing.T) {
	ctx := t.Context()
	// The load falls below the bound on the third reading.
	readings := []float64{5, 3, 1.2}
	n := 0
	load := func() (float64, bool) {
		v := readings[min(n, len(readings)-1)]
		n++
		return v, true
	}
	got := waitForLoad(ctx, 1.5, time.Minute, time.Millisecond, load)
	if n != 3 || !strings.Contains(got, "to fall to 1.50 (it was 1.20)") {
		t.Errorf("after %d readings: %s", n, got)
	}
	// It never falls: booted anyway after the limit, and says so.
	high := func() (float64, bool) { return 4, true }
	got = waitForLoad(ctx, 1.5, 20*time.Millisecond, time.Millisecond, high)
	if !strings.Contains(got, "booted with the 1-min load average at 4.00 (above 1.50)") {
		t.Errorf("limit: %s", got)
	}
	if got := waitForLoad(ctx, 1.5, time.Minute, time.Millisecond, func() (float64, bool) { return 0, false }); !strings.Contains(got, "not waited for") {
		t.Errorf("unknown load: %s", got)
	}
	if err := check(options{runtime: time.Second, maxLoad: -1}); err == nil {
		t.Error("-max-load -1 accepted")
	}
}
