// Package perf holds the fio workloads the performance comparison runs,
// the parsing of fio's JSON output, and the report: a table, JSON and an
// SVG plot of ublk-nvmeof against the Linux kernel's nvme-tcp initiator.
package perf

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
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

// Row is one workload on both devices, and on the floor device when the
// run measured it.
type Row struct {
	Workload Workload `json:"workload"`
	Jobs     int      `json:"jobs"`
	Kernel   Result   `json:"kernel"`
	Ublk     Result   `json:"ublk"`
	// Floor is a ublk device served by this project's ublk package with
	// a backend that does nothing (ublk.NullBackend): the ublk round trip
	// alone, no NVMe/TCP. Its ratio to the kernel initiator bounds what
	// any design that goes through ublk can reach on this machine.
	Floor *Result `json:"floor,omitempty"`
}

// FloorRatio is the floor device's IOPS over the kernel's, and whether
// the row has one.
func (r Row) FloorRatio() (float64, bool) {
	if r.Floor == nil || r.Kernel.IOPS == 0 {
		return 0, false
	}
	return r.Floor.IOPS / r.Kernel.IOPS, true
}

// Ratio is ublk-nvmeof's IOPS over the kernel's: above 1, ublk-nvmeof is
// faster.
func (r Row) Ratio() float64 {
	if r.Kernel.IOPS == 0 {
		return 0
	}
	return r.Ublk.IOPS / r.Kernel.IOPS
}

// ID names the row in flags, file names and the profile lines:
// "<workload>-j<jobs>", e.g. "128k-write-qd8-j2".
func (r Row) ID() string { return fmt.Sprintf("%s-j%d", r.Workload.Name, r.Jobs) }

// ParseRowID is the inverse of Row.ID: the workload and the number of jobs
// (1 or 2, the table's) a row ID names.
func ParseRowID(id string) (Workload, int, error) {
	name, jobsText, ok := cutLast(id, "-j")
	if !ok {
		return Workload{}, 0, fmt.Errorf("row %q: want <workload>-j<jobs>, e.g. 4k-randread-qd1-j1", id)
	}
	jobs, err := strconv.Atoi(jobsText)
	if err != nil || jobs < 1 || jobs > 2 {
		return Workload{}, 0, fmt.Errorf("row %q: jobs %q, want 1 or 2", id, jobsText)
	}
	for _, w := range Workloads {
		if w.Name == name {
			return w, jobs, nil
		}
	}
	return Workload{}, 0, fmt.Errorf("row %q: no workload %q", id, name)
}

func cutLast(s, sep string) (before, after string, found bool) {
	i := strings.LastIndex(s, sep)
	if i < 0 {
		return s, "", false
	}
	return s[:i], s[i+len(sep):], true
}

// Report is one comparison run: one boot of one kernel.
type Report struct {
	Runtime      string `json:"runtime"` // per fio job
	Kernel       string `json:"kernel"`  // uname -r of the guest
	CPUs         int    `json:"cpus"`
	KernelDevice string `json:"kernel_device"`
	UblkDevice   string `json:"ublk_device"`
	FloorDevice  string `json:"floor_device,omitempty"` // Row.Floor's; "" when not measured
	Rows         []Row  `json:"rows"`
	// Profiled is the ID of the row run once more, outside the table,
	// with the daemon profiled ("" if none).
	Profiled string `json:"profiled,omitempty"`
	// Host is filled in by the bench command on the host; absent in
	// reports made before it existed.
	Host *Host `json:"host,omitempty"`
}

// Host is where and how the host ran one report: what makes two reports
// comparable, or not.
type Host struct {
	KernelName string `json:"kernel_name"` // major.minor, e.g. "6.12": names the files
	KernelRole string `json:"kernel_role"` // lts or newest (e2e/vm)
	Date       string `json:"date"`        // RFC 3339, UTC, when the boot started
	Commit     string `json:"commit"`      // git describe of the tree, "-dirty" if changed
	Command    string `json:"command"`
	Accel      string `json:"accel"` // QEMU's accelerator: TCG or KVM
	CPUs       int    `json:"cpus"`  // the host's
	// Load averages (1, 5, 15 minutes, /proc/loadavg) of the host before
	// the boot, after it, and the highest 1-minute one seen during it:
	// under TCG, other processes on the host take CPU from the guest.
	// LoadWait says how long the bench waited for the load to fall
	// before booting (-max-load; "" when it did not wait).
	LoadWait   string  `json:"load_wait,omitempty"`
	LoadBefore string  `json:"load_before"`
	LoadAfter  string  `json:"load_after"`
	LoadPeak1  float64 `json:"load_peak_1m"`
	VMElapsed  string  `json:"vm_elapsed"`
	// BootsFailed counts boots of this kernel that stopped before the
	// test started (booted again; the table is from the boot that ran).
	BootsFailed int `json:"boots_failed,omitempty"`
}

// Name is the kernel's major.minor: the host's, else read from the
// guest's release.
func (r Report) Name() string {
	if r.Host != nil && r.Host.KernelName != "" {
		return r.Host.KernelName
	}
	a, rest, _ := strings.Cut(r.Kernel, ".")
	b := rest
	if i := strings.IndexFunc(rest, func(c rune) bool { return c < '0' || c > '9' }); i >= 0 {
		b = rest[:i]
	}
	if a == "" || b == "" {
		return r.Kernel
	}
	return a + "." + b
}

