package nvmeof

import (
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// PollDriver is a Driver on one goroutine that performs the operations
// with poll(2) and non-blocking system calls: an io_uring's behaviour
// (operations complete in the loop, a receive waits for data, a cancel
// ends every operation on a descriptor with -ECANCELED) without the ring,
// so the driven transport is tested on any kernel. ublk's io_uring is
// tested with it in attach and the VM.
type PollDriver struct {
	wake [2]int // pipe: Post's doorbell
	done chan struct{}
	// handle receives every completion; set before the loop starts.
	handle func(userData uint64, res int32)

	mu      sync.Mutex
	posts   []func()
	stopped bool

	// Loop goroutine only; reused, so that the loop allocates nothing
	// in steady state (TestDrivenAllocsPerIO counts every goroutine's
	// allocations).
	ops   []pollOp
	cqes  []pollCQE
	spare []func()
	fds   []unix.PollFd
	drain [64]byte
	tid   int
	Calls atomic.Int64 // completions delivered
	// RecvMax, when set before Start, bounds what one receive reads:
	// PDUs then arrive in pieces. SendMax bounds what one send writes:
	// sends are then resumed.
	RecvMax, SendMax int
	iovs             []unix.Iovec
	// FixedRecvs and FixedSends count RecvFixed and SendFixed calls,
	// FullRecvs RecvFull calls.
	FixedRecvs, FixedSends, FullRecvs atomic.Int64
}

// doorbell is what Post writes to the wake pipe.
var doorbell = []byte{1}

type pollOp struct {
	recv bool
	all  bool // RecvFull: completes once buf is full, EOF or an error
	got  int  // RecvFull: bytes received so far
	fd   int
	buf  []byte
	msg  *unix.Msghdr // a sendmsg's
	ud   uint64
}

type pollCQE struct {
	ud  uint64
	res int32
}

func NewPollDriver(t *testing.T) *PollDriver {
	t.Helper()
	d := &PollDriver{done: make(chan struct{})}
	if err := unix.Pipe2(d.wake[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(d.wake[0]); unix.Close(d.wake[1]) })
	return d
}

func (d *PollDriver) Send(fd int, buf []byte, ud uint64) error {
	d.ops = append(d.ops, pollOp{fd: fd, buf: buf, ud: ud})
	return nil
}

func (d *PollDriver) Sendmsg(fd int, msg *unix.Msghdr, ud uint64) error {
	d.ops = append(d.ops, pollOp{fd: fd, msg: msg, ud: ud})
	return nil
}

// sendmsg is a non-blocking sendmsg(2) of msg, of at most SendMax bytes.
func (d *PollDriver) sendmsg(fd int, msg *unix.Msghdr) (int, error) {
	m := *msg
	if d.SendMax > 0 {
		d.iovs = append(d.iovs[:0], unsafe.Slice(msg.Iov, msg.Iovlen)...)
		left := d.SendMax
		for i := range d.iovs {
			if l := int(d.iovs[i].Len); l >= left {
				d.iovs[i].SetLen(left)
				d.iovs = d.iovs[:i+1]
				break
			}
			left -= int(d.iovs[i].Len)
		}
		m.Iov = &d.iovs[0]
		m.SetIovlen(len(d.iovs))
	}
	n, _, errno := unix.Syscall(unix.SYS_SENDMSG, uintptr(fd), uintptr(unsafe.Pointer(&m)), unix.MSG_NOSIGNAL|unix.MSG_DONTWAIT)
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}

func (d *PollDriver) Recv(fd int, buf []byte, ud uint64) error {
	d.ops = append(d.ops, pollOp{recv: true, fd: fd, buf: buf, ud: ud})
	return nil
}

// RecvFull receives until buf is full, as a ring's MSG_WAITALL receive
// does: each read takes what is there (at most RecvMax), and the
// completion comes once, with every byte, or with those received so far
// at EOF or on an error.
func (d *PollDriver) RecvFull(fd int, buf []byte, ud uint64) error {
	d.ops = append(d.ops, pollOp{recv: true, all: true, fd: fd, buf: buf, ud: ud})
	d.FullRecvs.Add(1)
	return nil
}

func (d *PollDriver) CancelFd(fd int, ud uint64) error {
	n := 0
	kept := d.ops[:0]
	for _, op := range d.ops {
		if op.fd == fd {
			d.cqes = append(d.cqes, pollCQE{op.ud, -int32(unix.ECANCELED)})
			n++
			continue
		}
		kept = append(kept, op)
	}
	d.ops = kept
	d.cqes = append(d.cqes, pollCQE{ud, int32(n)})
	return nil
}

// Forget drops the operations on fd without completing them, as a ring
// closing with them in flight; on the loop.
func (d *PollDriver) Forget(fd int) {
	kept := d.ops[:0]
	for _, op := range d.ops {
		if op.fd != fd {
			kept = append(kept, op)
		}
	}
	d.ops = kept
}

// Fds is the descriptors with an operation in flight; on the loop.
func (d *PollDriver) Fds() []int {
	var fds []int
	for _, op := range d.ops {
		fds = append(fds, op.fd)
	}
	return fds
}

var errDriverStopped = errors.New("poll driver stopped")

func (d *PollDriver) Post(f func()) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.stopped {
		return errDriverStopped
	}
	d.posts = append(d.posts, f)
	unix.Write(d.wake[1], doorbell)
	return nil
}

