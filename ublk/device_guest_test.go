package ublk

import (
	"bytes"
	"errors"
	"os"
	"runtime"
	"sync"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
)

const mib = 1 << 20

// TestGuestMemoryDevice: 2 queues of depth 128 served asynchronously; data
// written with O_DIRECT from every CPU and with buffered I/O reads back
// intact through the device and in the backend; FLUSH, FUA, discard and
// write-zeroes reach the backend and zeroed ranges read back as zeros; the
// device is gone after Close.
func TestGuestMemoryDevice(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	const size = 16 * mib
	b := newCountingBackend(t, size, 4)
	queues := min(2, runtime.NumCPU())
	d := createDevice(t, c, Options{
		ID: AutoID, Queues: queues, Depth: 128,
		Params: Params{
			Size: size, LogicalBlockSize: 512, PhysicalBlockSize: 4096,
			VolatileCache: true, FUA: true,
			Discard: &DiscardParams{MaxDiscardSectors: 1 << 14, MaxWriteZeroesSectors: 1 << 14},
		},
	}, b)
	t.Logf("created %s: %+v", d.BlockDevice(), d.Info())
	if d.Info().Queues != queues || d.Info().Depth != 128 {
		t.Fatalf("device has %d queues of depth %d, want %d of 128", d.Info().Queues, d.Info().Depth, queues)
	}
	got, err := c.Params(t.Context(), d.ID())
	if err != nil {
		t.Fatal(err)
	}
	if got.Size != size || got.PhysicalBlockSize != 4096 || !got.FUA || got.Discard == nil || got.Discard.MaxWriteZeroesSectors != 1<<14 {
		t.Errorf("GET_PARAMS = %+v", got)
	}

	// O_DIRECT: on each CPU 16 writers share that CPU's 2 MiB region in
	// 32 KiB requests, so each queue has many requests in flight; then
	// they read it back.
	f := openBlock(t, d.BlockDevice(), os.O_RDWR|unix.O_DIRECT)
	const region, chunk, writers = 2 * mib, 32 << 10, 16
	var wg sync.WaitGroup
	for cpu := range queues {
		for w := range writers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				onCPU(t, cpu, func() {
					buf := alignedBuf(t, chunk)
					base := int64(cpu) * region
					for off := base + int64(w)*chunk; off < base+region; off += writers * chunk {
						pattern(buf, 1, off)
						if _, err := f.WriteAt(buf, off); err != nil {
							t.Errorf("O_DIRECT write at %d: %v", off, err)
							return
						}
					}
					for off := base + int64(w)*chunk; off < base+region; off += writers * chunk {
						if _, err := f.ReadAt(buf, off); err != nil {
							t.Errorf("O_DIRECT read at %d: %v", off, err)
							return
						}
						checkPattern(t, "O_DIRECT read", buf, 1, off)
					}
				})
			}()
		}
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	for q := range queues {
		if n := b.perQ[q].Load(); n == 0 {
			t.Errorf("queue %d served no request", q)
		}
	}
	if m := b.maxInflight.Load(); m < 4 {
		t.Errorf("at most %d requests were in flight at once; the load should keep several tags busy", m)
	} else {
		t.Logf("up to %d requests in flight at the backend", m)
	}

	// Buffered writes (page cache, writeback in big requests) + fsync.
	bf := openBlock(t, d.BlockDevice(), os.O_RDWR)
	bufd := make([]byte, 4*mib)
	const boff = 8 * mib
	pattern(bufd, 2, boff)
	if _, err := bf.WriteAt(bufd, boff); err != nil {
		t.Fatal(err)
	}
	flushes := b.ops[OpFlush].Load()
	if err := bf.Sync(); err != nil {
		t.Fatal(err)
	}
	if b.ops[OpFlush].Load() == flushes {
		t.Error("fsync with a volatile cache sent no FLUSH")
	}
	checkPattern(t, "backend after buffered write", b.mem.Bytes()[boff:boff+4*mib], 2, boff)
	rbuf := alignedBuf(t, 4*mib)
	if _, err := f.ReadAt(rbuf, boff); err != nil {
		t.Fatal(err)
	}
	checkPattern(t, "O_DIRECT read of buffered write", rbuf, 2, boff)

	// FUA: an O_DSYNC O_DIRECT write is sent with REQ_FUA when the device
	// advertises FUA.
	sf := openBlock(t, d.BlockDevice(), os.O_RDWR|unix.O_DIRECT|unix.O_DSYNC)
	one := alignedBuf(t, 4096)
	pattern(one, 3, 0)
	if _, err := sf.WriteAt(one, 0); err != nil {
		t.Fatal(err)
	}
	if b.fua.Load() == 0 {
		t.Error("O_DSYNC write did not reach the backend with FUA")
	}

	// Discard and write zeroes read back as zeros.
	zeroRange := func(name string, req uintptr, off, n int64, op Op) {
		t.Helper()
		before := b.ops[op].Load()
		r := [2]uint64{uint64(off), uint64(n)}
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), req, uintptr(unsafe.Pointer(&r))); e != 0 {
			t.Fatalf("%s: %v", name, e)
		}
		if b.ops[op].Load() == before {
			t.Errorf("%s sent no %v to the backend", name, op)
		}
		buf := alignedBuf(t, int(n))
		if _, err := f.ReadAt(buf, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf, make([]byte, n)) {
			t.Errorf("%s: range does not read back as zeros", name)
		}
	}
	zeroRange("BLKDISCARD", unix.BLKDISCARD, 1*mib, 1*mib, OpDiscard)
	zeroRange("BLKZEROOUT", unix.BLKZEROOUT, 9*mib, 1*mib, OpWriteZeroes)
	// The rest of the regions is untouched.
	if _, err := f.ReadAt(rbuf[:mib], 0); err != nil {
		t.Fatal(err)
	}
	checkPattern(t, "data next to the discard", rbuf[4096:mib], 1, 4096)
}

// TestGuestBadOptions: invalid options are rejected with a clear error and
// no device is left behind.
func TestGuestBadOptions(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	before, err := c.List(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	good := Options{ID: AutoID, Queues: 1, Depth: 8, Params: Params{Size: mib}}
	cases := map[string]func(*Options){
		"depth 0":              func(o *Options) { o.Depth = 0 },
		"queues above CPUs":    func(o *Options) { o.Queues = possibleCPUs() + 1 },
		"block size 1000":      func(o *Options) { o.LogicalBlockSize = 1000 },
		"physical < logical":   func(o *Options) { o.LogicalBlockSize, o.PhysicalBlockSize = 4096, 512 },
		"size not block-sized": func(o *Options) { o.Size = mib + 100 },
	}
	for name, mutate := range cases {
		o := good
		mutate(&o)
		d, err := c.Create(t.Context(), o, NullBackend{})
		if err == nil {
			d.Close(t.Context())
			t.Errorf("%s: Create succeeded", name)
			continue
		}
		t.Logf("%s: %v", name, err)
	}
	after, err := c.List(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if len(after) != len(before) {
		t.Errorf("devices before %v, after %v", before, after)
	}
	// And an existing id is refused without harming the device.
	d := createDevice(t, c, good, NullBackend{})
	o := good
	o.ID = d.ID()
	if _, err := c.Create(t.Context(), o, NullBackend{}); !errors.Is(err, unix.EEXIST) {
		t.Errorf("Create with the id of a live device: %v, want EEXIST", err)
	}
	if info, err := c.DeviceInfo(t.Context(), d.ID()); err != nil || info.State != StateLive {
		t.Errorf("device after a duplicate create: %+v, %v", info, err)
	}
}
