package guest

import (
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// AlignedBuf returns n bytes of page-aligned memory, as O_DIRECT needs,
// unmapped when t ends.
func AlignedBuf(t testing.TB, n int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Munmap(b) })
	return b
}

// DirectIO writes buf at off on dev and syncs it, or reads it, with
// O_DIRECT; it fails t on any error.
func DirectIO(t testing.TB, dev string, buf []byte, off int64, write bool) {
	t.Helper()
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if write {
		if _, err = f.WriteAt(buf, off); err == nil {
			err = f.Sync()
		}
	} else {
		_, err = f.ReadAt(buf, off)
	}
	if err != nil {
		t.Fatalf("%s: %v", dev, err)
	}
}
