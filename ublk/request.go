package ublk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"
	"syscall"

	"github.com/ublk-nvmeof/ublk-nvmeof/ublk/internal/uapi"
)

// Op is the operation of a Request (UBLK_IO_OP_*).
type Op uint8

const (
	OpRead        Op = uapi.UBLK_IO_OP_READ
	OpWrite       Op = uapi.UBLK_IO_OP_WRITE
	OpFlush       Op = uapi.UBLK_IO_OP_FLUSH
	OpDiscard     Op = uapi.UBLK_IO_OP_DISCARD
	OpWriteZeroes Op = uapi.UBLK_IO_OP_WRITE_ZEROES
)

func (o Op) String() string {
	switch o {
	case OpRead:
		return "READ"
	case OpWrite:
		return "WRITE"
	case OpFlush:
		return "FLUSH"
	case OpDiscard:
		return "DISCARD"
	case OpWriteZeroes:
		return "WRITE_ZEROES"
	}
	return fmt.Sprintf("Op(%d)", uint8(o))
}

// ReqFlags are the request flags the kernel passes along (UBLK_IO_F_*).
type ReqFlags uint32

const (
	// FlagFUA: the write must be on stable media when it completes
	// (forced unit access). Only sent when Params.FUA is set.
	FlagFUA ReqFlags = uapi.UBLK_IO_F_FUA
	// FlagNoUnmap: a WRITE_ZEROES that must not deallocate the range.
	FlagNoUnmap        ReqFlags = uapi.UBLK_IO_F_NOUNMAP
	FlagFailfastDev    ReqFlags = uapi.UBLK_IO_F_FAILFAST_DEV
	FlagFailfastTransp ReqFlags = uapi.UBLK_IO_F_FAILFAST_TRANSPORT
	FlagFailfastDriver ReqFlags = uapi.UBLK_IO_F_FAILFAST_DRIVER
	FlagMeta           ReqFlags = uapi.UBLK_IO_F_META
	FlagSwap           ReqFlags = uapi.UBLK_IO_F_SWAP
)

// Request is one block I/O request handed to a Backend. It belongs to one
// tag of one queue; the queue reuses it for the tag's next request once
// Complete was called, so a Backend must not touch it afterwards.
type Request struct {
	Queue  int      // hardware queue index
	Tag    int      // ublk tag, unique among the queue's in-flight requests
	Op     Op       // what to do
	Flags  ReqFlags // FUA, NOUNMAP, ...
	Offset int64    // byte offset on the device
	Length int      // bytes; also for FLUSH (0), DISCARD and WRITE_ZEROES
	// Buf is the data buffer for READ (fill it) and WRITE (data to
	// store), exactly Length bytes, nil for other ops. It lives in
	// memory owned by the queue and stays valid until Complete. With
	// zero copy (Options.ZeroCopy) it is nil: the data is reached only
	// through the queue's ring (Request.Ring, RingBackend).
	Buf []byte

	q     *queue
	owned atomic.Bool // true while the Backend holds the request
	// detached, for a request of no device (NewDetachedRequest), gets
	// the result instead of the queue.
	detached func(res int32)
}

// NewDetachedRequest returns a request that belongs to no device, as a
// Backend gets it from Serve: Complete passes detached the result the
// kernel would get in COMMIT_AND_FETCH_REQ (bytes transferred, or a
// negative errno). It lets a Backend be tested, and driven, without the
// kernel. buf is the data buffer for OpRead and OpWrite.
func NewDetachedRequest(queue, tag int, op Op, flags ReqFlags, offset int64, length int, buf []byte, detached func(res int32)) *Request {
	r := &Request{Queue: queue, Tag: tag, Op: op, Flags: flags, Offset: offset, Length: length, Buf: buf, detached: detached}
	r.owned.Store(true)
	return r
}

// FUA reports whether the request carries the forced-unit-access flag.
func (r *Request) FUA() bool { return r.Flags&FlagFUA != 0 }

// Complete finishes the request: nil for success, or an error. A
// syscall.Errno is passed to the kernel as is (it becomes the block layer
// status, e.g. EIO, ENOSPC, EOPNOTSUPP); any other error is reported as
// EIO. Complete may be called from any goroutine, also from within
// Backend.Serve; it never blocks on the queue. Calling it twice panics.
func (r *Request) Complete(err error) {
	if !r.owned.CompareAndSwap(true, false) {
		panic(fmt.Sprintf("ublk: Request queue %d tag %d completed twice (or never served)", r.Queue, r.Tag))
	}
	if r.detached != nil {
		r.detached(r.result(err))
		return
	}
	r.q.complete(r.Tag, r.result(err))
}

// result is the value COMMIT_AND_FETCH_REQ passes back: bytes transferred
// for READ and WRITE, 0 otherwise, or a negative errno.
func (r *Request) result(err error) int32 {
	if err != nil {
		var errno syscall.Errno
		if errors.As(err, &errno) && errno != 0 {
			return -int32(errno)
		}
		return -int32(syscall.EIO)
	}
	if r.Op == OpRead || r.Op == OpWrite {
		return int32(r.Length)
	}
	return 0
}

// ioDesc is a decoded struct ublksrv_io_desc.
type ioDesc struct {
	op          Op
	flags       ReqFlags
	nrSectors   uint32
	startSector uint64
}

// errBadDesc reports an I/O descriptor that cannot be served.
var errBadDesc = errors.New("ublk: invalid I/O descriptor")

// decodeDesc decodes the 24-byte struct ublksrv_io_desc the kernel wrote
// for a tag and checks it against the device limits: the op is one this
// package serves, and READ/WRITE fit in a tag buffer of maxIO bytes. The
// kernel is trusted, but a wrong descriptor must fail one request, never
// corrupt memory or crash the daemon.
func decodeDesc(b []byte, maxIO int) (ioDesc, error) {
	if len(b) < 24 {
		return ioDesc{}, fmt.Errorf("%w: %d bytes", errBadDesc, len(b))
	}
	opFlags := binary.LittleEndian.Uint32(b[0:])
	d := ioDesc{
		op:          Op(opFlags & 0xff),
		flags:       ReqFlags(opFlags &^ 0xff),
		nrSectors:   binary.LittleEndian.Uint32(b[4:]),
		startSector: binary.LittleEndian.Uint64(b[8:]),
	}
	if d.op == OpFlush {
		// A flush has no range; the block layer leaves its position at
		// (sector_t)-1.
		d.startSector, d.nrSectors = 0, 0
		return d, nil
	}
	if d.startSector > (1<<63-1)>>9 || d.startSector+uint64(d.nrSectors) > (1<<63-1)>>9 {
		return d, fmt.Errorf("%w: sector %d+%d out of range", errBadDesc, d.startSector, d.nrSectors)
	}
	switch d.op {
	case OpRead, OpWrite:
		if uint64(d.nrSectors)<<9 > uint64(maxIO) {
			return d, fmt.Errorf("%w: %v of %d sectors exceeds the %d-byte buffer", errBadDesc, d.op, d.nrSectors, maxIO)
		}
	case OpDiscard, OpWriteZeroes:
	default:
		return d, fmt.Errorf("%w: unsupported op %d", errBadDesc, uint8(d.op))
	}
	return d, nil
}
