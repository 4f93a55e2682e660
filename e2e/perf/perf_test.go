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
		{Workload: Workloads[1], Jobs: 2, Kernel: Result{IOPS: 1000}, Ublk: Result{IOPS: 500}},
	}}
	if rep.Rows[0].Ratio() != 1.25 || rep.Rows[1].Ratio() != 0.5 {
		t.Fatal("ratio")
	}
	tab := rep.Table()
	if !strings.Contains(tab, "| 4k-randread-qd1 | 1 | 1000 | 1250 | 1.25 |") || !strings.Contains(tab, "| 0.50 |") {
		t.Errorf("table:\n%s", tab)
	}
	svg := rep.SVG()
	if err := xml.Unmarshal([]byte(svg), new(struct{})); err != nil {
		t.Errorf("SVG is not well-formed XML: %v", err)
	}
	if strings.Count(svg, "<rect") != 2 || !strings.Contains(svg, "#c62828") {
		t.Errorf("SVG bars:\n%s", svg)
	}
}
