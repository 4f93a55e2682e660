// Command nvmeof-perf is the nvmeof host library's load generator for
// `make bench-native`: spdk_nvme_perf's workload (-q -o -w -t -P) run by
// the library's completion-driven Queue.Submit loop against one NVMe/TCP
// subsystem. It prints one JSON line: I/Os, the window, the CPU time of
// the process over it (getrusage), IOPS, MiB/s and CPU per I/O.
//
// Pin it as the comparison needs: taskset -c 1 with GOMAXPROCS=1 (-cpus
// does both from inside: sched_setaffinity, then runtime.GOMAXPROCS).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/native"
	"github.com/ublk-nvmeof/ublk-nvmeof/keepalive"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
)

func main() {
	var w native.Workload
	addr := flag.String("addr", "127.0.0.1:4420", "the target's host:port")
	nqn := flag.String("nqn", "", "subsystem NQN")
	flag.IntVar(&w.QueueDepth, "q", 1, "I/Os outstanding in all (spdk_nvme_perf -q)")
	flag.IntVar(&w.IOSize, "o", 4096, "bytes per I/O (-o)")
	flag.StringVar(&w.Pattern, "w", "randread", "randread, randwrite, read or write (-w)")
	flag.DurationVar(&w.Duration, "t", 10*time.Second, "run time (-t)")
	flag.IntVar(&w.Queues, "P", 1, "I/O queues (-P)")
	cpus := flag.String("cpus", "", "pin the process to these CPUs (e.g. 1 or 1,3) and set GOMAXPROCS to their count")
	profile := flag.String("cpuprofile", "", "write a CPU profile of the measured window to this file")
	spin := flag.Duration("spin", 0, "poll each socket this long before a read sleeps (native.SpinDialer; 0: plain TCP, as the daemon)")
	flag.Parse()
	if err := run(*addr, *nqn, w, *cpus, *profile, *spin); err != nil {
		fmt.Fprintf(os.Stderr, "nvmeof-perf: %v\n", err)
		os.Exit(1)
	}
}

// output is the JSON line printed.
type output struct {
	Workload  string  `json:"workload"`
	IOs       uint64  `json:"ios"`
	ElapsedNs int64   `json:"elapsed_ns"`
	CPUNs     int64   `json:"cpu_ns"`
	IOPS      float64 `json:"iops"`
	MiBps     float64 `json:"mib_s"`
	CPUPerIO  float64 `json:"cpu_per_io_us"`
	GOMAXPROC int     `json:"gomaxprocs"`
}

func run(addr, nqn string, w native.Workload, cpus, profile string, spin time.Duration) error {
	if err := w.Validate(); err != nil {
		return err
	}
	if err := nvmeof.ValidateNQN(nqn); err != nil {
		return fmt.Errorf("-nqn: %w", err)
	}
	if cpus != "" {
		if err := pin(cpus); err != nil {
			return err
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	host, err := nvmeof.LoadHostIdentity()
	if err != nil {
		return err
	}
	c, err := connect(ctx, addr, nqn, host, w, spin)
	if err != nil {
		return err
	}
	defer c.Close()
	ns, err := c.Namespace(ctx, 1)
	if err != nil {
		return err
	}
	if profile != "" {
		f, err := os.Create(profile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
	}
	res, err := native.Run(ctx, c.IOQueues(), ns, w)
	if profile != "" {
		pprof.StopCPUProfile()
	}
	if err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(output{Workload: w.Name(), IOs: res.IOs, ElapsedNs: int64(res.Elapsed),
		CPUNs: int64(res.CPU), IOPS: res.IOPS(), MiBps: res.MiBps(),
		CPUPerIO: float64(res.CPUPerIO()) / float64(time.Microsecond), GOMAXPROC: runtime.GOMAXPROCS(0)})
}

// connect makes the association as the daemon does: the admin queue,
// keep-alive (the controller deletes a controller that sends none within
// KATO; traffic-based where it says TBKAS), then the I/O queues, each deep
// enough for the whole depth.
func connect(ctx context.Context, addr, nqn string, host nvmeof.HostIdentity, w native.Workload, spin time.Duration) (*controller, error) {
	cfg := nvmeof.ControllerConfig{Addr: addr, SubsysNQN: nqn, Host: host,
		IOQueues: w.Queues, QueueSize: max(nvmeof.DefaultQueueSize, w.QueueDepth+1)}
	if spin > 0 {
		cfg.Dial = native.SpinDialer(spin)
	}
	c, err := nvmeof.ConnectAdmin(ctx, cfg)
	if err != nil {
		return nil, err
	}
	ka := keepalive.Config{KATO: c.KATO()}
	if c.TBKAS() {
		ka.Traffic = c.Traffic()
	}
	cc := &controller{Controller: c, keeper: keepalive.Start(c, ka)}
	if err := c.ConnectIOQueues(ctx); err != nil {
		cc.Close()
		return nil, err
	}
	return cc, nil
}

// controller is the association with its keep-alive.
type controller struct {
	*nvmeof.Controller
	keeper *keepalive.Keeper
}

// Close stops the keep-alive, then tears the association down.
func (c *controller) Close() error {
	c.keeper.Stop()
	return c.Controller.Close()
}

// pin binds every thread of the process to cpus and sets GOMAXPROCS to
// their count. It runs before the runtime starts more threads for us;
// threads it already has inherit nothing, so the affinity is set on each
// through /proc/self/task.
func pin(cpus string) error {
	var set unix.CPUSet
	n := 0
	for _, f := range strings.Split(cpus, ",") {
		cpu, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || cpu < 0 || cpu >= 1024 {
			return fmt.Errorf("-cpus %q: want CPU numbers separated by commas", cpus)
		}
		set.Set(cpu)
		n++
	}
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return err
	}
	for _, t := range tasks {
		tid, err := strconv.Atoi(t.Name())
		if err != nil {
			continue
		}
		if err := unix.SchedSetaffinity(tid, &set); err != nil {
			return fmt.Errorf("sched_setaffinity %d: %w", tid, err)
		}
	}
	runtime.GOMAXPROCS(n)
	return nil
}
