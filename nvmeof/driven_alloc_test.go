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
			var r nvmeof.Request
			buf := make([]byte, 4096)
			done := make(chan error, 1)
			complete := func(err error) { done <- err }
			submit := func() {
				if err := q.Submit(&r, complete); err != nil {
					done <- err
					return
				}
				q.Push()
			}
			var prepErr error
			one := func() {
				if write {
					prepErr = ns.PrepareWrite(&r, 8, buf, false)
				} else {
					prepErr = ns.PrepareRead(&r, 8, buf)
				}
				r.Defer = true
				if err := d.Post(submit); err != nil {
					t.Fatal(err)
				}
				if err := <-done; err != nil {
					t.Fatalf("digests %v, write %v: %v", dg, write, err)
				}
			}
			for range 100 { // steady state: buffers grown, pools filled
				one()
			}
			allocs := testing.AllocsPerRun(1000, one)
			if prepErr != nil {
				t.Fatal(prepErr)
			}
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
			var r nvmeof.Request
			data := &nvmeof.TestFixed{B: make([]byte, size)}
			done := make(chan error, 1)
			complete := func(err error) { done <- err }
			submit := func() {
				if err := q.Submit(&r, complete); err != nil {
					done <- err
					return
				}
				q.Push()
			}
			var prepErr error
			one := func() {
				if write {
					prepErr = ns.PrepareWriteFixed(&r, 8, data, false)
				} else {
					prepErr = ns.PrepareReadFixed(&r, 8, data)
				}
				r.Defer = true
				if err := d.Post(submit); err != nil {
					t.Fatal(err)
				}
				if err := <-done; err != nil {
					t.Fatalf("size %d, write %v: %v", size, write, err)
				}
			}
			for range 100 {
				one()
			}
			allocs := testing.AllocsPerRun(300, one)
			if prepErr != nil {
				t.Fatal(prepErr)
			}
			if allocs != 0 {
				t.Errorf("size %d, write %v: %v allocations per I/O, want 0", size, write, allocs)
			}
		}
	}
	if d.FixedRecvs.Load() == 0 || d.FixedSends.Load() == 0 {
		t.Errorf("%d fixed receives, %d fixed sends: the 128 KiB I/O did not use them", d.FixedRecvs.Load(), d.FixedSends.Load())
	}
}
