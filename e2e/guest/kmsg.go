package guest

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Kmsg reads the kernel log records logged after it was opened, without
// blocking and without a goroutine: the caller polls Read. The VM harness
// keeps its own reader of /dev/kmsg (every opener has its own position), so
// this one does not take records away from it.
type Kmsg struct {
	fd int
}

// OpenKmsg opens /dev/kmsg positioned after the last record logged so far.
func OpenKmsg() (*Kmsg, error) {
	fd, err := unix.Open("/dev/kmsg", unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/kmsg: %w", err)
	}
	// SEEK_END on /dev/kmsg: the next read returns the next record logged
	// (Documentation/ABI/testing/dev-kmsg).
	if _, err := unix.Seek(fd, 0, unix.SEEK_END); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("seek /dev/kmsg: %w", err)
	}
	return &Kmsg{fd: fd}, nil
}

// Read returns the messages of the kernel's own records (facility 0) logged
// since the previous Read, oldest first.
func (k *Kmsg) Read() ([]string, error) {
	var msgs []string
	buf := make([]byte, 8192) // one record per read; records are at most 8 KiB with their dictionary
	for {
		n, err := unix.Read(k.fd, buf)
		switch {
		case errors.Is(err, unix.EAGAIN):
			return msgs, nil
		case errors.Is(err, unix.EPIPE):
			// Records were overwritten before they were read; the
			// next read goes on from the oldest one left.
			continue
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			return msgs, fmt.Errorf("read /dev/kmsg: %w", err)
		}
		// "prio,seq,usec,flags;message\n" then optional " KEY=value" lines.
		head, msg, ok := strings.Cut(string(buf[:n]), ";")
		if !ok {
			continue
		}
		msg, _, _ = strings.Cut(msg, "\n")
		prio, _, _ := strings.Cut(head, ",")
		if p, err := strconv.Atoi(prio); err != nil || p>>3 != 0 {
			continue // not the kernel's own (a user wrote to /dev/kmsg)
		}
		msgs = append(msgs, msg)
	}
}

// Close closes /dev/kmsg.
func (k *Kmsg) Close() error { return unix.Close(k.fd) }
