package ublk

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
)

// ringFileBackend serves a device from a memfd with reads and writes put
// on each queue's own io_uring (a RingBackend): fixed-buffer operations on
// the requests' registered pages with zero copy, plain ones on Buf
// otherwise. Short transfers are continued where they stopped.
type ringFileBackend struct {
	fd   int
	reqs [][]*Request // [queue][tag]; each queue's row only on its goroutine
	done [][]int      // bytes of reqs[q][t] transferred so far

	zeroCopied, copied atomic.Int64 // data requests served each way
	failed             atomic.Int64 // operations that failed

	// userCopyHead, when set, moves the first userCopyHead bytes of each
	// zero-copy request by user copy (Request.ReadAt, WriteAt) and the
	// rest by the ring's fixed-buffer operations.
	userCopyHead int
	userCopied   atomic.Int64 // requests with bytes moved by user copy
	wrongWay     atomic.Int64 // user copies against the request's direction that failed as they should
}

func newRingFileBackend(t testing.TB, size int64, queues, depth int) *ringFileBackend {
	t.Helper()
	fd, err := unix.MemfdCreate("ublk-ring-file", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(fd, size); err != nil {
		t.Fatal(err)
	}
	// Registered before the device's cleanup: runs after it.
	t.Cleanup(func() { unix.Close(fd) })
	return ringFileBackendFor(fd, queues, depth)
}

// ringFileBackendFor serves from fd, which the caller keeps open until the
// device is closed.
func ringFileBackendFor(fd int, queues, depth int) *ringFileBackend {
	b := &ringFileBackend{fd: fd, reqs: make([][]*Request, queues), done: make([][]int, queues)}
	for q := range queues {
		b.reqs[q] = make([]*Request, depth)
		b.done[q] = make([]int, depth)
	}
	return b
}

func (b *ringFileBackend) Serve(r *Request) {
	switch r.Op {
	case OpRead, OpWrite:
		if r.ZeroCopy() {
			b.zeroCopied.Add(1)
		} else {
			b.copied.Add(1)
		}
		b.reqs[r.Queue][r.Tag], b.done[r.Queue][r.Tag] = r, 0
		head, err := b.userCopy(r)
		if err == nil && head == r.Length {
			b.end(r, nil)
			return
		}
		b.done[r.Queue][r.Tag] = head
		if err == nil {
			err = b.submit(r, head)
		}
		if err != nil {
			b.end(r, err)
		}
	case OpFlush:
		r.Complete(nil) // a memfd is as durable as it gets
	default:
		r.Complete(unix.EOPNOTSUPP)
	}
}

// userCopy moves the first userCopyHead bytes of a zero-copy request
// between the memfd and the request's pages by pread/pwrite on both, and
// checks that the driver refuses a copy against the request's direction.
func (b *ringFileBackend) userCopy(r *Request) (int, error) {
	if b.userCopyHead == 0 || !r.ZeroCopy() {
		return 0, nil
	}
	buf := make([]byte, min(b.userCopyHead, r.Length))
	var wrong error
	if r.Op == OpWrite {
		if _, err := r.ReadAt(buf, 0); err != nil {
			return 0, err
		}
		if _, err := unix.Pwrite(b.fd, buf, r.Offset); err != nil {
			return 0, err
		}
		_, wrong = r.WriteAt(buf[:1], 0)
	} else {
		if _, err := unix.Pread(b.fd, buf, r.Offset); err != nil {
			return 0, err
		}
		if _, err := r.WriteAt(buf, 0); err != nil {
			return 0, err
		}
		_, wrong = r.ReadAt(buf[:1], 0)
	}
	if !errors.Is(wrong, unix.EACCES) {
		return 0, fmt.Errorf("user copy against a %v's direction: %v, want EACCES", r.Op, wrong)
	}
	b.wrongWay.Add(1)
	b.userCopied.Add(1)
	return len(buf), nil
}

// submit puts the rest of r, from byte off on, on the queue's ring; the
// user data is the tag.
func (b *ringFileBackend) submit(r *Request, off int) error {
	n := r.Length - off
	if r.Op == OpWrite {
		return r.Ring().WriteFrom(r, off, n, b.fd, r.Offset+int64(off), uint64(r.Tag))
	}
	return r.Ring().ReadInto(r, off, n, b.fd, r.Offset+int64(off), uint64(r.Tag))
}

func (b *ringFileBackend) ServesZeroCopy() bool { return true }

func (b *ringFileBackend) RingCompletion(qr *QueueRing, c RingCQE) {
	q, tag := qr.Queue(), int(c.UserData)
	r := b.reqs[q][tag]
	switch {
	case c.Res < 0:
		b.end(r, unix.Errno(-c.Res))
	case c.Res == 0:
		b.end(r, fmt.Errorf("%v of tag %d: no progress at byte %d", r.Op, tag, b.done[q][tag]))
	default:
		b.done[q][tag] += int(c.Res)
		if b.done[q][tag] >= r.Length {
			b.end(r, nil)
		} else if err := b.submit(r, b.done[q][tag]); err != nil {
			b.end(r, err)
		}
	}
}

func (b *ringFileBackend) end(r *Request, err error) {
	if err != nil {
		b.failed.Add(1)
	}
	b.reqs[r.Queue][r.Tag] = nil
	r.Complete(err)
}

// ringTestBackend is a test RingBackend whose store can be read back.
type ringTestBackend interface {
	RingBackend
	stored(off int64, n int) []byte // a copy of the store's bytes
	failures() int64                // ring operations that failed
}

func (b *ringFileBackend) stored(off int64, n int) []byte {
	got := make([]byte, n)
	if _, err := unix.Pread(b.fd, got, off); err != nil {
		panic(err)
	}
	return got
}

func (b *ringFileBackend) failures() int64 { return b.failed.Load() }

// verifyRingDevice writes region bytes through d in each request size
// from 512 bytes to the largest, O_DIRECT from several goroutines, and 4
// MiB buffered; reads it all back through d; and checks the backend's
// store holds the same bytes.
func verifyRingDevice(t *testing.T, d *Device, b ringTestBackend, region int64) {
	f := openBlock(t, d.BlockDevice(), os.O_RDWR|unix.O_DIRECT)
	sizes := []int{512, 4096, 36 << 10, 128 << 10, int(d.Params().MaxIOBytes)}
	var wg sync.WaitGroup
	for i, size := range sizes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			base := int64(i) * region
			buf := alignedBuf(t, size)
			for off := base; off+int64(size) <= base+region; off += int64(size) {
				pattern(buf, byte(i+1), off)
				if _, err := f.WriteAt(buf, off); err != nil {
					t.Errorf("write of %d at %d: %v", size, off, err)
					return
				}
			}
			for off := base; off+int64(size) <= base+region; off += int64(size) {
				if _, err := f.ReadAt(buf, off); err != nil {
					t.Errorf("read of %d at %d: %v", size, off, err)
					return
				}
				checkPattern(t, fmt.Sprintf("O_DIRECT %d-byte read", size), buf, byte(i+1), off)
			}
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	// Buffered: writeback in large requests, then fsync (FLUSH).
	bf := openBlock(t, d.BlockDevice(), os.O_RDWR)
	boff := int64(len(sizes)) * region
	data := make([]byte, 4*mib)
	pattern(data, 9, boff)
	if _, err := bf.WriteAt(data, boff); err != nil {
		t.Fatal(err)
	}
	if err := bf.Sync(); err != nil {
		t.Fatal(err)
	}
	rb := alignedBuf(t, len(data))
	if _, err := f.ReadAt(rb, boff); err != nil {
		t.Fatal(err)
	}
	checkPattern(t, "O_DIRECT read of a buffered write", rb, 9, boff)
	// The backend's store holds what went through the device.
	for i, size := range sizes {
		base := int64(i) * region
		got := b.stored(base, int(region/int64(size)*int64(size)))
		for off := int64(0); off < int64(len(got)); off += int64(size) {
			checkPattern(t, fmt.Sprintf("backend file, %d-byte writes", size), got[off:off+int64(size)], byte(i+1), base+off)
		}
	}
	if n := b.failures(); n != 0 {
		t.Errorf("%d ring operations failed", n)
	}
}

const ringDepth = 64

func ringOptions(zeroCopy bool) Options {
	return Options{ID: AutoID, Queues: min(2, possibleCPUs()), Depth: ringDepth, ZeroCopy: zeroCopy,
		Params: Params{Size: 64 * mib, VolatileCache: true}}
}

// TestGuestRingBackendCopy: a RingBackend without zero copy, on every
// kernel: each READ and WRITE arrives with its copy buffer (Buf) and is
// served by plain reads and writes on the queue's ring; data written
// through the device reads back intact and lands in the backend.
func TestGuestRingBackendCopy(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	o := ringOptions(false)
	b := newRingFileBackend(t, int64(o.Size), o.Queues, o.Depth)
	d := createDevice(t, c, o, b)
	if d.Info().Flags.Has(FeatureAutoBufReg) {
		t.Fatalf("device flags %v: AUTO_BUF_REG without ZeroCopy", d.Info().Flags)
	}
	verifyRingDevice(t, d, b, 4*mib)
	if b.copied.Load() == 0 || b.zeroCopied.Load() != 0 {
		t.Errorf("%d requests with a copy buffer, %d zero-copy; want some, none", b.copied.Load(), b.zeroCopied.Load())
	}
}

// requireZeroCopy checks that a kernel without UBLK_F_AUTO_BUF_REG refuses
// ZeroCopy, naming the feature and the release, and leaves no device;
// then skips with that reason. On a kernel with it, it returns.
func requireZeroCopy(t *testing.T, c *Control) {
	t.Helper()
	requireFeature(t, c, FeatureAutoBufReg, ringOptions(true))
}

// requireFeature checks that a kernel without f refuses Create with o
// (which asks for f), naming the feature and its release, and leaves no
// device; then skips with that reason. On a kernel with it, it returns.
func requireFeature(t *testing.T, c *Control, f Features, o Options) {
	t.Helper()
	have, err := c.Features()
	if err != nil {
		t.Fatal(err)
	}
	if have.Has(f) {
		return
	}
	before, _ := c.List(t.Context())
	d, err := c.Create(t.Context(), o, newRingFileBackend(t, int64(o.Size), o.Queues, o.Depth))
	if err == nil {
		d.Close(t.Context())
		t.Fatalf("Create with %v succeeded on a kernel without it (features %v)", f, have)
	}
	var fe *FeatureError
	if !errors.As(err, &fe) || !strings.Contains(err.Error(), "UBLK_F_"+f.String()) || !strings.Contains(err.Error(), f.since()) {
		t.Fatalf("Create with %v: %v; want a FeatureError naming UBLK_F_%v and %s", f, err, f, f.since())
	}
	if after, _ := c.List(t.Context()); len(after) != len(before) {
		t.Errorf("devices before %v, after the refused Create %v", before, after)
	}
	t.Skipf("%v: %v (Create refused it as it should)", f, err)
}

// TestGuestZeroCopy: with UBLK_F_AUTO_BUF_REG (6.16) each READ and WRITE
// arrives with no copy buffer, its pages registered in the queue ring's
// buffer table at the tag's slot, and the backend's READ_FIXED and
// WRITE_FIXED move the data between them and its file directly; data
// reads back intact in every request size up to the largest. A backend
// that cannot reach registered pages is refused before any device exists.
// Skips on a kernel without the feature after checking Create refuses it.
func TestGuestZeroCopy(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	requireZeroCopy(t, c)
	if _, err := c.Create(t.Context(), ringOptions(true), NullBackend{}); err == nil || !strings.Contains(err.Error(), "RingBackend") {
		t.Errorf("Create with ZeroCopy and a plain Backend: %v; want a refusal naming RingBackend", err)
	}
	o := ringOptions(true)
	b := newRingFileBackend(t, int64(o.Size), o.Queues, o.Depth)
	d := createDevice(t, c, o, b)
	t.Logf("device flags: %v", d.Info().Flags)
	if !d.Info().Flags.Has(FeatureAutoBufReg) {
		t.Fatalf("device flags %v lack AUTO_BUF_REG", d.Info().Flags)
	}
	verifyRingDevice(t, d, b, 4*mib)
	if b.zeroCopied.Load() == 0 || b.copied.Load() != 0 {
		t.Errorf("%d zero-copy requests, %d with a copy buffer; want some, none", b.zeroCopied.Load(), b.copied.Load())
	}
}

// TestGuestZeroCopyUserCopy: a zero-copy device also has UBLK_F_USER_COPY,
// so a backend can move some bytes of a request itself: here the first
// 3,000 bytes of each (less than a sector's multiple, so the user copy
// and the fixed-buffer operation meet mid-sector) by Request.ReadAt and
// WriteAt, the rest by READ_FIXED and WRITE_FIXED on the registered
// pages; data reads back intact in every request size, and a copy
// against the request's direction fails with EACCES. Skips on a kernel
// without UBLK_F_AUTO_BUF_REG after checking Create refuses it.
func TestGuestZeroCopyUserCopy(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	requireZeroCopy(t, c)
	o := ringOptions(true)
	b := newRingFileBackend(t, int64(o.Size), o.Queues, o.Depth)
	b.userCopyHead = 3000
	d := createDevice(t, c, o, b)
	if f := d.Info().Flags; !f.Has(FeatureAutoBufReg | FeatureUserCopy) {
		t.Fatalf("device flags %v: want AUTO_BUF_REG and USER_COPY", f)
	}
	verifyRingDevice(t, d, b, 4*mib)
	if b.userCopied.Load() == 0 || b.wrongWay.Load() != b.userCopied.Load() {
		t.Errorf("%d requests partly user-copied, %d wrong-way copies refused; want some, all", b.userCopied.Load(), b.wrongWay.Load())
	}
}

// TestGuestZeroCopyRecoveryAfterSIGKILL is TestGuestRecoveryAfterSIGKILL
// with zero copy: the daemon dies under write load (four writers, the
// requests it holds registered in its rings' buffer tables); the next one
// recovers the device (still AUTO_BUF_REG) with fresh buffer tables, the
// writers see no error (what was in flight is reissued) and the data
// verifies. Skips on a
// kernel without UBLK_F_AUTO_BUF_REG after checking Create refuses it.
func TestGuestZeroCopyRecoveryAfterSIGKILL(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	requireZeroCopy(t, c)
	recoverAfterSIGKILL(t, c, envZeroCopy+"=1")
}

// seqThroughput streams 128 KiB O_DIRECT requests over the device for
// about dur, jobs goroutines each over its own part, and returns MB/s.
func seqThroughput(t *testing.T, path string, size int64, jobs int, write bool, dur time.Duration) float64 {
	const bs = 128 << 10
	f := openBlock(t, path, os.O_RDWR|unix.O_DIRECT)
	defer f.Close() // now: DEL_DEV waits for every opener
	part := size / int64(jobs) / bs * bs
	var total atomic.Int64
	ctx, cancel := context.WithTimeout(context.Background(), dur)
	defer cancel()
	start := time.Now()
	var wg sync.WaitGroup
	for j := range jobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := alignedBuf(t, bs)
			pattern(buf, byte(j), 0)
			for off := int64(0); ctx.Err() == nil; off = (off + bs) % part {
				var err error
				if write {
					_, err = f.WriteAt(buf, int64(j)*part+off)
				} else {
					_, err = f.ReadAt(buf, int64(j)*part+off)
				}
				if err != nil {
					t.Error(err)
					return
				}
				total.Add(bs)
			}
		}()
	}
	wg.Wait()
	return float64(total.Load()) / time.Since(start).Seconds() / 1e6
}

