package native

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
)

const testNQN = "nqn.2026-11.io.ublk-nvmeof:native-test"

var testHost = nvmeof.HostIdentity{NQN: "nqn.2014-08.org.nvmexpress:uuid:0b5d3c1e-9a7f-4e2b-8c6d-1f0e2d3c4b5a", ID: [16]byte{0x0b, 0x5d}}

// connect starts the in-process target on a memory namespace of blocks
// 4 KiB blocks and connects with queues I/O queues.
func connect(t *testing.T, blocks int64, queues int, spin time.Duration) (*nvmeof.Controller, *nvmeof.Namespace) {
	t.Helper()
	tg := target.New(target.Config{})
	t.Cleanup(func() { tg.Close() })
	sub, err := tg.AddSubsystem(testNQN)
	if err != nil {
		t.Fatal(err)
	}
	if err := sub.AddNamespace(target.NamespaceConfig{NSID: 1, Backend: target.NewMemoryBackend(blocks << 12), BlockShift: 12}); err != nil {
		t.Fatal(err)
	}
	addr, err := tg.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	cfg := nvmeof.ControllerConfig{Addr: addr.String(), SubsysNQN: testNQN, Host: testHost, IOQueues: queues, QueueSize: 64}
	if spin > 0 {
		cfg.Dial = SpinDialer(spin)
	}
	c, err := nvmeof.Connect(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ns, err := c.Namespace(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	return c, ns
}

// A sequential write on two queues covers the whole (small) namespace
// with the pattern, counts its I/Os and the CPU they took; the blocks read
// back carry the pattern.
func TestRunSequentialWriteReachesTheTarget(t *testing.T) {
	for _, spin := range []time.Duration{0, 50 * time.Microsecond} {
		t.Run(fmt.Sprintf("spin=%v", spin), func(t *testing.T) { testSequentialWrite(t, spin) })
	}
}

func testSequentialWrite(t *testing.T, spin time.Duration) {
	const blocks = 64
	c, ns := connect(t, blocks, 2, spin)
	w := Workload{Pattern: "write", IOSize: 8192, QueueDepth: 4, Queues: 2, Duration: 300 * time.Millisecond}
	res, err := Run(t.Context(), c.IOQueues(), ns, w)
	if err != nil {
		t.Fatal(err)
	}
	// 32 I/Os cover the namespace once; far more fit in 300 ms.
	if res.IOs < blocks/2 || res.Elapsed < w.Duration || res.CPU <= 0 || res.IOSize != 8192 {
		t.Fatalf("result %+v", res)
	}
	if got := res.MiBps(); got != res.IOPS()*8192/(1<<20) || got <= 0 {
		t.Fatalf("MiB/s %v for %v IOPS", got, res.IOPS())
	}
	q := c.IOQueues()[0]
	buf := make([]byte, blocks<<12)
	if err := q.Read(t.Context(), ns, 0, buf); err != nil {
		t.Fatal(err)
	}
	if want := bytes.Repeat([]byte{WritePattern}, len(buf)); !bytes.Equal(buf, want) {
		i := 0
		for buf[i] == WritePattern {
			i++
		}
		t.Fatalf("byte %d of the namespace is %#x, not the pattern: the writes did not cover it", i, buf[i])
	}
	// Both queues carried I/O, as spdk_nvme_perf spreads over -P.
	for _, q := range c.IOQueues() {
		if q.Completions() < blocks/4 {
			t.Fatalf("queue %d completed %d", q.QID(), q.Completions())
		}
	}
	// One slot on two queues alternates: both carry its I/O.
	before := [2]uint64{c.IOQueues()[0].Completions(), c.IOQueues()[1].Completions()}
	w.QueueDepth, w.Duration = 1, 100*time.Millisecond
	if _, err := Run(t.Context(), c.IOQueues(), ns, w); err != nil {
		t.Fatal(err)
	}
	for i, q := range c.IOQueues() {
		if q.Completions() < before[i]+10 {
			t.Fatalf("depth 1 on 2 queues: queue %d completed %d more", q.QID(), q.Completions()-before[i])
		}
	}
}

// Random reads at a depth run and stop; a row the namespace or queue
// cannot hold is refused before anything is sent.
func TestRunRandomReadAndLimits(t *testing.T) {
	c, ns := connect(t, 256, 1, 0)
	res, err := Run(t.Context(), c.IOQueues(), ns, Workload{Pattern: "randread", IOSize: 4096, QueueDepth: 8, Queues: 1, Duration: 200 * time.Millisecond})
	if err != nil || res.IOs == 0 || res.CPUPerIO() <= 0 {
		t.Fatalf("%+v %v", res, err)
	}
	for _, tc := range []struct {
		w    Workload
		want string
	}{
		{Workload{Pattern: "randrw", IOSize: 4096, QueueDepth: 1, Queues: 1, Duration: time.Second}, "pattern"},
		{Workload{Pattern: "read", IOSize: 4096, QueueDepth: 1, Queues: 2, Duration: time.Second}, "2 I/O queues wanted"},
		{Workload{Pattern: "read", IOSize: 2048, QueueDepth: 1, Queues: 1, Duration: time.Second}, "not a multiple"},
		{Workload{Pattern: "read", IOSize: 4096, QueueDepth: 64, Queues: 1, Duration: time.Second}, "above the queue's 63 entries"},
		{Workload{Pattern: "read", IOSize: 4096, QueueDepth: 1, Queues: 1}, "duration"},
	} {
		if _, err := Run(context.Background(), c.IOQueues(), ns, tc.w); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want %q", tc.w, err, tc.want)
		}
	}
}

// A report of spdk_nvme_perf v24.01 against nvmf_tgt over TCP, as
// print_performance writes it.
const perfOutput = `Initializing NVMe Controllers
Attached to NVMe over Fabrics controller at 127.0.0.1:4540: nqn.2016-06.io.spdk:bench
Associating TCP (addr:127.0.0.1 subnqn:nqn.2016-06.io.spdk:bench) NSID 1 with lcore 1
Initialization complete. Launching workers.
========================================================
                                                                                                               Latency(us)
Device Information                                                                     :       IOPS      MiB/s    Average        min        max
TCP (addr:127.0.0.1 subnqn:nqn.2016-06.io.spdk:bench) NSID 1 from core  1:   41234.50     161.07      24.21      15.02     812.33
========================================================
Total                                                                                  :   41234.50     161.07      24.21      15.02     812.33

`

func TestParsePerfTotal(t *testing.T) {
	got, err := ParsePerfTotal(perfOutput)
	if err != nil {
		t.Fatal(err)
	}
	want := PerfTotal{IOPS: 41234.50, MiBps: 161.07, AvgLatUs: 24.21, MinLatUs: 15.02, MaxLatUs: 812.33}
	if got != want {
		t.Fatalf("%+v, want %+v", got, want)
	}
	for _, tc := range []struct{ out, want string }{
		{"Initializing NVMe Controllers\nNo valid NVMe controllers or AIO or URING devices found\n", "no Total line"},
		{strings.Replace(perfOutput, "812.33\n\n", "\n\n", 1), "4 numbers"},
		{strings.Replace(perfOutput, "Total                                                                                  :   41234.50", "Total: x", 1), `"x" is not a count`},
		{perfOutput + perfOutput, "2 Total lines"},
	} {
		if _, err := ParsePerfTotal(tc.out); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v, want %q", err, tc.want)
		}
	}
}

