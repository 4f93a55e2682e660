package ublk

import (
	"fmt"
	"io"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/ublk/internal/uapi"
)

// UserCopy reports whether the request's data can be read and written
// with ReadAt and WriteAt: the device has UBLK_F_USER_COPY (a zero-copy
// device has it, Options.ZeroCopy) and the request carries data.
func (r *Request) UserCopy() bool { return r.q != nil && r.q.userCopy && r.hasData() }

// ReadAt copies a WRITE request's data from byte off on into p (pread on
// /dev/ublkcN, UBLK_F_USER_COPY): for a backend that sends a few bytes of
// a zero-copy request from its own buffer rather than by an operation on
// the registered pages. The driver lets only a WRITE's data be read.
func (r *Request) ReadAt(p []byte, off int64) (int, error) {
	return r.userCopy(p, off, false)
}

// WriteAt copies p into a READ request's data at byte off (pwrite on
// /dev/ublkcN, UBLK_F_USER_COPY). The driver lets only a READ's data be
// written.
func (r *Request) WriteAt(p []byte, off int64) (int, error) {
	return r.userCopy(p, off, true)
}

func (r *Request) userCopy(p []byte, off int64, write bool) (int, error) {
	if !r.UserCopy() {
		return 0, fmt.Errorf("ublk: %v request of queue %d tag %d: no user copy (UBLK_F_USER_COPY)", r.Op, r.Queue, r.Tag)
	}
	if off < 0 || off > int64(r.Length) || int64(len(p)) > int64(r.Length)-off {
		return 0, fmt.Errorf("ublk: bytes %d+%d outside the %d-byte request", off, len(p), r.Length)
	}
	done := 0
	for done < len(p) {
		pos := uapi.UserCopyPos(uint16(r.Queue), uint16(r.Tag), uint32(off)+uint32(done))
		var n int
		var err error
		if write {
			n, err = unix.Pwrite(r.q.cdev, p[done:], pos)
		} else {
			n, err = unix.Pread(r.q.cdev, p[done:], pos)
		}
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return done, fmt.Errorf("ublk: user copy of queue %d tag %d: %w", r.Queue, r.Tag, err)
		}
		if n == 0 {
			return done, io.ErrUnexpectedEOF
		}
		done += n
	}
	return done, nil
}
