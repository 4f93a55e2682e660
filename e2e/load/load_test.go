package load

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The load against a plain file (no O_DIRECT: temporary directories are
// often tmpfs): what it wrote verifies, and a block changed behind its back
// does not.
func TestLoadVerifies(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk")
	const blocks = 256
	if err := os.WriteFile(path, make([]byte, blocks*BlockSize), 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := Start(Config{Path: path, Blocks: blocks, RandomJobs: 2, SequentialJobs: 2,
		ReadPercent: 30, MaxIOBlocks: 4, Run: 7})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(time.Minute)
	for l.Stats().WritesAcked < 500 || l.Stats().ReadsOK < 100 {
		if time.Now().After(deadline) {
			t.Fatalf("no progress: %v", l.Stats())
		}
		time.Sleep(time.Millisecond)
	}
	st := l.Stop()
	if st.Mismatches != 0 || st.WritesFailed+st.ReadsFailed != 0 {
		t.Fatalf("%v %v", st, l.Mismatches())
	}
	rep, err := l.Verify(path)
	if err != nil || rep.Blocks != blocks {
		t.Fatalf("%v %v", rep, err)
	}

	// Corrupt one block: another run's stamp.
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	blk := make([]byte, BlockSize)
	Stamp(blk, 8, 5, 1)
	if _, err := f.WriteAt(blk, 5*BlockSize); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := l.Verify(path); err == nil || !strings.Contains(err.Error(), "another run") {
		t.Fatalf("corrupted block passed: %v", err)
	}
}

// A block a failed write left unknown may hold the old content, the new,
// or a mix by sector; nothing else.
func TestCheckBlockUnknown(t *testing.T) {
	old, nw := make([]byte, BlockSize), make([]byte, BlockSize)
	Stamp(old, 1, 9, 3)
	Stamp(nw, 1, 9, 4)
	torn := append(append([]byte{}, old[:2*SectorSize]...), nw[2*SectorSize:]...)
	for name, c := range map[string]struct {
		blk     []byte
		allowed []uint64
		ok      bool
	}{
		"old":             {old, []uint64{3, 4}, true},
		"new":             {nw, []uint64{3, 4}, true},
		"torn":            {torn, []uint64{3, 4}, true},
		"torn, acked one": {torn, []uint64{4}, false},
		"zeros allowed":   {make([]byte, BlockSize), []uint64{0, 4}, true},
		"zeros not":       {make([]byte, BlockSize), []uint64{3}, false},
		"wrong block":     {old, []uint64{3}, true},
	} {
		b := uint64(9)
		if name == "wrong block" {
			b, c.ok = 10, false
		}
		if got := CheckBlock(c.blk, 1, b, c.allowed); (got == "") != c.ok {
			t.Errorf("%s: %q", name, got)
		}
	}
	if seq, ok := ParseStamp(nw); seq != 4 || !ok {
		t.Errorf("ParseStamp = %d, %v", seq, ok)
	}
}
