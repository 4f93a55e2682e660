package ublk

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

func openControl(t *testing.T) *Control {
	t.Helper()
	c, err := OpenControl()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// createDevice creates a device and registers a cleanup that closes it and
// checks that it is gone.
func createDevice(t *testing.T, c *Control, o Options, b Backend) *Device {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	d, err := c.Create(ctx, o, b)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := d.Close(ctx); err != nil {
			t.Errorf("Close: %v", err)
		}
		assertGone(t, c, d.ID())
	})
	return d
}

// assertGone checks that device id no longer exists, in the driver and in /dev.
func assertGone(t *testing.T, c *Control, id int) {
	t.Helper()
	if info, err := c.DeviceInfo(context.Background(), id); err == nil {
		t.Errorf("device %d still exists after delete: %+v", id, info)
	}
	for _, p := range []string{fmt.Sprintf("/sys/class/ublk-char/ublkc%d", id), fmt.Sprintf("/sys/block/ublkb%d", id)} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s still exists after delete", p)
		}
	}
}

// alignedBuf returns page-aligned memory for O_DIRECT.
func alignedBuf(t testing.TB, n int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

func openBlock(t testing.TB, path string, flags int) *os.File {
	t.Helper()
	var f *os.File
	var err error
	for range 200 {
		if f, err = os.OpenFile(path, flags, 0); err == nil {
			t.Cleanup(func() { f.Close() })
			return f
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal(err)
	return nil
}

// pattern fills b with bytes derived from seed and the offset, so any
// misplaced block is detected.
func pattern(b []byte, seed byte, off int64) {
	for i := 0; i < len(b); i += 8 {
		v := uint64(off+int64(i)) ^ uint64(seed)<<56 ^ 0x9e3779b97f4a7c15
		*(*uint64)(unsafe.Pointer(&b[i])) = v
	}
}

func checkPattern(t testing.TB, what string, got []byte, seed byte, off int64) {
	t.Helper()
	want := make([]byte, len(got))
	pattern(want, seed, off)
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && got[i] == want[i] {
			i++
		}
		t.Fatalf("%s: data mismatch at byte %d (device offset %d)", what, i, off+int64(i))
	}
}

// onCPU runs f on an OS thread pinned to cpu, so that blk-mq submits its
// I/O on that CPU's hardware queue.
func onCPU(t testing.TB, cpu int, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		var set unix.CPUSet
		set.Set(cpu)
		if err := unix.SchedSetaffinity(0, &set); err != nil {
			t.Errorf("sched_setaffinity(%d): %v", cpu, err)
			return
		}
		f()
	}()
	<-done
}

// countingBackend records what reached the backend, per op and queue,
// and completes asynchronously from worker goroutines (as the NVMe backend
// does from its network goroutines) through the inner MemoryBackend.
type countingBackend struct {
	mem     *MemoryBackend
	ops     [8]atomic.Int64
	fua     atomic.Int64
	noUnmap atomic.Int64
	perQ    [64]atomic.Int64
	// inflight counts requests between Serve and Complete; maxInflight
	// is its high-water mark.
	inflight, maxInflight atomic.Int64
	work                  chan *Request
	wg                    sync.WaitGroup
}

func newCountingBackend(t *testing.T, size uint64, workers int) *countingBackend {
	mem, err := NewMemoryBackend(size)
	if err != nil {
		t.Fatal(err)
	}
	b := &countingBackend{mem: mem, work: make(chan *Request, 1024)}
	for range workers {
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			for r := range b.work {
				err := b.mem.Do(r)
				b.inflight.Add(-1)
				r.Complete(err)
			}
		}()
	}
	// Registered before the device's cleanup, so it runs after it: the
	// device is gone before the workers and the memory are.
	t.Cleanup(func() {
		close(b.work)
		b.wg.Wait()
		mem.Close()
	})
	return b
}

func (b *countingBackend) Serve(r *Request) {
	b.ops[r.Op&7].Add(1)
	b.perQ[r.Queue%64].Add(1)
	if r.FUA() {
		b.fua.Add(1)
	}
	if r.Flags&FlagNoUnmap != 0 {
		b.noUnmap.Add(1)
	}
	n := b.inflight.Add(1)
	for m := b.maxInflight.Load(); n > m && !b.maxInflight.CompareAndSwap(m, n); m = b.maxInflight.Load() {
	}
	if cap(b.work) == 0 {
		err := b.mem.Do(r)
		b.inflight.Add(-1)
		r.Complete(err)
		return
	}
	b.work <- r
}
