package ublk

import (
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
)

// ringSocketBackend serves a device from memory held by a peer across TCP,
// the shape of the NVMe/TCP data path: a WRITE's data leaves from the
// request's pages with SEND_ZC on the queue's ring, a READ's data arrives
// into them with READ_FIXED on the socket (with zero copy; from and into
// Buf otherwise). Each tag has its own connection, so data of different
// requests never interleave on a stream; what to do (op, offset, length)
// reaches the peer on a channel, not on the wire.
type ringSocketBackend struct {
	store []byte  // the peer's memory (mmap'd)
	fds   [][]int // [queue][tag]: the queue side's socket
	ctl   [][]chan sockCmd
	st    [][]sockTagState // [queue][tag]; each row only on its queue's goroutine

	// sendCopy sends WRITE data with WriteFrom (WRITE_FIXED on the
	// socket: one copy into the socket, one completion) instead of SendZC.
	sendCopy bool

	wg     sync.WaitGroup // the peer goroutines
	failed atomic.Int64
}

// sockCmd tells the peer of one tag what to move.
type sockCmd struct {
	req    *Request
	write  bool
	off, n int64
	joined *atomic.Int32 // WRITE: ends the request at 0 (queue side done, peer stored)
}

// sockTagState is the queue side of a tag's request in flight.
type sockTagState struct {
	req    *Request
	moved  int // bytes sent or received
	notifs int // SEND_ZC notifications still to come
	joined atomic.Int32
	err    error
}

func newRingSocketBackend(t *testing.T, size int64, queues, depth int) *ringSocketBackend {
	t.Helper()
	store, err := unix.Mmap(-1, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE|unix.MAP_NORESERVE)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	b := &ringSocketBackend{store: store}
	// Registered before the device's cleanup: runs after it. Closing the
	// queue side ends every peer (EOF).
	t.Cleanup(func() {
		for _, row := range b.fds {
			for _, fd := range row {
				unix.Close(fd)
			}
		}
		for _, row := range b.ctl {
			for _, c := range row {
				close(c)
			}
		}
		b.wg.Wait()
		unix.Munmap(store)
	})
	addr := ln.Addr().(*net.TCPAddr)
	for q := range queues {
		b.fds = append(b.fds, make([]int, depth))
		b.ctl = append(b.ctl, make([]chan sockCmd, depth))
		b.st = append(b.st, make([]sockTagState, depth))
		for tag := range depth {
			fd, err := dialRaw(addr)
			if err != nil {
				t.Fatal(err)
			}
			b.fds[q][tag] = fd
			conn, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			b.ctl[q][tag] = make(chan sockCmd, 1)
			b.wg.Add(1)
			go b.peer(conn, b.ctl[q][tag])
		}
	}
	return b
}

