package uring

import (
	"bytes"
	"errors"
	"net"
	"runtime"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// taskRunFlags are the flags the ublk queue rings use
// (COOP_TASKRUN|SINGLE_ISSUER|DEFER_TASKRUN): the socket operations must
// work on such a ring, driven by the one thread that created it.
const taskRunFlags = 1<<8 | 1<<12 | 1<<13

// onRingThread runs f on a goroutine locked to its OS thread with a fresh
// ring of the given flags, as a ublk queue thread owns its ring. A kernel
// without the flags skips.
func onRingThread(t *testing.T, flags uint32, f func(r *Ring)) {
	t.Helper()
	done := make(chan struct{})
	var skip string
	go func() {
		defer close(done)
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		r, err := New(16, WithFlags(flags))
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) {
			skip = err.Error()
			return
		}
		if err != nil {
			t.Error(err)
			return
		}
		defer r.Close()
		f(r)
	}()
	<-done
	if skip != "" {
		t.Skipf("io_uring with flags %#x unavailable here: %s", flags, skip)
	}
}

// nonblockingTCPPair returns the two ends of a loopback TCP connection as raw,
// O_NONBLOCK file descriptors owned by the caller (the net.Conns are
// closed): the way the NVMe/TCP queues hand their sockets to a ring.
func nonblockingTCPPair(t *testing.T) (a, b int) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		acc <- c
	}()
	ca, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	cb := <-acc
	if cb == nil {
		t.Fatal("accept failed")
	}
	dup := func(c net.Conn) int {
		defer c.Close()
		rc, err := c.(*net.TCPConn).SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		fd := -1
		rc.Control(func(s uintptr) { fd, err = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0) })
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.SetNonblock(fd, true); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(fd) })
		return fd
	}
	return dup(ca), dup(cb)
}

// waitOne submits what is prepared and returns the next completion.
func waitOne(t *testing.T, r *Ring) CQE {
	t.Helper()
	for {
		if c, ok := r.ReapCQE(); ok {
			return c
		}
		if _, err := r.Submit(1); err != nil {
			t.Fatal(err)
		}
	}
}

// A receive posted on an O_NONBLOCK socket before any data waits for the
// data (io_uring polls the socket itself) instead of failing with EAGAIN;
// a send on the other end completes it. On the default ring and on the
// queue rings' task-run flags.
func TestSendRecvNonblockingTCP(t *testing.T) {
	for _, flags := range []uint32{0, taskRunFlags} {
		a, b := nonblockingTCPPair(t)
		in, out := mmapBuf(t, 4096), mmapBuf(t, 4096)
		copy(out, "capsule")
		onRingThread(t, flags, func(r *Ring) {
			PrepRecv(getSQE(t, r), b, in[:64], 0, 1)
			if _, err := r.Submit(0); err != nil {
				t.Fatal(err)
			}
			if c, ok := r.ReapCQE(); ok {
				t.Fatalf("flags %#x: receive completed before any send: %+v", flags, c)
			}
			PrepSend(getSQE(t, r), a, out[:7], unix.MSG_NOSIGNAL, 2)
			got := map[uint64]int32{}
			for len(got) < 2 {
				c := waitOne(t, r)
				got[c.UserData] = c.Res
			}
			if got[1] != 7 || got[2] != 7 || string(in[:7]) != "capsule" {
				t.Fatalf("flags %#x: results %v, received %q", flags, got, in[:7])
			}
		})
	}
}

// A receive of the peer's end of stream completes with 0.
func TestRecvEOF(t *testing.T) {
	a, b := nonblockingTCPPair(t)
	in := mmapBuf(t, 4096)
	onRingThread(t, taskRunFlags, func(r *Ring) {
		PrepRecv(getSQE(t, r), b, in[:64], 0, 5)
		if _, err := r.Submit(0); err != nil {
			t.Fatal(err)
		}
		unix.Shutdown(a, unix.SHUT_WR)
		if c := waitOne(t, r); c.UserData != 5 || c.Res != 0 {
			t.Fatalf("receive at EOF = %+v, want res 0", c)
		}
	})
}

