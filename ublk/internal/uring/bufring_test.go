package uring

import (
	"bytes"
	"testing"

	"golang.org/x/sys/unix"
)

// A receive with IOSQE_BUFFER_SELECT takes the next buffer published in
// the group's ring and names it in its completion; once every published
// buffer is used, the next one fails with ENOBUFS instead of touching
// memory it was not given; a buffer added back is taken again.
func TestBufRingRecvSelect(t *testing.T) {
	onRingThread(t, taskRunFlags, func(r *Ring) {
		a, b := nonblockingTCPPair(t)
		br, err := r.RegisterBufRing(4, 7)
		if err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := br.Close(); err != nil {
				t.Error(err)
			}
		}()
		mem := mmapBuf(t, 2*64)
		bufs := [][]byte{mem[:64], mem[64:]}
		br.Add(bufs[0], 10)
		br.Add(bufs[1], 11)
		br.Advance()

		recv := func(msg string) CQE {
			if _, err := unix.Write(b, []byte(msg)); err != nil {
				t.Fatal(err)
			}
			PrepRecvSelect(getSQE(t, r), a, br.Group(), 1)
			return waitOne(t, r)
		}
		for i, msg := range []string{"first", "second"} {
			c := recv(msg)
			bid, ok := CQEBuffer(c)
			if c.Res != int32(len(msg)) || !ok || bid != uint16(10+i) {
				t.Fatalf("receive %d: res %d, buffer %d (%v); want %d bytes into buffer %d", i, c.Res, bid, ok, len(msg), 10+i)
			}
			if got := bufs[i][:c.Res]; !bytes.Equal(got, []byte(msg)) {
				t.Fatalf("buffer %d holds %q, want %q", bid, got, msg)
			}
		}
		if c := recv("third"); c.Res != -int32(unix.ENOBUFS) {
			t.Fatalf("receive with the ring empty: res %d, want -ENOBUFS", c.Res)
		}
		br.Add(bufs[0], 12)
		br.Advance()
		// "third" is still queued in the socket.
		PrepRecvSelect(getSQE(t, r), a, br.Group(), 1)
		c := waitOne(t, r)
		if bid, ok := CQEBuffer(c); !ok || bid != 12 || string(bufs[0][:max(c.Res, 0)]) != "third" {
			t.Fatalf("after adding a buffer back: res %d, buffer %d (%v), data %q", c.Res, bid, ok, bufs[0][:max(c.Res, 0)])
		}
	})
}

// The ring's size must be a power of two the kernel takes.
func TestBufRingEntriesChecked(t *testing.T) {
	r := newRing(t, 4)
	for _, n := range []int{0, -1, 3, 1 << 16} {
		if br, err := r.RegisterBufRing(n, 1); err == nil {
			br.Close()
			t.Errorf("RegisterBufRing(%d) succeeded", n)
		}
	}
}
