package ublk

import (
	"context"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
)

// benchDevice measures O_DIRECT I/O of bs bytes from jobs goroutines
// against a device served by b. Guest only (run the test binary in the VM
// with -test.bench).
func benchDevice(bn *testing.B, b Backend, size int64, bs, jobs int, write bool) {
	guest.Require(bn)
	c, err := OpenControl()
	if err != nil {
		bn.Fatal(err)
	}
	defer c.Close()
	d, err := c.Create(context.Background(), Options{ID: AutoID, Queues: min(2, possibleCPUs()), Depth: 128, Params: Params{Size: uint64(size)}}, b)
	if err != nil {
		bn.Fatal(err)
	}
	defer d.Close(context.Background())
	f := openBlock(bn, d.BlockDevice(), os.O_RDWR|unix.O_DIRECT)
	defer f.Close()
	var next atomic.Int64
	var wg sync.WaitGroup
	bn.SetBytes(int64(bs))
	bn.ResetTimer()
	start := time.Now()
	for j := range jobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := alignedBuf(bn, bs)
			rng := rand.New(rand.NewPCG(uint64(j), 1))
			for next.Add(1) <= int64(bn.N) {
				off := rng.Int64N(size/int64(bs)) * int64(bs)
				var err error
				if write {
					_, err = f.WriteAt(buf, off)
				} else {
					_, err = f.ReadAt(buf, off)
				}
				if err != nil {
					bn.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	bn.ReportMetric(float64(bn.N)/time.Since(start).Seconds(), "IOPS")
}

func BenchmarkGuestNullRead4K(b *testing.B) { benchDevice(b, NullBackend{}, 64*mib, 4096, 16, false) }
func BenchmarkGuestNullRead128K(b *testing.B) {
	benchDevice(b, NullBackend{}, 64*mib, 128<<10, 4, false)
}

func BenchmarkGuestMemoryWrite4K(b *testing.B) {
	m, err := NewMemoryBackend(64 * mib)
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	benchDevice(b, m, 64*mib, 4096, 16, true)
}

// BenchmarkGuestRam0Read4K is the in-kernel baseline for the same load:
// brd's /dev/ram0 (the VM loads brd), no userspace round trip.
func BenchmarkGuestRam0Read4K(bn *testing.B) {
	guest.Require(bn)
	f := openBlock(bn, "/dev/ram0", os.O_RDONLY|unix.O_DIRECT)
	defer f.Close()
	const size, bs, jobs = 32 * mib, 4096, 16
	var next atomic.Int64
	var wg sync.WaitGroup
	bn.SetBytes(bs)
	start := time.Now()
	for j := range jobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := alignedBuf(bn, bs)
			rng := rand.New(rand.NewPCG(uint64(j), 1))
			for next.Add(1) <= int64(bn.N) {
				if _, err := f.ReadAt(buf, rng.Int64N(size/bs)*bs); err != nil {
					bn.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	bn.ReportMetric(float64(bn.N)/time.Since(start).Seconds(), "IOPS")
}

// asyncNull completes every request from another goroutine: the hand-off
// cost (eventfd doorbell, queue wake-up) the NVMe backend pays per batch.
type asyncNull struct{ work chan *Request }

func (a asyncNull) Serve(r *Request) { a.work <- r }

func BenchmarkGuestAsyncNullRead4K(b *testing.B) {
	a := asyncNull{work: make(chan *Request, 256)}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for r := range a.work {
			r.Complete(nil)
		}
	}()
	defer wg.Wait()
	defer close(a.work)
	benchDevice(b, a, 64*mib, 4096, 16, false)
}
