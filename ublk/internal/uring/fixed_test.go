package uring

import (
	"bytes"
	"errors"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/ublk/internal/uapi"
)

func mmapBuf(t *testing.T, n int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

// waitCQE submits what is prepared and returns the next completion.
func waitCQE(t *testing.T, r *Ring) CQE {
	t.Helper()
	if _, err := r.Submit(1); err != nil {
		t.Fatal(err)
	}
	c, ok := r.ReapCQE()
	if !ok {
		t.Fatal("no CQE after waiting for one")
	}
	return c
}

func getSQE(t *testing.T, r *Ring) SQE {
	t.Helper()
	s, err := r.GetSQE()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func tempFile(t *testing.T) *os.File {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "fixed")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// A sparse table's slots are empty until something (the ublk driver)
// fills them: a fixed read into one fails instead of touching memory.
func TestSparseBufferTable(t *testing.T) {
	r := newRing(t, 4)
	if err := r.RegisterSparseBuffers(4); err != nil {
		if errors.Is(err, unix.EINVAL) {
			t.Skipf("no sparse buffer tables (5.19): %v", err)
		}
		t.Fatal(err)
	}
	f := tempFile(t)
	if _, err := f.Write(make([]byte, 4096)); err != nil {
		t.Fatal(err)
	}
	PrepReadFixed(getSQE(t, r), int(f.Fd()), 0, 0, 4096, 0, 7)
	if c := waitCQE(t, r); c.UserData != 7 || c.Res != -int32(unix.EFAULT) {
		t.Errorf("READ_FIXED into an empty slot: %+v, want res -EFAULT", c)
	}
	PrepReadFixed(getSQE(t, r), int(f.Fd()), 4, 0, 4096, 0, 8)
	if c := waitCQE(t, r); c.Res != -int32(unix.EFAULT) {
		t.Errorf("READ_FIXED past the table: %+v, want res -EFAULT", c)
	}
	if err := r.UnregisterBuffers(); err != nil {
		t.Error(err)
	}
}

// WRITE_FIXED from one registered buffer and READ_FIXED into another, at
// an offset inside it, move the data through a file intact.
func TestFixedReadWrite(t *testing.T) {
	r := newRing(t, 4)
	src, dst := mmapBuf(t, 64<<10), mmapBuf(t, 64<<10)
	if err := r.RegisterBuffers([][]byte{src, dst}); err != nil {
		t.Fatal(err)
	}
	for i := range src {
		src[i] = byte(i*7 + i>>8)
	}
	f := tempFile(t)
	const n, fileOff, dstOff = 32 << 10, 4096, 100
	PrepWriteFixed(getSQE(t, r), int(f.Fd()), 0, FixedAddr(src, 0), n, fileOff, 1)
	if c := waitCQE(t, r); c.Res != n {
		t.Fatalf("WRITE_FIXED: %+v, want res %d", c, n)
	}
	PrepReadFixed(getSQE(t, r), int(f.Fd()), 1, FixedAddr(dst, dstOff), n, fileOff, 2)
	if c := waitCQE(t, r); c.Res != n {
		t.Fatalf("READ_FIXED: %+v, want res %d", c, n)
	}
	if !bytes.Equal(dst[dstOff:dstOff+n], src[:n]) || dst[dstOff-1] != 0 || dst[dstOff+n] != 0 {
		t.Error("READ_FIXED did not land exactly where asked, intact")
	}
	// A fixed op may not reach outside its buffer.
	PrepReadFixed(getSQE(t, r), int(f.Fd()), 1, FixedAddr(dst, len(dst)-10), 4096, fileOff, 3)
	if c := waitCQE(t, r); c.Res != -int32(unix.EFAULT) {
		t.Errorf("READ_FIXED past the buffer's end: %+v, want -EFAULT", c)
	}
}

func tcpPair(t *testing.T) (client, server int) {
	t.Helper()
	l, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(l)
	if err := unix.Bind(l, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(l, 1); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(l)
	if err != nil {
		t.Fatal(err)
	}
	if client, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(client) })
	if err := unix.Connect(client, sa); err != nil {
		t.Fatal(err)
	}
	if server, _, err = unix.Accept4(l, unix.SOCK_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(server) })
	return client, server
}

