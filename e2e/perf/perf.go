// Package perf holds the fio workloads the performance comparison runs,
// the parsing of fio's JSON output, and the report: a table, JSON and an
// SVG plot of ublk-nvmeof against the Linux kernel's nvme-tcp initiator.
package perf

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// Workload is one fio job shape.
type Workload struct {
	Name       string `json:"name"`
	RW         string `json:"rw"` // fio --rw
	BlockSize  int    `json:"bs"`
	QueueDepth int    `json:"iodepth"`
}

// Workloads are the rows of the comparison (issue: 4 KiB random read and
// write at QD1 and QD32, 128 KiB sequential read and write), each run with
// 1 and 2 jobs.
var Workloads = []Workload{
	{"4k-randread-qd1", "randread", 4096, 1},
	{"4k-randwrite-qd1", "randwrite", 4096, 1},
	{"4k-randread-qd32", "randread", 4096, 32},
	{"4k-randwrite-qd32", "randwrite", 4096, 32},
	{"128k-read-qd8", "read", 128 << 10, 8},
	{"128k-write-qd8", "write", 128 << 10, 8},
}

// Result is what fio measured for one device.
type Result struct {
	IOPS      float64 `json:"iops"`
	MiBps     float64 `json:"mib_per_s"`
	MeanLatUs float64 `json:"mean_lat_us"`
	P99LatUs  float64 `json:"p99_lat_us"`
}

// Row is one workload on both devices.
type Row struct {
	Workload Workload `json:"workload"`
	Jobs     int      `json:"jobs"`
	Kernel   Result   `json:"kernel"`
	Ublk     Result   `json:"ublk"`
}

// Ratio is ublk-nvmeof's IOPS over the kernel's: above 1, ublk-nvmeof is
// faster.
func (r Row) Ratio() float64 {
	if r.Kernel.IOPS == 0 {
		return 0
	}
	return r.Ublk.IOPS / r.Kernel.IOPS
}

// Report is one comparison run.
type Report struct {
	Runtime      string `json:"runtime"` // per fio job
	Kernel       string `json:"kernel"`
	CPUs         int    `json:"cpus"`
	KernelDevice string `json:"kernel_device"`
	UblkDevice   string `json:"ublk_device"`
	Rows         []Row  `json:"rows"`
}

// JSONPrefix marks the report's JSON in the guest test's output.
const JSONPrefix = "PERF-JSON: "

// ProfilePrefix marks a profile of the daemon in the guest test's output:
// "PERF-PROFILE <workload> <cpu|trace>: <base64>".
const ProfilePrefix = "PERF-PROFILE "

// fioOutput is the part of `fio --output-format=json` read here.
type fioOutput struct {
	Jobs []struct {
		Error int     `json:"error"`
		Read  fioSide `json:"read"`
		Write fioSide `json:"write"`
	} `json:"jobs"`
}

type fioSide struct {
	IOPS  float64 `json:"iops"`
	BW    float64 `json:"bw"` // KiB/s
	ClatN struct {
		Mean       float64            `json:"mean"`
		Percentile map[string]float64 `json:"percentile"`
	} `json:"clat_ns"`
}

// ParseFio reads one group-reported fio job (reads or writes, whichever it
// did).
func ParseFio(out []byte) (Result, error) {
	// fio may print warnings before the JSON.
	if i := strings.IndexByte(string(out), '{'); i > 0 {
		out = out[i:]
	}
	var f fioOutput
	if err := json.Unmarshal(out, &f); err != nil {
		return Result{}, fmt.Errorf("fio output: %w", err)
	}
	if len(f.Jobs) == 0 {
		return Result{}, errors.New("fio output: no jobs")
	}
	j := f.Jobs[0]
	if j.Error != 0 {
		return Result{}, fmt.Errorf("fio job error %d", j.Error)
	}
	s := j.Read
	if j.Write.IOPS > s.IOPS {
		s = j.Write
	}
	if s.IOPS == 0 {
		return Result{}, errors.New("fio output: no I/O done")
	}
	return Result{
		IOPS:      s.IOPS,
		MiBps:     s.BW / 1024,
		MeanLatUs: s.ClatN.Mean / 1000,
		P99LatUs:  s.ClatN.Percentile["99.000000"] / 1000,
	}, nil
}

// Table formats the report as a Markdown table.
func (r Report) Table() string {
	var b strings.Builder
	fmt.Fprintf(&b, "| workload | jobs | kernel IOPS | ublk-nvmeof IOPS | ratio | kernel MiB/s | ublk-nvmeof MiB/s | kernel p99 µs | ublk-nvmeof p99 µs |\n")
	fmt.Fprintf(&b, "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, row := range r.Rows {
		fmt.Fprintf(&b, "| %s | %d | %.0f | %.0f | %.2f | %.1f | %.1f | %.0f | %.0f |\n",
			row.Workload.Name, row.Jobs, row.Kernel.IOPS, row.Ublk.IOPS, row.Ratio(),
			row.Kernel.MiBps, row.Ublk.MiBps, row.Kernel.P99LatUs, row.Ublk.P99LatUs)
	}
	return b.String()
}

// SVG draws the ratio of every row as a horizontal bar, with the 1.0 line.
func (r Report) SVG() string {
	const (
		left, barH, gap, width = 210, 18, 6, 420
		top                    = 40
	)
	maxRatio := 1.5
	for _, row := range r.Rows {
		maxRatio = max(maxRatio, row.Ratio()*1.1)
	}
	scale := float64(width) / maxRatio
	h := top + len(r.Rows)*(barH+gap) + 40
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">`+"\n", left+width+80, h)
	fmt.Fprintf(&b, `<text x="10" y="20" font-size="14">ublk-nvmeof IOPS / Linux nvme-tcp IOPS (%s, %d CPUs, %s per job)</text>`+"\n", r.Kernel, r.CPUs, r.Runtime)
	for i, row := range r.Rows {
		y := top + i*(barH+gap)
		color := "#2e7d32"
		if row.Ratio() < 1 {
			color = "#c62828"
		}
		fmt.Fprintf(&b, `<text x="10" y="%d">%s, %d job(s)</text>`+"\n", y+13, row.Workload.Name, row.Jobs)
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"/>`+"\n", left, y, row.Ratio()*scale, barH, color)
		fmt.Fprintf(&b, `<text x="%.1f" y="%d">%.2f</text>`+"\n", float64(left)+row.Ratio()*scale+4, y+13, row.Ratio())
	}
	x1 := float64(left) + scale
	fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="black" stroke-dasharray="4,3"/>`+"\n", x1, top-6, x1, h-34)
	fmt.Fprintf(&b, `<text x="%.1f" y="%d">1.0</text>`+"\n", x1-8, h-20)
	b.WriteString("</svg>\n")
	return b.String()
}