func TestKeepBest(t *testing.T) {
	var runs []float64
	for _, tc := range []struct {
		iops float64
		best bool
	}{{100, true}, {90, false}, {150, true}, {150, false}, {10, false}} {
		if got := Keep(&runs, tc.iops); got != tc.best {
			t.Errorf("Keep(%v) after %v: %v", tc.iops, runs[:len(runs)-1], got)
		}
	}
	if spread(runs) != "10-150" || len(runs) != 5 || spread(nil) != "-" {
		t.Fatalf("%v %q", runs, spread(runs))
	}
}

func TestPerfArgs(t *testing.T) {
	got := strings.Join(PerfArgs(Workload{Pattern: "randwrite", IOSize: 4096, QueueDepth: 32, Queues: 2, Duration: 1500 * time.Millisecond},
		PerfTarget{Addr: "127.0.0.1", Port: 4540, NQN: "nqn.2016-06.io.spdk:bench"}, "0x2"), " ")
	want := "-q 32 -o 4096 -w randwrite -t 2 -P 2 -c 0x2 -r trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:4540 subnqn:nqn.2016-06.io.spdk:bench"
	if got != want {
		t.Fatalf("%s\nwant %s", got, want)
	}
}

// The table carries every row with its ratios, the load and the commands;
// the worst row is the one with the lowest host ratio.
func TestReportMarkdown(t *testing.T) {
	rows := Rows(10 * time.Second)
	if len(rows) != 12 || rows[0].Name() != "4k-randread-qd1-1q" || rows[11].Name() != "128k-write-qd8-2q" {
		t.Fatalf("rows %v", rows)
	}
	rep := &Report{Date: time.Date(2026, 11, 30, 22, 0, 0, 0, time.UTC), Commit: "abc1234", Machine: "2 CPUs",
		LoadBefore: "0.50 0.40 0.30 1/90 100", LoadAfter: "1.10 0.60 0.35 2/95 200", SPDK: "v24.01",
		Commands: []string{"nvmf_tgt --no-huge -s 1024 -u -m 0x1"}, Profile: "4k-randwrite-qd32-1q", ProfileTop: "flat  flat%\n 1s 50% syscall.Syscall"}
	for i, w := range rows[:2] {
		rep.Rows = append(rep.Rows, Row{Workload: w,
			SPDK:     PerfTotal{IOPS: 40000, MiBps: 156.25, AvgLatUs: 25},
			SPDKRuns: []float64{30000, 40000}, HostRuns: []float64{float64(10000 * (i + 1))},
			Host:     Result{IOs: uint64(100000 * (i + 1)), Elapsed: 10 * time.Second, CPU: time.Duration(i+1) * 5 * time.Second, IOSize: 4096},
			Serve:    PerfTotal{IOPS: 20000, MiBps: 78.125, AvgLatUs: 50},
			ServeCPU: 4 * time.Second})
	}
	if Worst(rep.Rows) != 0 || Worst(nil) != -1 {
		t.Fatalf("worst %d", Worst(rep.Rows))
	}
	r := rep.Rows[0]
	// 10000 IOPS / 40000; CPU: 25 µs polling vs 50 µs per I/O.
	if r.HostRatio() != 0.25 || r.HostCPURatio() != 0.5 || r.ServeRatio() != 0.5 {
		t.Fatalf("ratios %v %v %v", r.HostRatio(), r.HostCPURatio(), r.ServeRatio())
	}
	// Measured: 4 s of CPU over 400000 I/Os is 10 µs each.
	r.SPDKCPU = 4 * time.Second
	if r.SPDKCPUPerIO() != 10*time.Microsecond || r.HostCPURatio() != 0.2 {
		t.Fatalf("measured SPDK CPU/IO %v, ratio %v", r.SPDKCPUPerIO(), r.HostCPURatio())
	}
	md := rep.Markdown()
	for _, want := range []string{
		"| 4k-randread-qd1-1q | 40000 | 156.2 | 25.0 | 25.00 | 30000-40000 | 10000 | 39.1 | 50.00 | 10000-10000 | 0.25x | 0.50x |",
		"| 4k-randread-qd32-1q | 40000 | 156.2 | 25.0 | 25.00 | 30000-40000 | 20000 | 78.1 | 50.00 | 20000-20000 | 0.50x | 0.50x |",
		"| 4k-randread-qd1-1q | 40000 | 156.2 | 20000 | 78.1 | - | 25.0 / 50.0 | 20.00 | 0.50x |",
		"before: `0.50 0.40 0.30 1/90 100`, after: `1.10 0.60 0.35 2/95 200`",
		"nvmf_tgt --no-huge -s 1024 -u -m 0x1",
		"worst row: 4k-randwrite-qd32-1q",
		"1s 50% syscall.Syscall",
		"commit: abc1234",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
}