// SENDMSG gathers a header and a payload from two iovecs into one send.
func TestSendmsgGathers(t *testing.T) {
	a, b := nonblockingTCPPair(t)
	mem := mmapBuf(t, 8192)
	hdr, data, in := mem[:8], mem[4096:4096+1000], mem[1024:4096]
	copy(hdr, "HEADER!!")
	for i := range data {
		data[i] = byte(i)
	}
	onRingThread(t, taskRunFlags, func(r *Ring) {
		// The msghdr and iovecs live in the mmap'd page as well: the
		// kernel reads them after Submit returns.
		iov := unsafe.Slice((*unix.Iovec)(unsafe.Pointer(&mem[512])), 2)
		iov[0].Base, iov[1].Base = &hdr[0], &data[0]
		iov[0].SetLen(len(hdr))
		iov[1].SetLen(len(data))
		msg := (*unix.Msghdr)(unsafe.Pointer(&mem[256]))
		msg.Iov = &iov[0]
		msg.SetIovlen(2)
		PrepSendmsg(getSQE(t, r), a, msg, unix.MSG_NOSIGNAL, 3)
		if c := waitOne(t, r); c.UserData != 3 || c.Res != 1008 {
			t.Fatalf("sendmsg = %+v, want 1008 bytes", c)
		}
		var got []byte
		for len(got) < 1008 {
			PrepRecv(getSQE(t, r), b, in, 0, 4)
			c := waitOne(t, r)
			if c.Res <= 0 {
				t.Fatalf("recv = %+v", c)
			}
			got = append(got, in[:c.Res]...)
		}
		if !bytes.Equal(got[:8], hdr) || !bytes.Equal(got[8:], data) {
			t.Fatalf("received %d bytes that are not the header and payload", len(got))
		}
	})
}

// A send of more than the socket buffers hold completes short or waits;
// either way, sending the rest from where it stopped delivers every byte
// in order: the partial-send handling the NVMe/TCP queues rely on.
func TestSendPartialResumes(t *testing.T) {
	a, b := nonblockingTCPPair(t)
	const total = 4 << 20
	out, in := patternBuf(t, total, 7), mmapBuf(t, 64<<10)
	onRingThread(t, taskRunFlags, func(r *Ring) {
		sent, recvd, sends := 0, 0, 0
		var sum []byte
		sendBusy, recvBusy := false, false
		for recvd < total {
			if !sendBusy && sent < total {
				PrepSend(getSQE(t, r), a, out[sent:], unix.MSG_NOSIGNAL, 1)
				sendBusy = true
				sends++
			}
			if !recvBusy {
				PrepRecv(getSQE(t, r), b, in, 0, 2)
				recvBusy = true
			}
			c := waitOne(t, r)
			if c.Res <= 0 {
				t.Fatalf("CQE %+v after %d sent, %d received", c, sent, recvd)
			}
			switch c.UserData {
			case 1:
				sent += int(c.Res)
				sendBusy = false
			case 2:
				sum = append(sum, in[:c.Res]...)
				recvd += int(c.Res)
				recvBusy = false
			}
		}
		if !bytes.Equal(sum, out) {
			t.Fatalf("received bytes differ from those sent (%d sends)", sends)
		}
		t.Logf("%d bytes in %d sends", total, sends)
	})
}

// Cancelling by file descriptor (ASYNC_CANCEL with CANCEL_FD|CANCEL_ALL,
// 5.19) ends every receive and send pending on the socket: each posts
// -ECANCELED (or its real result if it was completing) and the cancel
// reports how many it found. After its CQE and theirs are reaped, nothing
// on the ring references the socket or the buffers: the seed rule on the
// ring (docs/design.md).
func TestCancelFdEndsPendingRecv(t *testing.T) {
	_, b := nonblockingTCPPair(t)
	in := mmapBuf(t, 4096)
	onRingThread(t, taskRunFlags, func(r *Ring) {
		PrepRecv(getSQE(t, r), b, in[:64], 0, 10)
		PrepRecv(getSQE(t, r), b, in[64:128], 0, 11)
		if _, err := r.Submit(0); err != nil {
			t.Fatal(err)
		}
		PrepCancelFd(getSQE(t, r), b, 99)
		got := map[uint64]int32{}
		for len(got) < 3 {
			c := waitOne(t, r)
			got[c.UserData] = c.Res
		}
		if got[99] == -int32(unix.EINVAL) {
			t.Skip("ASYNC_CANCEL by fd needs Linux 5.19")
		}
		if got[10] != -int32(unix.ECANCELED) || got[11] != -int32(unix.ECANCELED) || got[99] != 2 {
			t.Fatalf("results %v, want both receives -ECANCELED and the cancel 2", got)
		}
		// Nothing is left: a second cancel finds none.
		PrepCancelFd(getSQE(t, r), b, 98)
		if c := waitOne(t, r); c.UserData != 98 || c.Res != 0 {
			t.Fatalf("second cancel = %+v, want 0 cancelled", c)
		}
		if c, ok := r.ReapCQE(); ok {
			t.Fatalf("unexpected CQE %+v", c)
		}
	})
}

