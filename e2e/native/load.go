// Package native is `make bench-native`: the nvmeof host library and the
// in-process target (`ublk-nvmeof serve`) measured against SPDK's own
// initiator (spdk_nvme_perf) and target (nvmf_tgt) on this machine, without
// a VM or the kernel in the I/O path. This file is the host library's load
// generator; perf.go reads spdk_nvme_perf's report, report.go writes the
// table.
package native

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
)

// Workload is one row: the pattern and sizes as spdk_nvme_perf's -w, -o,
// -q, -P and -t name them.
type Workload struct {
	// Pattern is spdk_nvme_perf's -w: randread, randwrite, read or write
	// (read and write are sequential).
	Pattern string
	// IOSize is -o, bytes per I/O.
	IOSize int
	// QueueDepth is -q: I/Os outstanding in all, whatever the number of
	// queues. spdk_nvme_perf keeps -q per namespace and sends each
	// submission to the next of its -P queue pairs; Run keeps each slot
	// on one queue (slot i on queue i mod Queues: QueueDepth/Queues on
	// each, as spdk_nvme_perf has in aggregate, and as the daemon maps a
	// ublk queue to one NVMe queue), and only a depth below Queues
	// alternates, so that every queue carries I/O.
	QueueDepth int
	// Queues is -P, the I/O queues used.
	Queues int
	// Duration is -t.
	Duration time.Duration
}

// Write reports whether the pattern writes.
func (w Workload) Write() bool { return w.Pattern == "randwrite" || w.Pattern == "write" }

// Random reports whether offsets are random.
func (w Workload) Random() bool { return w.Pattern == "randread" || w.Pattern == "randwrite" }

// Validate checks the workload before it sizes anything.
func (w Workload) Validate() error {
	switch {
	case w.Pattern != "randread" && w.Pattern != "randwrite" && w.Pattern != "read" && w.Pattern != "write":
		return fmt.Errorf("pattern %q: want randread, randwrite, read or write", w.Pattern)
	case w.IOSize < 512 || w.IOSize > 1<<20:
		return fmt.Errorf("I/O size %d: want 512 bytes to 1 MiB", w.IOSize)
	case w.QueueDepth < 1 || w.QueueDepth > 4096:
		return fmt.Errorf("queue depth %d: want 1 to 4096", w.QueueDepth)
	case w.Queues < 1 || w.Queues > 64:
		return fmt.Errorf("%d queues: want 1 to 64", w.Queues)
	case w.Duration <= 0:
		return fmt.Errorf("duration %v: want more than zero", w.Duration)
	}
	return nil
}

// Result is what one run measured over its window (from the first
// submission to the moment the duration was up; I/Os completing after it
// are not counted).
type Result struct {
	IOs     uint64
	Elapsed time.Duration
	// CPU is the process's user and system time over the window
	// (getrusage RUSAGE_SELF): every goroutine and thread of the host.
	CPU time.Duration
	// IOSize is the bytes per I/O, for MiBps.
	IOSize int
}

// IOPS is I/Os per second of the window.
func (r Result) IOPS() float64 { return float64(r.IOs) / r.Elapsed.Seconds() }

// MiBps is MiB per second of the window.
func (r Result) MiBps() float64 { return r.IOPS() * float64(r.IOSize) / (1 << 20) }

// CPUPerIO is the CPU time one I/O cost.
func (r Result) CPUPerIO() time.Duration {
	if r.IOs == 0 {
		return 0
	}
	return r.CPU / time.Duration(r.IOs)
}

// WritePattern is the byte every write carries.
const WritePattern = 0xa5

// slot is one outstanding I/O: its request and buffer are made once and
// reused, so the loop allocates nothing per I/O.
type slot struct {
	gen   *generator
	req   nvmeof.Request
	buf   []byte
	rng   uint64 // xorshift64 state
	turn  int    // which queue the next submission goes to
	alt   bool   // turn advances after each submission (depth below queues)
	ios   uint64 // completed within the window; read after the run
	done  func(error)
	index int
}

// generator is one run of Run.
type generator struct {
	w      Workload
	ns     *nvmeof.Namespace
	queues []*nvmeof.IOQueue
	units  uint64 // I/O-sized units in the namespace
	seq    atomic.Uint64
	stop   atomic.Bool
	wg     sync.WaitGroup // one count per slot in flight

	errOnce sync.Once
	err     error
	failed  chan struct{} // closed with err set
}

