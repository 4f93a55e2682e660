package ublk

import (
	"encoding/binary"
	"errors"
	"syscall"
	"testing"
)

func desc(opFlags, nr uint32, start uint64) []byte {
	b := make([]byte, 24)
	binary.LittleEndian.PutUint32(b[0:], opFlags)
	binary.LittleEndian.PutUint32(b[4:], nr)
	binary.LittleEndian.PutUint64(b[8:], start)
	binary.LittleEndian.PutUint64(b[16:], 0xdeadbeef) // addr: ignored
	return b
}

func TestDecodeDesc(t *testing.T) {
	const maxIO = 64 << 10
	d, err := decodeDesc(desc(uint32(OpWrite)|uint32(FlagFUA), 16, 2048), maxIO)
	if err != nil {
		t.Fatal(err)
	}
	if d.op != OpWrite || d.flags != FlagFUA || d.nrSectors != 16 || d.startSector != 2048 {
		t.Errorf("decoded %+v", d)
	}
	for _, bad := range [][]byte{
		desc(uint32(OpRead), maxIO/512+1, 0), // larger than the tag buffer
		desc(9, 1, 0),                        // unknown op
		desc(uint32(OpDiscard), 8, 1<<62),    // offset overflows int64 bytes
		make([]byte, 23),
	} {
		if _, err := decodeDesc(bad, maxIO); !errors.Is(err, errBadDesc) {
			t.Errorf("decodeDesc(% x) = %v, want errBadDesc", bad, err)
		}
	}
	// A flush carries sector (sector_t)-1: accepted, with no range.
	if d, err := decodeDesc(desc(uint32(OpFlush), 0, ^uint64(0)), maxIO); err != nil || d.startSector != 0 {
		t.Errorf("flush: %+v, %v", d, err)
	}
	// Discard may be larger than the tag buffer: it carries no data.
	if _, err := decodeDesc(desc(uint32(OpDiscard), 1<<20, 0), maxIO); err != nil {
		t.Errorf("large discard: %v", err)
	}
}

func FuzzDecodeDesc(f *testing.F) {
	f.Add(desc(uint32(OpRead), 8, 0), 4096)
	f.Add(desc(uint32(OpWrite)|uint32(FlagFUA), 1024, 1<<30), 512<<10)
	f.Add(desc(uint32(OpWriteZeroes)|uint32(FlagNoUnmap), 1<<16, 12345), 4096)
	f.Add(desc(uint32(OpFlush), 0, ^uint64(0)), 4096)
	f.Fuzz(func(t *testing.T, b []byte, maxIO int) {
		if maxIO < 0 {
			maxIO = -maxIO
		}
		d, err := decodeDesc(b, maxIO)
		if err != nil {
			return
		}
		if d.op == OpRead || d.op == OpWrite {
			if int64(d.nrSectors)<<9 > int64(maxIO) {
				t.Fatalf("accepted %v of %d sectors with a %d-byte buffer", d.op, d.nrSectors, maxIO)
			}
		}
		off := int64(d.startSector << 9)
		if off < 0 || off+int64(d.nrSectors)<<9 < off {
			t.Fatalf("accepted offset %d + %d sectors that overflow", off, d.nrSectors)
		}
	})
}

func TestRequestResult(t *testing.T) {
	r := &Request{Op: OpRead, Length: 4096}
	if got := r.result(nil); got != 4096 {
		t.Errorf("read result = %d, want 4096", got)
	}
	if got := r.result(syscall.ENOSPC); got != -int32(syscall.ENOSPC) {
		t.Errorf("ENOSPC result = %d", got)
	}
	if got := r.result(errors.New("boom")); got != -int32(syscall.EIO) {
		t.Errorf("generic error result = %d, want -EIO", got)
	}
	r = &Request{Op: OpFlush}
	if got := r.result(nil); got != 0 {
		t.Errorf("flush result = %d, want 0", got)
	}
}

// A detached request hands its result to its function, once.
func TestDetachedRequest(t *testing.T) {
	var got []int32
	buf := make([]byte, 4096)
	r := NewDetachedRequest(1, 7, OpRead, 0, 8192, len(buf), buf, func(res int32) { got = append(got, res) })
	r.Complete(nil)
	if len(got) != 1 || got[0] != 4096 {
		t.Fatalf("results %v, want [4096]", got)
	}
	defer func() {
		if recover() == nil {
			t.Fatal("second Complete did not panic")
		}
	}()
	r.Complete(syscall.EIO)
}
