package perf

import (
	"encoding/xml"
	"strings"
	"testing"
)

// A trimmed fio 3.33 --output-format=json of a randread job.
const fioJSON = `fio: some warning
{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "4k-randread-qd1",
      "error" : 0,
      "read" : {
        "bw" : 10240,
        "iops" : 2560.5,
        "clat_ns" : {
          "mean" : 380000.0,
          "percentile" : { "50.000000" : 350000, "99.000000" : 900000 }
        }
      },
      "write" : { "bw" : 0, "iops" : 0.0, "clat_ns" : { "mean" : 0.0 } }
    }
  ]
}`

func TestParseFio(t *testing.T) {
	r, err := ParseFio([]byte(fioJSON))
	if err != nil {
		t.Fatal(err)
	}
	if r.IOPS != 2560.5 || r.MiBps != 10 || r.MeanLatUs != 380 || r.P99LatUs != 900 {
		t.Fatalf("%+v", r)
	}
	for _, bad := range []string{"", "{}", `{"jobs":[{"error":5}]}`, `{"jobs":[{"error":0}]}`} {
		if _, err := ParseFio([]byte(bad)); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestReportTableAndSVG(t *testing.T) {
	rep := Report{Runtime: "2s", Kernel: "6.12", CPUs: 2, Rows: []Row{
		{Workload: Workloads[0], Jobs: 1, Kernel: Result{IOPS: 1000}, Ublk: Result{IOPS: 1250}},
		{Workload: Workloads[1], Jobs: 2, Kernel: Result{IOPS: 1000}, Ublk: Result{IOPS: 500}, Floor: &Result{IOPS: 1500}},
	}}
	if rep.Rows[0].Ratio() != 1.25 || rep.Rows[1].Ratio() != 0.5 {
		t.Fatal("ratio")
	}
	tab := rep.Table()
	if fr, ok := rep.Rows[1].FloorRatio(); !ok || fr != 1.5 {
		t.Fatal("floor ratio")
	}
	if _, ok := rep.Rows[0].FloorRatio(); ok {
		t.Fatal("floor ratio of a row without a floor run")
	}
	if !strings.Contains(tab, "| 4k-randread-qd1 | 1 | 1000 | 1250 | 1.25 |") || !strings.Contains(tab, "| 0.50 |") ||
		!strings.Contains(tab, "| — | — |") || !strings.Contains(tab, "| 1500 | 1.50 |") {
		t.Errorf("table:\n%s", tab)
	}
	svg := rep.SVG(nil)
	if err := xml.Unmarshal([]byte(svg), new(struct{})); err != nil {
		t.Errorf("SVG is not well-formed XML: %v", err)
	}
	if strings.Count(svg, "<rect") != 2 || !strings.Contains(svg, "#c62828") {
		t.Errorf("SVG bars:\n%s", svg)
	}
}

func TestRowID(t *testing.T) {
	row := Row{Workload: Workloads[5], Jobs: 2}
	if row.ID() != "128k-write-qd8-j2" {
		t.Fatalf("ID %q", row.ID())
	}
	w, jobs, err := ParseRowID(row.ID())
	if err != nil || w != Workloads[5] || jobs != 2 {
		t.Fatalf("ParseRowID(%q) = %v, %d, %v", row.ID(), w, jobs, err)
	}
	for _, bad := range []string{"", "4k-randread-qd1", "4k-randread-qd1-j3", "4k-randread-qd1-j0", "4k-randread-qd1-jx", "8k-randread-qd1-j1"} {
		if _, _, err := ParseRowID(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestSlowest(t *testing.T) {
	rows := []Row{
		{Workload: Workloads[0], Jobs: 1, Kernel: Result{IOPS: 1000}, Ublk: Result{IOPS: 900}},
		{Workload: Workloads[5], Jobs: 2, Kernel: Result{IOPS: 1000}, Ublk: Result{IOPS: 280}},
		{Workload: Workloads[1], Jobs: 1, Kernel: Result{IOPS: 0}, Ublk: Result{IOPS: 1}}, // ratio 0: not measured
		{Workload: Workloads[4], Jobs: 2, Kernel: Result{IOPS: 2000}, Ublk: Result{IOPS: 560}},
	}
	slow, ok := Slowest(rows)
	if !ok || slow.ID() != "128k-write-qd8-j2" {
		t.Fatalf("slowest %v %v", slow.ID(), ok)
	}
	if _, ok := Slowest(rows[2:3]); ok {
		t.Fatal("a row without kernel IOPS chosen")
	}
}

func TestReportName(t *testing.T) {
	for rel, want := range map[string]string{"6.12.117+deb12-amd64": "6.12", "7.3.4+deb13-amd64": "7.3", "6.1": "6.1", "weird": "weird"} {
		if got := (Report{Kernel: rel}).Name(); got != want {
			t.Errorf("%q: %q, want %q", rel, got, want)
		}
	}
	if got := (Report{Kernel: "6.12.1", Host: &Host{KernelName: "x"}}).Name(); got != "x" {
		t.Errorf("host's name not used: %q", got)
	}
}

func testReport(kernel, runtime string, ublk ...float64) Report {
	rep := Report{Runtime: runtime, Kernel: kernel, CPUs: 2, KernelDevice: "/dev/nvme0n1", UblkDevice: "/dev/ublkb0"}
	for i, u := range ublk {
		rep.Rows = append(rep.Rows, Row{Workload: Workloads[i], Jobs: 1, Kernel: Result{IOPS: 1000}, Ublk: Result{IOPS: u}})
	}
	return rep
}

func TestPage(t *testing.T) {
	lts := testReport("6.12.117+deb12-amd64", "10s", 250, 1980)
	lts.Profiled = "4k-randread-qd1-j1"
	lts.Host = &Host{KernelName: "6.12", KernelRole: "lts", Date: "2026-11-30T22:00:00Z", Commit: "abc123",
		Command: "make bench", Accel: "TCG (no KVM)", CPUs: 2, LoadBefore: "0.50 0.60 0.70", LoadAfter: "2.10 1.50 1.00", LoadPeak1: 2.3, VMElapsed: "6m0s"}
	ltsBase := testReport("6.12.117+deb12-amd64", "10s", 200, 2000)
	ltsBase.Host = &Host{Date: "2026-11-29T10:00:00Z", Commit: "old999", Command: "make bench", LoadBefore: "0.1 0.1 0.1"}
	newest := testReport("7.3.4+deb13-amd64", "2s", 300, 1500)
	md := Page([]KernelPage{
		{Report: lts, Baseline: &ltsBase, ProfileDir: "profile/6.12", SVG: "ratio-6.12.svg",
			CPUByThread: "1.00s 50.0% ublk-nvmeof\n", PprofTop: "Showing nodes\nflat flat%\n1s 50% syscall.Syscall6\n"},
		{Report: newest, ProfileDir: "profile/7.3", SVG: "ratio-7.3.svg"},
	}, "make bench")
	for _, want := range []string{
		"| workload | jobs | 6.12 baseline | 6.12 now | 6.12 change | 7.3 baseline | 7.3 now | 7.3 change |",
		// 0.20 -> 0.25 is +25 %, 2.00 -> 1.98 is -1 %; 7.3 has no baseline.
		"| 4k-randread-qd1 | 1 | 0.20 | 0.25 | +25 % | — | 0.30 | — |",
		"| 4k-randwrite-qd1 | 1 | 2.00 | 1.98 | -1 % | — | 1.50 | — |",
		"- 6.12 baseline: 2026-11-29T10:00:00Z at old999",
		"- 7.3 baseline: none recorded",
		"host load average (1/5/15 min) 0.50 0.60 0.70 before, 2.10 1.50 1.00 after, 1-min peak 2.30 during (VM 6m0s)",
		"## 6.12 (6.12.117+deb12-amd64)",
		"## 7.3 (7.3.4+deb13-amd64)",
		"no host record",
		"![ratios on 6.12](ratio-6.12.svg)",
		"### Profile of 4k-randread-qd1-j1 (ratio 0.25 in the table)",
		"The slowest row (lowest ratio)",
		"[profile/6.12/](profile/6.12/)",
		"1.00s 50.0% ublk-nvmeof",
		"1s 50% syscall.Syscall6",
		"No row was profiled in this run.",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("page lacks %q", want)
		}
	}
	if strings.Contains(md, "stopped before the test started") {
		t.Error("failed boots reported where there were none")
	}
	lts.Host.BootsFailed = 2
	if md := Page([]KernelPage{{Report: lts}}, "x"); !strings.Contains(md, "; 2 boot(s) before this one stopped before the test started") {
		t.Errorf("failed boots not reported:\n%s", md)
	}
	lts.Host.BootsFailed = 0
	lts.Host.LoadWait = "waited 2m0s for the 1-min load average to fall to 1.50 (it was 1.40)"
	if md := Page([]KernelPage{{Report: lts}}, "x"); !strings.Contains(md, "(VM 6m0s); waited 2m0s for the 1-min load average") {
		t.Errorf("load wait not reported:\n%s", md)
	}
	lts.Host.LoadWait = ""
	if strings.Contains(md, "not measured alike") {
		t.Error("equal runtimes flagged as different")
	}
	ltsBase.Runtime = "2s"
	md = Page([]KernelPage{{Report: lts, Baseline: &ltsBase}}, "make bench")
	if !strings.Contains(md, "the baseline ran 2s per job and this run 10s") {
		t.Errorf("runtime mismatch not flagged:\n%s", md)
	}
	// A profiled row that is not the slowest was chosen by -profile.
	lts.Profiled = "4k-randwrite-qd1-j1"
	if md := Page([]KernelPage{{Report: lts}}, "x"); !strings.Contains(md, "The row named by -profile") {
		t.Errorf("profile origin:\n%s", md)
	}
}

func TestChange(t *testing.T) {
	before := Row{Kernel: Result{IOPS: 1000}, Ublk: Result{IOPS: 400}}
	now := Row{Kernel: Result{IOPS: 1000}, Ublk: Result{IOPS: 600}}
	if got := Change(before, now, true); got != "+50 %" {
		t.Errorf("change %q", got)
	}
	if got := Change(now, before, true); got != "-33 %" {
		t.Errorf("change %q", got)
	}
	if got := Change(Row{}, now, true); got != "—" {
		t.Errorf("zero baseline: %q", got)
	}
	if got := Change(before, now, false); got != "—" {
		t.Errorf("missing: %q", got)
	}
}

func TestSVGBaseline(t *testing.T) {
	rep := testReport("6.12.1", "2s", 500, 1500)
	base := testReport("6.12.1", "2s", 250)
	svg := rep.SVG(&base)
	if err := xml.Unmarshal([]byte(svg), new(struct{})); err != nil {
		t.Fatalf("SVG is not well-formed XML: %v", err)
	}
	// Two ratio bars and one baseline bar: the baseline has no second row.
	if n := strings.Count(svg, "<rect"); n != 3 {
		t.Errorf("%d bars:\n%s", n, svg)
	}
	if strings.Count(svg, `fill="#9e9e9e"`) != 1 || !strings.Contains(svg, "0.50 (was 0.25)") || !strings.Contains(svg, "grey: baseline") {
		t.Errorf("baseline bar:\n%s", svg)
	}
}