// Cancelling one request by its user_data leaves the others.
func TestCancelByUserData(t *testing.T) {
	a, b := nonblockingTCPPair(t)
	in := mmapBuf(t, 4096)
	onRingThread(t, taskRunFlags, func(r *Ring) {
		PrepRecv(getSQE(t, r), b, in[:64], 0, 20)
		PrepRecv(getSQE(t, r), a, in[64:128], 0, 21)
		if _, err := r.Submit(0); err != nil {
			t.Fatal(err)
		}
		PrepCancel(getSQE(t, r), 20, 97)
		got := map[uint64]int32{}
		for len(got) < 2 {
			c := waitOne(t, r)
			got[c.UserData] = c.Res
		}
		if got[20] != -int32(unix.ECANCELED) || got[97] != 0 {
			t.Fatalf("results %v, want receive 20 -ECANCELED and the cancel 0", got)
		}
		PrepCancel(getSQE(t, r), 20, 96)
		if c := waitOne(t, r); c.UserData != 96 || c.Res != -int32(unix.ENOENT) {
			t.Fatalf("cancel of a finished request = %+v, want -ENOENT", c)
		}
		// Receive 21 is still armed: it completes with the data.
		copy(in[1024:], "x")
		PrepSend(getSQE(t, r), b, in[1024:1025], unix.MSG_NOSIGNAL, 22)
		got = map[uint64]int32{}
		for len(got) < 2 {
			c := waitOne(t, r)
			got[c.UserData] = c.Res
		}
		if got[21] != 1 || got[22] != 1 {
			t.Fatalf("results %v, want receive 21 and send 22 of 1 byte", got)
		}
	})
}

// With MSG_WAITALL on a stream socket io_uring finishes a partial send or
// receive by itself (Linux 5.18): a 4 MiB send, more than the socket
// buffers hold, completes once with every byte while the peer reads it in
// pieces, and a receive of 1 MiB completes once, full, although the data
// arrives in many segments. What the NVMe/TCP queues rely on to take a
// large PDU's data with one completion (ublk.QueueRing's Send, Sendmsg and
// RecvFull).
func TestWaitAllSendRecv(t *testing.T) {
	a, b := nonblockingTCPPair(t)
	const total = 4 << 20
	out, in := patternBuf(t, total, 13), mmapBuf(t, 1<<20)
	onRingThread(t, taskRunFlags, func(r *Ring) {
		PrepSend(getSQE(t, r), a, out, unix.MSG_NOSIGNAL|unix.MSG_WAITALL, 1)
		recvd, recvs := 0, 0
		sendRes := int32(-1)
		for recvd < total || sendRes < 0 {
			if recvd < total && recvs*len(in) == recvd {
				PrepRecv(getSQE(t, r), b, in, unix.MSG_WAITALL, 2)
				recvs++
			}
			c := waitOne(t, r)
			switch c.UserData {
			case 1:
				if sendRes >= 0 {
					t.Fatalf("second send completion %+v", c)
				}
				sendRes = c.Res
				if sendRes != total {
					t.Fatalf("send completed with %d, want all %d bytes", sendRes, total)
				}
			case 2:
				if c.Res != int32(len(in)) {
					t.Fatalf("receive %d completed with %d bytes, want the full %d", recvs, c.Res, len(in))
				}
				if !bytes.Equal(in, out[recvd:recvd+len(in)]) {
					t.Fatalf("receive %d: bytes differ from those sent", recvs)
				}
				recvd += int(c.Res)
			}
		}
	})
}

// patternBuf is a mapped buffer of n bytes, byte i being i*k: data whose
// every misplaced or lost byte shows.
func patternBuf(t *testing.T, n int, k byte) []byte {
	t.Helper()
	b := mmapBuf(t, n)
	for i := range b {
		b[i] = byte(i) * k
	}
	return b
}