// TestGuestZeroCopyThroughput measures 128 KiB sequential O_DIRECT reads
// and writes with the copy path and with zero copy, at 1 and 4 streams,
// through the ring file backend (a memfd) and the ring socket backend
// (loopback TCP, where the receiving side copies anyway; WRITE data sent
// with SEND_ZC, or with WRITE_FIXED: tcp-writefixed), and logs MB/s
// and the zero-copy/copy ratio. It asserts no speed (the VM's numbers are
// indicative only), only that the I/O succeeds.
func TestGuestZeroCopyThroughput(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	requireZeroCopy(t, c)
	mbps := map[string]float64{}
	kinds := []string{"file", "tcp", "tcp-writefixed"}
	for _, kind := range kinds {
		for _, zc := range []bool{false, true} {
			o := ringOptions(zc)
			var b ringTestBackend
			if kind == "file" {
				b = newRingFileBackend(t, int64(o.Size), o.Queues, o.Depth)
			} else {
				o.Depth = 16
				sb := newRingSocketBackend(t, int64(o.Size), o.Queues, o.Depth)
				sb.sendCopy = kind == "tcp-writefixed"
				b = sb
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			d, err := c.Create(ctx, o, b)
			cancel()
			if err != nil {
				t.Fatal(err)
			}
			for _, jobs := range []int{1, 4} {
				for _, write := range []bool{true, false} {
					key := fmt.Sprintf("%s %s QD%d", kind, map[bool]string{true: "write", false: "read"}[write], jobs)
					mbps[fmt.Sprintf("%s zc=%v", key, zc)] = seqThroughput(t, d.BlockDevice(), int64(o.Size), jobs, write, 2*time.Second)
				}
			}
			if err := d.Close(context.Background()); err != nil {
				t.Fatal(err)
			}
			if n := b.failures(); n != 0 {
				t.Errorf("%s, zero copy %v: %d ring operations failed", kind, zc, n)
			}
		}
	}
	for _, kind := range kinds {
		for _, rw := range []string{"write QD1", "read QD1", "write QD4", "read QD4"} {
			key := kind + " " + rw
			cp, zc := mbps[key+" zc=false"], mbps[key+" zc=true"]
			t.Logf("128 KiB sequential %s: copy %.0f MB/s, zero copy %.0f MB/s, zero copy/copy %.2f", key, cp, zc, zc/cp)
		}
	}
}
