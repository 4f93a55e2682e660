package lifecycle

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/clock"
)

var soak = flag.Int("soak", 0, "connect → I/O → teardown cycles for the stress tests (0: 2000, 1000 with -short)")

var (
	verbose    = flag.Bool("stress.v", false, "log every stress cycle's seed")
	stressSeed = flag.Uint64("stress.seed", 0, "seed of the stress test (0: from the time)")
)

func stressCycles() int {
	switch {
	case *soak > 0:
		return *soak
	case testing.Short():
		return 1000
	}
	return 2000
}

// Thousands of connect → I/O → teardown cycles on the real clock with tiny
// keep-alive intervals and random faults: socket errors, lost and dropped
// responses (command timeouts), keep-alives that never complete, failed
// reconnects. Every acknowledged write must be on the target at the end of
// its cycle, no fake may see a violation, every association must be freed,
// and goleak (TestMain) checks that nothing outlives the test.
func TestStressConnectIOTeardown(t *testing.T) {
	cycles := stressCycles()
	seed := *stressSeed
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	t.Logf("seed %d, %d cycles", seed, cycles)
	rng := rand.New(rand.NewPCG(seed, 0))
	var recoveries, failedIO, ackedIO int
	for i := 0; i < cycles; i++ {
		cs := rng.Uint64()
		if *verbose {
			t.Logf("cycle %d seed %d", i, cs)
		}
		r, f, a := stressCycle(t, rand.New(rand.NewPCG(cs, uint64(i))))
		recoveries += r
		failedIO += f
		ackedIO += a
		if t.Failed() {
			t.Fatalf("cycle %d failed", i)
		}
	}
	t.Logf("%d recoveries, %d writes acknowledged, %d failed", recoveries, ackedIO, failedIO)
	if recoveries == 0 || ackedIO == 0 {
		t.Fatal("the stress test exercised nothing")
	}
}

func stressCycle(t *testing.T, rng *rand.Rand) (recoveries, failed, acked int) {
	v := &violations{}
	tgt := newFakeTarget(v)
	tgt.kato = time.Duration(1+rng.IntN(4)) * time.Millisecond
	tgt.tbkas = rng.IntN(2) == 0
	// Some reconnects fail.
	tgt.connectErrs = []error{nil} // the first connect succeeds
	for j := 0; j < 8; j++ {
		if rng.IntN(4) == 0 {
			tgt.connectErrs = append(tgt.connectErrs, errors.New("connection refused"))
		} else {
			tgt.connectErrs = append(tgt.connectErrs, nil)
		}
	}
	// Some keep-alives never complete: KATO expires.
	if rng.IntN(4) == 0 {
		hang := make(chan *fakeCmd, 64)
		tgt.keepAlives = hang
	}
	opts := DefaultOptions()
	opts.Logger = quiet
	opts.ReconnectDelay = time.Duration(50+rng.IntN(200)) * time.Microsecond
	opts.CtrlLossTmo = -1
	if rng.IntN(4) == 0 {
		opts.FastIOFailTmo = time.Duration(rng.IntN(500)) * time.Microsecond
	}
	c, err := New(tgt, opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(context.Background()); err != nil {
		t.Fatalf("Start: %v", err)
	}
	blk := &fakeBlock{v: v}
	c.SetBlock(blk)

	const writers, writes = 4, 16
	type result struct {
		lastAcked uint64
		attempted map[uint64]bool
		acked     int
		failed    int
	}
	results := make([]result, writers)
	faultRates := make([]int, writers)
	for w := range faultRates {
		faultRates[w] = rng.IntN(20)
	}
	deleteAfter := rng.IntN(writers * writes * 2) // sometimes while I/O is in flight
	var started sync.WaitGroup
	var done sync.WaitGroup
	var mu sync.Mutex
	count := 0
	deleted := make(chan struct{})
	for w := 0; w < writers; w++ {
		done.Add(1)
		started.Add(1)
		wrng := rand.New(rand.NewPCG(rng.Uint64(), uint64(w)))
		go func() {
			defer done.Done()
			started.Done()
			res := &results[w]
			res.attempted = map[uint64]bool{0: true}
			lba := uint64(w)
			for k := 1; k <= writes; k++ {
				val := uint64(k)
				res.attempted[val] = true
				err := c.Do(context.Background(), func(conn Conn) error {
					// Each try may hit a fault.
					f := faultNone
					if wrng.IntN(100) < faultRates[w] {
						f = fault(1 + wrng.IntN(3))
					}
					return conn.(*fakeConn).write(context.Background(), lba, val, f)
				})
				if err == nil {
					res.lastAcked = val
					res.acked++
				} else {
					if !errors.Is(err, syscall.EIO) {
						t.Errorf("write failed with %v, want EIO", err)
					}
					res.failed++
				}
				mu.Lock()
				count++
				if count == deleteAfter {
					close(deleted)
				}
				mu.Unlock()
			}
		}()
	}
	started.Wait()
	select {
	case <-deleted:
	case <-waitAll(&done):
	}
	// Answer nothing on hung keep-alives: they are failed by Shutdown.
	c.Delete()
	done.Wait()

	tgt.mu.Lock()
	for w, res := range results {
		got := tgt.data[uint64(w)]
		if got < res.lastAcked || !res.attempted[got] {
			t.Errorf("block %d holds %d; last acknowledged write %d", w, got, res.lastAcked)
		}
		acked += res.acked
		failed += res.failed
	}
	tgt.mu.Unlock()
	for _, tr := range c.States().History() {
		if tr.To == StateResetting {
			recoveries++
		}
	}
	if c.State() != StateDead {
		t.Errorf("state %v after Delete", c.State())
	}
	if !blk.removed {
		t.Error("block device not removed")
	}
	tgt.checkReleased()
	v.check(t)
	return
}

func waitAll(wg *sync.WaitGroup) <-chan struct{} {
	ch := make(chan struct{})
	go func() { wg.Wait(); close(ch) }()
	return ch
}

// The same controller through many recoveries on the fake clock: every
// recovery tears down and reconnects, and the held I/O completes each time.
func TestManyRecoveriesFakeClock(t *testing.T) {
	h := newHarness(t, nil)
	n := 300
	if testing.Short() {
		n = 50
	}
	for i := 1; i <= n; i++ {
		h.tgt.lastConn().onError(fmt.Errorf("socket error %d", i))
		h.waitEntered(StateConnecting, i+1)
		res := h.doWrite(uint64(i), uint64(i))
		h.clk.WaitTimers(1)
		h.clk.Advance(10 * time.Second)
		if err := <-res; err != nil {
			t.Fatalf("recovery %d: held write: %v", i, err)
		}
	}
	h.finish()
	if got := len(h.tgt.conns); got != n+1 {
		t.Fatalf("%d associations, want %d", got, n+1)
	}
	var _ clock.Clock = h.clk
}