// dialRaw connects a plain blocking socket, for the ring (not Go's poller).
func dialRaw(addr *net.TCPAddr) (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	sa := &unix.SockaddrInet4{Port: addr.Port}
	copy(sa.Addr[:], addr.IP.To4())
	if err := unix.Connect(fd, sa); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// peer is the far side of one tag's connection.
func (b *ringSocketBackend) peer(conn net.Conn, ctl <-chan sockCmd) {
	defer b.wg.Done()
	defer conn.Close()
	for c := range ctl {
		data := b.store[c.off : c.off+c.n]
		if !c.write {
			if _, err := conn.Write(data); err != nil {
				b.failed.Add(1)
				return
			}
			continue
		}
		if _, err := io.ReadFull(conn, data); err != nil {
			b.failed.Add(1)
			c.req.Complete(fmt.Errorf("peer: %w", err))
			return
		}
		if c.joined.Add(-1) == 0 {
			c.req.Complete(nil)
		}
	}
}

func (b *ringSocketBackend) Serve(r *Request) {
	if r.Op != OpRead && r.Op != OpWrite {
		r.Complete(nil) // FLUSH: memory
		return
	}
	s := &b.st[r.Queue][r.Tag]
	*s = sockTagState{req: r}
	s.joined.Store(2)
	b.ctl[r.Queue][r.Tag] <- sockCmd{req: r, write: r.Op == OpWrite, off: r.Offset, n: int64(r.Length), joined: &s.joined}
	if err := b.next(r, s); err != nil {
		b.fail(r, s, err)
	}
}

// next puts the rest of r's data on the ring: sent from, or received
// into, its pages (or Buf) from byte s.moved on.
func (b *ringSocketBackend) next(r *Request, s *sockTagState) error {
	fd, n := b.fds[r.Queue][r.Tag], r.Length-s.moved
	switch {
	case r.Op == OpWrite && b.sendCopy:
		return r.Ring().WriteFrom(r, s.moved, n, fd, 0, uint64(r.Tag))
	case r.Op == OpWrite:
		return r.Ring().SendZC(r, s.moved, n, fd, unix.MSG_NOSIGNAL, uint64(r.Tag))
	}
	return r.Ring().ReadInto(r, s.moved, n, fd, 0, uint64(r.Tag))
}

func (b *ringSocketBackend) ServesZeroCopy() bool { return true }

func (b *ringSocketBackend) RingCompletion(qr *QueueRing, c RingCQE) {
	s := &b.st[qr.Queue()][int(c.UserData)]
	r := s.req
	switch {
	case c.Flags&CQEFlagNotif != 0:
		s.notifs--
	case c.Res <= 0:
		s.err = fmt.Errorf("%v of tag %d at byte %d: result %d", r.Op, r.Tag, s.moved, c.Res)
	default:
		if c.Flags&CQEFlagMore != 0 {
			s.notifs++
		}
		s.moved += int(c.Res)
		if s.moved < r.Length {
			if err := b.next(r, s); err != nil {
				s.err = err
			}
			return
		}
	}
	if s.notifs > 0 || (s.err == nil && s.moved < r.Length) {
		return // a SEND_ZC notification still to reap, or data to move
	}
	if s.err != nil {
		b.fail(r, s, s.err)
		return
	}
	if r.Op == OpRead || s.joined.Add(-1) == 0 {
		r.Complete(nil)
	}
}

// fail ends r with err once nothing of it is in flight on the ring; a
// WRITE's peer may still wait for data that will not come: the test fails
// anyway and the cleanup's close ends the peer.
func (b *ringSocketBackend) fail(r *Request, s *sockTagState, err error) {
	b.failed.Add(1)
	if r.Op == OpRead || s.joined.Swap(-1) > 0 {
		r.Complete(err)
	}
}

func (b *ringSocketBackend) stored(off int64, n int) []byte {
	return append([]byte(nil), b.store[off:off+int64(n)]...)
}

func (b *ringSocketBackend) failures() int64 { return b.failed.Load() }

// TestGuestRingSocket: the NVMe/TCP shape of the data path, on the queue's
// ring: WRITE data sent with SEND_ZC (result, then notification, both
// reaped before the request completes), READ data received with
// READ_FIXED on a TCP socket, in request sizes from 512 bytes to the
// largest, O_DIRECT and buffered, intact through the device and at the
// peer. copy: from and into Buf, on every kernel; zerocopy: from and into
// the requests' registered pages (UBLK_F_AUTO_BUF_REG); zerocopy-writefixed:
// the same with WRITE data sent by WRITE_FIXED on the socket. The zero-copy
// ones skip where the kernel lacks it after checking Create refuses it.
func TestGuestRingSocket(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	for _, mode := range []string{"copy", "zerocopy", "zerocopy-writefixed"} {
		t.Run(mode, func(t *testing.T) {
			zc := mode != "copy"
			if zc {
				requireZeroCopy(t, c)
			}
			o := ringOptions(zc)
			o.Depth = 16 // a connection per tag
			b := newRingSocketBackend(t, int64(o.Size), o.Queues, o.Depth)
			b.sendCopy = mode == "zerocopy-writefixed"
			d := createDevice(t, c, o, b)
			if d.Info().Flags.Has(FeatureAutoBufReg) != zc {
				t.Fatalf("device flags %v with ZeroCopy %v", d.Info().Flags, zc)
			}
			verifyRingDevice(t, d, b, mib) // a round trip over TCP per request
		})
	}
}