// Run drives w against ns on queues (w.Queues of them) until w.Duration
// is up or ctx ends: every slot resubmits from its own completion (a
// completion-driven loop, as spdk_nvme_perf's task_complete), with
// QueueDepth slots in all.
func Run(ctx context.Context, queues []*nvmeof.IOQueue, ns *nvmeof.Namespace, w Workload) (Result, error) {
	if err := w.Validate(); err != nil {
		return Result{}, err
	}
	if len(queues) < w.Queues {
		return Result{}, fmt.Errorf("%d I/O queues wanted, the controller gave %d", w.Queues, len(queues))
	}
	if w.IOSize%ns.BlockSize() != 0 || w.IOSize > ns.MaxTransfer {
		return Result{}, fmt.Errorf("I/O size %d: not a multiple of the %d-byte block or above the %d-byte transfer limit", w.IOSize, ns.BlockSize(), ns.MaxTransfer)
	}
	g := &generator{w: w, ns: ns, queues: queues[:w.Queues], units: ns.Blocks / uint64(w.IOSize/ns.BlockSize()),
		failed: make(chan struct{})}
	if g.units == 0 {
		return Result{}, fmt.Errorf("namespace of %d blocks is smaller than one %d-byte I/O", ns.Blocks, w.IOSize)
	}
	if perQueue := (w.QueueDepth + w.Queues - 1) / w.Queues; perQueue > queues[0].Depth() {
		return Result{}, fmt.Errorf("queue depth %d over %d queues is above the queue's %d entries", w.QueueDepth, w.Queues, queues[0].Depth())
	}
	slots := g.makeSlots()

	startCPU, err := processCPU()
	if err != nil {
		return Result{}, err
	}
	start := time.Now()
	for _, s := range slots {
		if err := g.submit(s); err != nil {
			g.stop.Store(true)
			g.wg.Wait()
			return Result{}, err
		}
	}
	g.waitWindow(ctx, w.Duration)
	elapsed := time.Since(start)
	endCPU, err := processCPU()
	g.wg.Wait() // the I/Os still out complete, uncounted
	if err != nil {
		return Result{}, err
	}
	if g.err != nil {
		return Result{}, g.err
	}
	if ctx.Err() != nil {
		return Result{}, ctx.Err()
	}
	res := Result{Elapsed: elapsed, CPU: endCPU - startCPU, IOSize: w.IOSize}
	for _, s := range slots {
		res.IOs += s.ios
	}
	return res, nil
}

func (g *generator) makeSlots() []*slot {
	slots := make([]*slot, g.w.QueueDepth)
	for i := range slots {
		s := &slot{gen: g, buf: make([]byte, g.w.IOSize), rng: uint64(i)*0x9e3779b97f4a7c15 + 1, index: i}
		if g.w.Write() {
			// A pattern, as spdk_nvme_perf writes one (and a test can
			// tell written blocks from the target's zeroes).
			for j := range s.buf {
				s.buf[j] = WritePattern
			}
		}
		s.turn = i % len(g.queues)
		s.alt = g.w.QueueDepth < len(g.queues)
		s.done = s.complete
		slots[i] = s
	}
	return slots
}

// waitWindow returns when d is up or ctx ends, and stops resubmission.
func (g *generator) waitWindow(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	case <-g.failed:
	}
	g.stop.Store(true)
}

// next fills s.req with the slot's next I/O.
func (g *generator) next(s *slot) error {
	var unit uint64
	if g.w.Random() {
		s.rng ^= s.rng << 13
		s.rng ^= s.rng >> 7
		s.rng ^= s.rng << 17
		unit = s.rng % g.units
	} else {
		unit = (g.seq.Add(1) - 1) % g.units
	}
	lba := unit * uint64(g.w.IOSize>>g.ns.BlockShift)
	if g.w.Write() {
		return g.ns.PrepareWrite(&s.req, lba, s.buf, false)
	}
	return g.ns.PrepareRead(&s.req, lba, s.buf)
}

// submit sends the slot's next I/O on its queue; the slot is in flight
// (counted in wg) when it returns nil.
func (g *generator) submit(s *slot) error {
	if err := g.next(s); err != nil {
		return err
	}
	q := g.queues[s.turn]
	if s.alt {
		if s.turn++; s.turn == len(g.queues) {
			s.turn = 0
		}
	}
	g.wg.Add(1)
	if err := q.Submit(&s.req, s.done); err != nil {
		g.wg.Done()
		return err
	}
	return nil
}

// complete is the slot's done callback: count, then resubmit unless the
// window is over.
func (s *slot) complete(err error) {
	g := s.gen
	defer g.wg.Done()
	if err != nil {
		g.fail(fmt.Errorf("I/O failed: %w", err))
		return
	}
	if g.stop.Load() {
		return
	}
	s.ios++
	if err := g.submit(s); err != nil {
		g.fail(fmt.Errorf("resubmit: %w", err))
	}
}

// fail records the first error and ends the run.
func (g *generator) fail(err error) {
	g.errOnce.Do(func() {
		g.err = err
		close(g.failed)
	})
	g.stop.Store(true)
}

// processCPU is the process's user plus system time so far.
func processCPU() (time.Duration, error) {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0, fmt.Errorf("getrusage: %w", err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), nil
}
