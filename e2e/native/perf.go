package native

import (
	"bufio"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// PerfTotal is the "Total" line of spdk_nvme_perf's report
// (examples/nvme/perf/perf.c, print_performance): IOPS, MiB/s and the
// average, minimum and maximum latency in microseconds, summed or merged
// over every namespace and core.
type PerfTotal struct {
	IOPS, MiBps                  float64
	AvgLatUs, MinLatUs, MaxLatUs float64
}

// ParsePerfTotal reads spdk_nvme_perf's standard output and returns its
// Total line. The line is "Total" padded with spaces, a colon and five
// numbers; there is exactly one per run.
func ParsePerfTotal(out string) (PerfTotal, error) {
	var found []PerfTotal
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		name, values, ok := strings.Cut(sc.Text(), ":")
		if !ok || strings.TrimSpace(name) != "Total" {
			continue
		}
		f := strings.Fields(values)
		if len(f) != 5 {
			return PerfTotal{}, fmt.Errorf("spdk_nvme_perf Total line has %d numbers, want 5: %q", len(f), sc.Text())
		}
		var v [5]float64
		for i, s := range f {
			x, err := strconv.ParseFloat(s, 64)
			if err != nil || x < 0 {
				return PerfTotal{}, fmt.Errorf("spdk_nvme_perf Total line: %q is not a count: %q", s, sc.Text())
			}
			v[i] = x
		}
		found = append(found, PerfTotal{IOPS: v[0], MiBps: v[1], AvgLatUs: v[2], MinLatUs: v[3], MaxLatUs: v[4]})
	}
	switch len(found) {
	case 0:
		return PerfTotal{}, fmt.Errorf("spdk_nvme_perf printed no Total line (did it connect?)")
	case 1:
		return found[0], nil
	default:
		return PerfTotal{}, fmt.Errorf("spdk_nvme_perf printed %d Total lines, want one", len(found))
	}
}

// PerfTarget is the transport ID spdk_nvme_perf connects to (-r).
type PerfTarget struct {
	Addr string // IPv4 address
	Port int
	NQN  string
}

// PerfArgs are spdk_nvme_perf's arguments for w against t on the cores in
// coreMask: -q total queue depth, -o I/O size, -w pattern, -t seconds, -P
// queue pairs, -c core mask, -r transport ID.
func PerfArgs(w Workload, t PerfTarget, coreMask string) []string {
	secs := int((w.Duration + time.Second - 1) / time.Second)
	return []string{
		"-q", strconv.Itoa(w.QueueDepth),
		"-o", strconv.Itoa(w.IOSize),
		"-w", w.Pattern,
		"-t", strconv.Itoa(secs),
		"-P", strconv.Itoa(w.Queues),
		"-c", coreMask,
		"-r", fmt.Sprintf("trtype:TCP adrfam:IPv4 traddr:%s trsvcid:%d subnqn:%s", t.Addr, t.Port, t.NQN),
	}
}
