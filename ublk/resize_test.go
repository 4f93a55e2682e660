package ublk

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
)

// Without UBLK_F_UPDATE_SIZE, Resize sends nothing and says which kernel
// it needs; a size that is not a whole number of blocks is refused.
func TestResizeWithoutFeature(t *testing.T) {
	d := &Device{ctrl: &Control{fd: -1, features: FeatureUserRecovery}, params: Params{Size: 1 << 20, LogicalBlockSize: 4096}, size: 1 << 20}
	err := d.Resize(t.Context(), 2<<20)
	var fe *FeatureError
	if !errors.As(err, &fe) || !errors.Is(err, ErrNotSupported) {
		t.Fatalf("Resize without UPDATE_SIZE = %v, want a *FeatureError", err)
	}
	if msg := err.Error(); !strings.Contains(msg, "UBLK_F_UPDATE_SIZE") || !strings.Contains(msg, "Linux 6.16") {
		t.Errorf("error %q does not name the feature and Linux 6.16", msg)
	}
	if d.Size() != 1<<20 {
		t.Errorf("Size() = %d after a failed resize, want %d", d.Size(), 1<<20)
	}

	d.ctrl.features |= FeatureUpdateSize
	for _, size := range []uint64{0, 4096 + 512} {
		if err := d.Resize(t.Context(), size); err == nil || !strings.Contains(err.Error(), "multiple of the 4096 byte block") {
			t.Errorf("Resize(%d) = %v, want a refusal naming the block size", size, err)
		}
	}
	// After Stop has begun the device has no disk: refused locally.
	d.noMoreResize()
	if err := d.Resize(t.Context(), 2<<20); !errors.Is(err, ErrStopped) {
		t.Errorf("Resize after Stop = %v, want ErrStopped", err)
	}
}

// The kernel's view of a disk's size, in bytes.
func sysfsSize(t *testing.T, d *Device) uint64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/sys/block/ublkb%d/size", d.ID()))
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n << 9
}

// On a kernel with UBLK_F_UPDATE_SIZE a serving device grows and shrinks:
// the disk's capacity follows, GET_PARAMS reports it, I/O reaches the new
// area after a grow, and the block layer refuses a write past the end
// after a shrink. Without the feature: skipped, after checking that Resize
// leaves the size alone and says why.
func TestGuestResize(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	const small, large = 4 * mib, 8 * mib
	b, err := NewMemoryBackend(large)
	if err != nil {
		t.Fatal(err)
	}
	d := createDevice(t, c, Options{ID: AutoID, Queues: 1, Depth: 32,
		Params: Params{Size: small, LogicalBlockSize: 4096}}, b)
	if got := sysfsSize(t, d); got != small {
		t.Fatalf("%s is %d bytes, want %d", d.BlockDevice(), got, small)
	}
	feats, _ := c.Features()
	if !feats.Has(FeatureUpdateSize) {
		err := d.Resize(t.Context(), large)
		if !errors.Is(err, ErrNotSupported) {
			t.Fatalf("Resize on a kernel without UPDATE_SIZE = %v, want ErrNotSupported", err)
		}
		if got := sysfsSize(t, d); got != small {
			t.Errorf("%s is %d bytes after a refused resize, want %d", d.BlockDevice(), got, small)
		}
		t.Skipf("kernel lacks UBLK_F_UPDATE_SIZE (features %v): %v", feats, err)
	}

	if err := d.Resize(t.Context(), large); err != nil {
		t.Fatal(err)
	}
	if got := sysfsSize(t, d); got != large {
		t.Fatalf("%s is %d bytes after growing, want %d", d.BlockDevice(), got, large)
	}
	if p, err := c.Params(t.Context(), d.ID()); err != nil || p.Size != large {
		t.Errorf("GET_PARAMS after growing: size %d (%v), want %d", p.Size, err, large)
	}
	f := openBlock(t, d.BlockDevice(), os.O_RDWR|unix.O_DIRECT)
	buf := alignedBuf(t, 4096)
	off := int64(large - 4096) // in the grown area
	pattern(buf, 7, off)
	if _, err := f.WriteAt(buf, off); err != nil {
		t.Fatalf("write in the grown area at %d: %v", off, err)
	}
	checkPattern(t, "backend after a write in the grown area", b.Bytes()[off:off+4096], 7, off)

	if err := d.Resize(t.Context(), small); err != nil {
		t.Fatal(err)
	}
	if got := sysfsSize(t, d); got != small {
		t.Fatalf("%s is %d bytes after shrinking, want %d", d.BlockDevice(), got, small)
	}
	if _, err := f.WriteAt(buf, off); err == nil {
		t.Errorf("a write at %d past the shrunk end (%d) succeeded", off, small)
	}
}