// Row returns the report's row with the given ID.
func (r Report) Row(id string) (Row, bool) {
	for _, row := range r.Rows {
		if row.ID() == id {
			return row, true
		}
	}
	return Row{}, false
}

// Slowest is the row where ublk-nvmeof is furthest behind: the lowest
// ratio (the first of equal ones). False if the report has no row with a
// measured kernel side.
func Slowest(rows []Row) (Row, bool) {
	var best Row
	found := false
	for _, row := range rows {
		if row.Kernel.IOPS == 0 {
			continue
		}
		if !found || row.Ratio() < best.Ratio() {
			best, found = row, true
		}
	}
	return best, found
}

// JSONPrefix marks the report's JSON in the guest test's output.
const JSONPrefix = "PERF-JSON: "

// ProfilePrefix marks a profile of the daemon in the guest test's output:
// "PERF-PROFILE <workload> <cpu|trace>: <base64>".
const ProfilePrefix = "PERF-PROFILE "

// ProfileSlowest, as the profile spec, profiles the row with the lowest
// ratio in the boot's own table (Slowest).
const ProfileSlowest = "slowest"

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
	fmt.Fprintf(&b, "| workload | jobs | kernel IOPS | ublk-nvmeof IOPS | ratio | kernel MiB/s | ublk-nvmeof MiB/s | kernel p99 µs | ublk-nvmeof p99 µs | floor IOPS | floor ratio |\n")
	fmt.Fprintf(&b, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, row := range r.Rows {
		floorIOPS, floorRatio := "—", "—"
		if fr, ok := row.FloorRatio(); ok {
			floorIOPS, floorRatio = fmt.Sprintf("%.0f", row.Floor.IOPS), fmt.Sprintf("%.2f", fr)
		}
		fmt.Fprintf(&b, "| %s | %d | %.0f | %.0f | %.2f | %.1f | %.1f | %.0f | %.0f | %s | %s |\n",
			row.Workload.Name, row.Jobs, row.Kernel.IOPS, row.Ublk.IOPS, row.Ratio(),
			row.Kernel.MiBps, row.Ublk.MiBps, row.Kernel.P99LatUs, row.Ublk.P99LatUs, floorIOPS, floorRatio)
	}
	return b.String()
}

// SVG draws the ratio of every row as a horizontal bar, with the 1.0 line;
// with a baseline, each row's baseline ratio is a grey bar under it.
func (r Report) SVG(base *Report) string {
	const (
		left, barH, gap, width = 210, 18, 6, 420
		top                    = 40
	)
	maxRatio := 1.5
	for _, row := range r.Rows {
		maxRatio = max(maxRatio, row.Ratio()*1.1)
		if b, ok := baseRow(base, row); ok {
			maxRatio = max(maxRatio, b.Ratio()*1.1)
		}
	}
	scale := float64(width) / maxRatio
	h := top + len(r.Rows)*(barH+gap) + 40
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">`+"\n", left+width+120, h)
	title := fmt.Sprintf("ublk-nvmeof IOPS / Linux nvme-tcp IOPS (%s, %d CPUs, %s per job)", r.Kernel, r.CPUs, r.Runtime)
	if base != nil {
		title += "; grey: baseline"
	}
	fmt.Fprintf(&b, `<text x="10" y="20" font-size="14">%s</text>`+"\n", title)
	for i, row := range r.Rows {
		y := top + i*(barH+gap)
		color := "#2e7d32"
		if row.Ratio() < 1 {
			color = "#c62828"
		}
		fmt.Fprintf(&b, `<text x="10" y="%d">%s, %d job(s)</text>`+"\n", y+13, row.Workload.Name, row.Jobs)
		label := fmt.Sprintf("%.2f", row.Ratio())
		if br, ok := baseRow(base, row); ok {
			fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%.1f" height="%d" fill="#9e9e9e"/>`+"\n", left, y+barH-5, br.Ratio()*scale, 5)
			label += fmt.Sprintf(" (was %.2f)", br.Ratio())
		}
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"/>`+"\n", left, y, row.Ratio()*scale, barH-6, color)
		end := max(row.Ratio(), 0)
		if br, ok := baseRow(base, row); ok {
			end = max(end, br.Ratio())
		}
		fmt.Fprintf(&b, `<text x="%.1f" y="%d">%s</text>`+"\n", float64(left)+end*scale+4, y+13, label)
	}
	x1 := float64(left) + scale
	fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="black" stroke-dasharray="4,3"/>`+"\n", x1, top-6, x1, h-34)
	fmt.Fprintf(&b, `<text x="%.1f" y="%d">1.0</text>`+"\n", x1-8, h-20)
	b.WriteString("</svg>\n")
	return b.String()
}

// baseRow is the baseline's row with the same ID as row.
func baseRow(base *Report, row Row) (Row, bool) {
	if base == nil {
		return Row{}, false
	}
	return base.Row(row.ID())
}
