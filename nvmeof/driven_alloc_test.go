package nvmeof_test

import (
	"testing"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target/targetproc"
)

// The driven fast path allocates nothing per I/O in steady state (issue
// #14): a 4 KiB read or write deferred and pushed on the Driver's thread,
// as ublk's Serve does, and its completion, with and without digests.
// testing.AllocsPerRun counts every goroutine's allocations, the poll
// driver's too; the target runs in a process of its own.
func TestDrivenAllocsPerIO(t *testing.T) {
	tt := &testTarget{addr: targetproc.Start(t, testNQN, 8<<20)}
	for _, dg := range []bool{false, true} {
		_, ns, q, d := drivenQueue(t, tt, nvmeof.ControllerConfig{HeaderDigest: dg, DataDigest: dg})
		for _, write := range []bool{false, true} {
			buf := make([]byte, 4096)
			allocs := allocsPerIO(t, q, d, 1000, func(r *nvmeof.Request) error {
				if write {
					return ns.PrepareWrite(r, 8, buf, false)
				}
				return ns.PrepareRead(r, 8, buf)
			})
			if allocs != 0 {
				t.Errorf("digests %v, write %v: %v allocations per 4 KiB I/O, want 0", dg, write, allocs)
			}
		}
	}
}

// So does the zero-copy path: 4 KiB and 128 KiB reads and writes whose
// data is Fixed, moved by the driver's fixed-buffer operations and the
// Fixed data's ReadAt and WriteAt.
func TestDrivenFixedAllocsPerIO(t *testing.T) {
	tt := &testTarget{addr: targetproc.Start(t, testNQN, 8<<20)}
	_, ns, q, d := drivenQueue(t, tt, nvmeof.ControllerConfig{HeaderDigest: true})
	for _, size := range []int{4096, 128 << 10} {
		for _, write := range []bool{false, true} {
			data := &nvmeof.TestFixed{B: make([]byte, size)}
			allocs := allocsPerIO(t, q, d, 300, func(r *nvmeof.Request) error {
				if write {
					return ns.PrepareWriteFixed(r, 8, data, false)
				}
				return ns.PrepareReadFixed(r, 8, data)
			})
			if allocs != 0 {
				t.Errorf("size %d, write %v: %v allocations per I/O, want 0", size, write, allocs)
			}
		}
	}
	if d.FixedRecvs.Load() == 0 || d.FixedSends.Load() == 0 {
		t.Errorf("%d fixed receives, %d fixed sends: the 128 KiB I/O did not use them", d.FixedRecvs.Load(), d.FixedSends.Load())
	}
}

// allocsPerIO is the allocations per I/O, in steady state, of a command
// prepare fills, deferred and pushed on the driver's thread (as ublk's
// Serve does), waited for on this goroutine.
func allocsPerIO(t *testing.T, q *nvmeof.Queue, d *nvmeof.PollDriver, runs int, prepare func(r *nvmeof.Request) error) float64 {
	t.Helper()
	var r nvmeof.Request
	done := make(chan error, 1)
	complete := func(err error) { done <- err }
	submit := func() {
		if err := q.Submit(&r, complete); err != nil {
			done <- err
			return
		}
		q.Push()
	}
	var prepErr, ioErr error
	one := func() {
		if prepErr = prepare(&r); prepErr != nil {
			return
		}
		r.Defer = true
		if err := d.Post(submit); err != nil {
			ioErr = err
			return
		}
		if err := <-done; err != nil && ioErr == nil {
			ioErr = err
		}
	}
	for range 100 { // steady state: buffers grown, pools filled
		one()
	}
	allocs := testing.AllocsPerRun(runs, one)
	if prepErr != nil || ioErr != nil {
		t.Fatalf("prepare: %v, I/O: %v", prepErr, ioErr)
	}
	return allocs
}