// SEND_ZC from a registered buffer completes twice (result with F_MORE,
// then F_NOTIF), and READ_FIXED on the receiving socket fills a registered
// buffer: the socket half of a zero-copy data path.
func TestSendZCFixedRecvFixed(t *testing.T) {
	r := newRing(t, 8)
	src, dst := mmapBuf(t, 128<<10), mmapBuf(t, 128<<10)
	if err := r.RegisterBuffers([][]byte{src, dst}); err != nil {
		t.Fatal(err)
	}
	for i := range src {
		src[i] = byte(i ^ i>>9)
	}
	client, server := tcpPair(t)
	const n = 128 << 10
	PrepSendZCFixed(getSQE(t, r), client, 0, FixedAddr(src, 0), n, unix.MSG_NOSIGNAL, 1)
	if _, err := r.Submit(0); err != nil {
		t.Fatal(err)
	}
	var sent int32
	var sendMore, notified bool
	got, reading := 0, false
	for got < n || !notified {
		if got < n && !reading {
			PrepReadFixed(getSQE(t, r), server, 1, FixedAddr(dst, got), uint32(n-got), 0, 2)
			reading = true
		}
		c := waitCQE(t, r)
		switch {
		case c.UserData == 1 && c.Flags&uapi.IORING_CQE_F_NOTIF != 0:
			notified = true
		case c.UserData == 1:
			if c.Res == -int32(unix.EOPNOTSUPP) || c.Res == -int32(unix.EINVAL) {
				t.Skipf("SEND_ZC with a fixed buffer unsupported here: %v", unix.Errno(-c.Res))
			}
			sent, sendMore = c.Res, c.Flags&uapi.IORING_CQE_F_MORE != 0
			if !sendMore {
				notified = true // no notification follows a failed send
			}
		case c.UserData == 2:
			reading = false
			if c.Res <= 0 {
				t.Fatalf("READ_FIXED on the socket: %+v", c)
			}
			got += int(c.Res)
		}
	}
	if sent != n || !sendMore {
		t.Errorf("SEND_ZC: res %d, F_MORE %v; want %d, true", sent, sendMore, n)
	}
	if !bytes.Equal(dst[:n], src[:n]) {
		t.Error("received data differs from what was sent")
	}

	// The copying send from a registered buffer is WRITE_FIXED on the
	// socket: IORING_OP_SEND refuses IORING_RECVSEND_FIXED_BUF (EINVAL;
	// only the _ZC sends take it).
	clear(dst)
	PrepWriteFixed(getSQE(t, r), client, 0, FixedAddr(src, 100), 4096, 0, 3)
	if c := waitCQE(t, r); c.Res != 4096 {
		t.Fatalf("WRITE_FIXED on a socket: %+v, want res 4096", c)
	}
	PrepReadFixed(getSQE(t, r), server, 1, FixedAddr(dst, 0), 4096, 0, 4)
	if c := waitCQE(t, r); c.Res != 4096 || !bytes.Equal(dst[:4096], src[100:4196]) {
		t.Errorf("READ_FIXED of a WRITE_FIXED send: %+v, data equal %v", c, bytes.Equal(dst[:4096], src[100:4196]))
	}
	s := getSQE(t, r)
	PrepSendZCFixed(s, client, 0, FixedAddr(src, 0), 4096, unix.MSG_NOSIGNAL, 5)
	s.Raw().Opcode = 26 // IORING_OP_SEND
	if c := waitCQE(t, r); c.Res != -int32(unix.EINVAL) {
		t.Logf("IORING_OP_SEND with IORING_RECVSEND_FIXED_BUF: res %d (this kernel takes it)", c.Res)
	}
}
