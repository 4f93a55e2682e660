package main

import (
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"

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
		"    perf_guest_test.go:80: " + perf.ProfilePrefix + "4k-randread-qd1 cpu: " + base64.StdEncoding.EncodeToString([]byte("pprof bytes")),
		"--- PASS: TestGuestPerfVersusKernel (1.00s)",
	}, "\n")
	got, profiles, err := parseOutput(out)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Rows) != 1 || got.Rows[0].Ratio() != 0.5 || got.Kernel != "6.12" {
		t.Fatalf("report %+v", got)
	}
	if string(profiles["4k-randread-qd1.cpu"]) != "pprof bytes" || len(profiles) != 1 {
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