// Start runs the loop until Stop.
func (d *PollDriver) Start(handle func(uint64, int32)) {
	d.handle = handle
	go d.loop()
}

// Stop ends the loop once stopFn (run on the loop) and every operation
// are done, as ublk's queue does with StopRing and RingIdle.
func (d *PollDriver) Stop(stopFn func(), idle func() bool) {
	d.mu.Lock()
	d.posts = append(d.posts, func() {
		stopFn()
		d.mu.Lock()
		d.stopped = true
		d.mu.Unlock()
	})
	unix.Write(d.wake[1], doorbell)
	d.mu.Unlock()
	<-d.done
	if !idle() {
		panic("poll driver: stopped with the queue still busy")
	}
}

func (d *PollDriver) loop() {
	defer close(d.done)
	d.tid = unix.Gettid()
	for {
		d.mu.Lock()
		posts := d.posts
		d.posts = d.spare[:0]
		d.mu.Unlock()
		for _, f := range posts {
			f()
		}
		clear(posts)
		d.spare = posts
		d.deliver()
		d.mu.Lock()
		stopped := d.stopped && len(d.posts) == 0
		d.mu.Unlock()
		if stopped && len(d.ops) == 0 {
			return
		}
		fds := append(d.fds[:0], unix.PollFd{Fd: int32(d.wake[0]), Events: unix.POLLIN})
		for _, op := range d.ops {
			ev := int16(unix.POLLOUT)
			if op.recv {
				ev = unix.POLLIN
			}
			fds = append(fds, unix.PollFd{Fd: int32(op.fd), Events: ev})
		}
		d.fds = fds
		if _, err := unix.Poll(fds, 1000); err != nil && err != unix.EINTR {
			panic(err)
		}
		unix.Read(d.wake[0], d.drain[:])
		kept := d.ops[:0]
		for i, op := range d.ops {
			if fds[i+1].Revents == 0 {
				kept = append(kept, op)
				continue
			}
			var n int
			var err error
			if op.recv {
				var done bool
				if n, done, err = d.recv(&op); !done {
					kept = append(kept, op)
					continue
				}
			} else if op.msg != nil {
				n, err = d.sendmsg(op.fd, op.msg)
			} else {
				buf := op.buf
				if d.SendMax > 0 && len(buf) > d.SendMax {
					buf = buf[:d.SendMax]
				}
				n, err = unix.SendmsgN(op.fd, buf, nil, nil, unix.MSG_NOSIGNAL|unix.MSG_DONTWAIT)
			}
			if err == unix.EAGAIN {
				kept = append(kept, op)
				continue
			}
			res := int32(n)
			if err != nil {
				res = -int32(err.(unix.Errno))
			}
			d.cqes = append(d.cqes, pollCQE{op.ud, res})
		}
		d.ops = kept
		d.deliver()
	}
}

// recv reads once for a receive. A Recv is done unless the socket had
// nothing (EAGAIN); a RecvFull only once its buffer is full, at EOF or on
// an error, with every byte it received (as a ring's MSG_WAITALL
// receive reports them).
func (d *PollDriver) recv(op *pollOp) (n int, done bool, err error) {
	buf := op.buf[op.got:]
	if d.RecvMax > 0 && len(buf) > d.RecvMax {
		buf = buf[:d.RecvMax]
	}
	n, err = unix.Read(op.fd, buf)
	switch {
	case err == unix.EAGAIN:
		return 0, false, err
	case !op.all:
		return n, true, err
	case err == nil && n > 0:
		op.got += n
		return op.got, op.got == len(op.buf), nil
	case op.got > 0:
		return op.got, true, nil // EOF or an error after some bytes
	}
	return n, true, err
}

func (d *PollDriver) deliver() {
	// handle may queue more (a cancel's): the loop reads the length
	// each time round.
	for i := 0; i < len(d.cqes); i++ {
		c := d.cqes[i]
		d.Calls.Add(1)
		d.handle(c.ud, c.res)
	}
	d.cqes = d.cqes[:0]
}

// TestFixed is Fixed data in memory for the poll driver, which moves it
// with RecvFixed and SendFixed as a ring moves a ublk request's pages;
// Copies counts its ReadAt and WriteAt calls (the user copies).
type TestFixed struct {
	B      []byte
	Copies atomic.Int64
}

func (f *TestFixed) Len() int { return len(f.B) }

func (f *TestFixed) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off > int64(len(f.B)) || int64(len(p)) > int64(len(f.B))-off {
		return 0, errors.New("TestFixed: ReadAt out of range")
	}
	f.Copies.Add(1)
	return copy(p, f.B[off:]), nil
}

func (f *TestFixed) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off > int64(len(f.B)) || int64(len(p)) > int64(len(f.B))-off {
		return 0, errors.New("TestFixed: WriteAt out of range")
	}
	f.Copies.Add(1)
	return copy(f.B[off:], p), nil
}

// RecvFixed receives into a TestFixed's bytes, as Recv does.
func (d *PollDriver) RecvFixed(fd int, data FixedData, off, n int, ud uint64) error {
	d.FixedRecvs.Add(1)
	return d.Recv(fd, data.(*TestFixed).B[off:off+n], ud)
}

// SendFixed sends a TestFixed's bytes, as Send does.
func (d *PollDriver) SendFixed(fd int, data FixedData, off, n int, ud uint64) error {
	d.FixedSends.Add(1)
	return d.Send(fd, data.(*TestFixed).B[off:off+n], ud)
}
