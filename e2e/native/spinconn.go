package native

import (
	"context"
	"errors"
	"io"
	"net"
	"runtime"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// SpinDialer returns a ControllerConfig.Dial whose connections poll for
// data before they sleep: a Read first tries the socket without waiting,
// yielding to the other goroutines between tries, for up to spin, and only
// then parks in the netpoller as a plain TCP read does. It is the
// experiment of "what does the library cost without the sleep and wake-up
// of every read": spdk_nvme_perf never sleeps (it polls its sockets), the
// library's reader sleeps in epoll_wait whenever the socket is empty.
// Writes are untouched.
func SpinDialer(spin time.Duration) func(ctx context.Context, addr string) (net.Conn, error) {
	return func(ctx context.Context, addr string) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, err
		}
		tc := c.(*net.TCPConn)
		raw, err := tc.SyscallConn()
		if err != nil {
			c.Close()
			return nil, err
		}
		return &spinConn{TCPConn: tc, raw: raw, spin: spin}, nil
	}
}

// spinConn is a TCP connection whose Read polls first (SpinDialer).
type spinConn struct {
	*net.TCPConn
	raw  syscall.RawConn
	spin time.Duration
}

func (c *spinConn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	var deadline time.Time
	for {
		n, err := c.tryRead(p)
		switch {
		case n > 0:
			return n, nil
		case err == nil:
			return 0, io.EOF // n == 0: the peer closed
		case !errors.Is(err, unix.EAGAIN):
			return 0, err
		}
		now := time.Now()
		if deadline.IsZero() {
			deadline = now.Add(c.spin)
		} else if now.After(deadline) {
			return c.TCPConn.Read(p)
		}
		runtime.Gosched()
	}
}

// tryRead reads once without waiting: EAGAIN when the socket is empty.
func (c *spinConn) tryRead(p []byte) (n int, err error) {
	rerr := c.raw.Read(func(fd uintptr) bool {
		n, err = unix.Read(int(fd), p)
		return true // never wait here
	})
	if rerr != nil {
		return 0, rerr // closed
	}
	if n < 0 {
		n = 0
	}
	return n, err
}
