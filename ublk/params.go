package ublk

import (
	"errors"
	"fmt"
	"math/bits"
	"os"
	"runtime"
	"strconv"
	"strings"
	"unsafe"

	"github.com/ublk-nvmeof/ublk-nvmeof/ublk/internal/uapi"
)

// Params are the block device's properties (UBLK_U_CMD_SET_PARAMS).
type Params struct {
	// Size of the device in bytes; a multiple of LogicalBlockSize.
	Size uint64
	// LogicalBlockSize is the smallest addressable unit: a power of two
	// from 512 to the page size. 0 means 512.
	LogicalBlockSize uint32
	// PhysicalBlockSize is a power of two >= LogicalBlockSize. 0 means
	// LogicalBlockSize.
	PhysicalBlockSize uint32
	// IOMin and IOOpt are the minimum and optimal I/O sizes, powers of
	// two; 0 means PhysicalBlockSize.
	IOMin, IOOpt uint32
	// MaxIOBytes is the largest request (max_sectors) and the size of each
	// tag's buffer; a multiple of the page size. 0 means 512 KiB.
	MaxIOBytes uint32

	ReadOnly   bool
	Rotational bool
	// VolatileCache says the backend has a write cache, so the kernel
	// sends FLUSH requests; FUA additionally lets it send writes with
	// FlagFUA (only meaningful with VolatileCache).
	VolatileCache bool
	FUA           bool

	// Discard, if not nil, enables DISCARD and WRITE_ZEROES.
	Discard *DiscardParams
}

// DiscardParams are the discard and write-zeroes limits.
type DiscardParams struct {
	Alignment   uint32 // bytes
	Granularity uint32 // bytes; 0 means LogicalBlockSize
	// MaxDiscardSectors and MaxWriteZeroesSectors are in 512-byte
	// sectors; 0 disables that operation.
	MaxDiscardSectors     uint32
	MaxWriteZeroesSectors uint32
}

const defaultMaxIOBytes = 512 << 10

// RecoveryMode selects what happens to a device whose daemon dies.
type RecoveryMode int

const (
	// RecoveryNone: the device is removed when the daemon dies.
	RecoveryNone RecoveryMode = iota
	// Recovery (UBLK_F_USER_RECOVERY): the device stays, new I/O is
	// queued until a new daemon recovers it; requests in flight when the
	// daemon died fail with EIO.
	Recovery
	// RecoveryReissue (UBLK_F_USER_RECOVERY_REISSUE): like Recovery, but
	// requests in flight are reissued to the new daemon, so applications
	// see no error. The backend must tolerate a write arriving twice.
	RecoveryReissue
	// RecoveryFailIO (UBLK_F_USER_RECOVERY_FAIL_IO, 6.13): the device
	// stays recoverable, but I/O fails while there is no daemon instead
	// of waiting.
	RecoveryFailIO
)

// AutoID asks the kernel to choose the device number.
const AutoID = -1

// Options describe a device to create.
type Options struct {
	// ID is the device number N of /dev/ublkbN, or AutoID.
	ID int
	// Queues is the number of hardware queues, 1 to the number of CPUs;
	// 0 means 1. Each queue is served by its own OS thread.
	Queues int
	// Depth is the number of tags (in-flight requests) per queue, 1 to
	// 4096.
	Depth int
	Params
	Recovery RecoveryMode
	// ZeroCopy serves READ and WRITE without a copy of their data: the
	// driver registers each request's pages in its queue ring's buffer
	// table (UBLK_F_AUTO_BUF_REG, Linux 6.16) and the Backend, which must
	// be a RingBackend, reads and writes them with fixed-buffer operations
	// on that ring; Request.Buf is nil. Create fails, naming the feature
	// and the release, on a kernel without it.
	ZeroCopy bool
	// BatchIO hands requests over and commits them in batches
	// (UBLK_F_BATCH_IO, Linux 7.0): one multishot fetch per queue names
	// the tags of new requests, and one commit per loop iteration
	// completes every request finished since the last, instead of a
	// command per request. Nothing changes for the Backend. Create fails,
	// naming the feature and the release, on a kernel without it.
	BatchIO bool
}

func isPow2(x uint32) bool { return x != 0 && x&(x-1) == 0 }

func log2(x uint32) uint8 { return uint8(bits.TrailingZeros32(x)) }

// possibleCPUs returns the kernel's nr_cpu_ids (the ADD_DEV clamp for
// nr_hw_queues), falling back to the Go runtime's count.
func possibleCPUs() int {
	b, err := os.ReadFile("/sys/devices/system/cpu/possible")
	if err == nil {
		// "0-3" or "0" or "0-3,5"; nr_cpu_ids is the highest + 1.
		s := strings.TrimSpace(string(b))
		if i := strings.LastIndexAny(s, "-,"); i >= 0 {
			s = s[i+1:]
		}
		if n, err := strconv.Atoi(s); err == nil {
			return n + 1
		}
	}
	return runtime.NumCPU()
}

// normalize fills defaults and validates o, so that bad values give a clear
// error before any device exists (the kernel would silently clamp some of
// them, e.g. nr_hw_queues to the CPU count).
func (o Options) normalize() (Options, error) {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if o.ID < AutoID || o.ID >= 1<<20 { // UBLK_MAX_UBLKS (one minor each)
		bad("ID %d out of range (AutoID or 0..%d)", o.ID, 1<<20-1)
	}
	if o.Queues == 0 {
		o.Queues = 1
	}
	if cpus := possibleCPUs(); o.Queues < 1 || o.Queues > cpus {
		bad("Queues %d: must be 1..%d (the number of CPUs)", o.Queues, cpus)
	}
	if o.Depth < 1 || o.Depth > uapi.UBLK_MAX_QUEUE_DEPTH {
		bad("Depth %d: must be 1..%d", o.Depth, uapi.UBLK_MAX_QUEUE_DEPTH)
	}
	p := &o.Params
	page := uint32(os.Getpagesize())
	if p.LogicalBlockSize == 0 {
		p.LogicalBlockSize = 512
	}
	if !isPow2(p.LogicalBlockSize) || p.LogicalBlockSize < 512 || p.LogicalBlockSize > page {
		bad("LogicalBlockSize %d: must be a power of two from 512 to %d", p.LogicalBlockSize, page)
	}
	if p.PhysicalBlockSize == 0 {
		p.PhysicalBlockSize = p.LogicalBlockSize
	}
	if !isPow2(p.PhysicalBlockSize) || p.PhysicalBlockSize < p.LogicalBlockSize {
		bad("PhysicalBlockSize %d: must be a power of two >= LogicalBlockSize %d", p.PhysicalBlockSize, p.LogicalBlockSize)
	}
	if p.IOMin == 0 {
		p.IOMin = p.PhysicalBlockSize
	}
	if p.IOOpt == 0 {
		p.IOOpt = p.PhysicalBlockSize
	}
	if !isPow2(p.IOMin) || !isPow2(p.IOOpt) {
		bad("IOMin %d and IOOpt %d must be powers of two", p.IOMin, p.IOOpt)
	}
	if p.MaxIOBytes == 0 {
		p.MaxIOBytes = defaultMaxIOBytes
	}
	if p.MaxIOBytes%page != 0 || p.MaxIOBytes < p.LogicalBlockSize || p.MaxIOBytes > 1<<uapi.UBLK_IO_BUF_BITS {
		bad("MaxIOBytes %d: must be a multiple of the page size, at most %d", p.MaxIOBytes, 1<<uapi.UBLK_IO_BUF_BITS)
	}
	if p.Size == 0 || p.LogicalBlockSize != 0 && p.Size%uint64(p.LogicalBlockSize) != 0 {
		bad("Size %d: must be a non-zero multiple of LogicalBlockSize %d", p.Size, p.LogicalBlockSize)
	}
	if p.FUA && !p.VolatileCache {
		bad("FUA needs VolatileCache")
	}
	if d := p.Discard; d != nil {
		if d.Granularity == 0 {
			d.Granularity = p.LogicalBlockSize
		}
		if d.MaxDiscardSectors == 0 && d.MaxWriteZeroesSectors == 0 {
			bad("Discard: set MaxDiscardSectors and/or MaxWriteZeroesSectors")
		}
	}
	if o.Recovery < RecoveryNone || o.Recovery > RecoveryFailIO {
		bad("Recovery %d unknown", o.Recovery)
	}
	if len(errs) > 0 {
		return o, fmt.Errorf("ublk: invalid options: %w", errors.Join(errs...))
	}
	return o, nil
}

// raw converts validated params to the kernel struct.
func (p *Params) raw() uapi.UblkParams {
	var r uapi.UblkParams
	r.Types = uapi.UBLK_PARAM_TYPE_BASIC
	b := &r.Basic
	if p.ReadOnly {
		b.Attrs |= uapi.UBLK_ATTR_READ_ONLY
	}
	if p.Rotational {
		b.Attrs |= uapi.UBLK_ATTR_ROTATIONAL
	}
	if p.VolatileCache {
		b.Attrs |= uapi.UBLK_ATTR_VOLATILE_CACHE
	}
	if p.FUA {
		b.Attrs |= uapi.UBLK_ATTR_FUA
	}
	b.LogicalBsShift = log2(p.LogicalBlockSize)
	b.PhysicalBsShift = log2(p.PhysicalBlockSize)
	b.IoMinShift = log2(p.IOMin)
	b.IoOptShift = log2(p.IOOpt)
	b.MaxSectors = p.MaxIOBytes >> 9
	b.DevSectors = p.Size >> 9
	if d := p.Discard; d != nil {
		r.Types |= uapi.UBLK_PARAM_TYPE_DISCARD
		r.Discard = uapi.UblkParamDiscard{
			DiscardAlignment:      d.Alignment,
			DiscardGranularity:    d.Granularity,
			MaxDiscardSectors:     d.MaxDiscardSectors,
			MaxWriteZeroesSectors: d.MaxWriteZeroesSectors,
			// The driver only supports single-segment discards.
			MaxDiscardSegments: 1,
		}
	}
	r.Len = uint32(unsafe.Sizeof(r))
	return r
}

// paramsFromRaw is the inverse of raw, for GET_PARAMS.
func paramsFromRaw(r *uapi.UblkParams) Params {
	b := &r.Basic
	p := Params{
		Size:              b.DevSectors << 9,
		LogicalBlockSize:  1 << b.LogicalBsShift,
		PhysicalBlockSize: 1 << b.PhysicalBsShift,
		IOMin:             1 << b.IoMinShift,
		IOOpt:             1 << b.IoOptShift,
		MaxIOBytes:        b.MaxSectors << 9,
		ReadOnly:          b.Attrs&uapi.UBLK_ATTR_READ_ONLY != 0,
		Rotational:        b.Attrs&uapi.UBLK_ATTR_ROTATIONAL != 0,
		VolatileCache:     b.Attrs&uapi.UBLK_ATTR_VOLATILE_CACHE != 0,
		FUA:               b.Attrs&uapi.UBLK_ATTR_FUA != 0,
	}
	if r.Types&uapi.UBLK_PARAM_TYPE_DISCARD != 0 {
		d := &r.Discard
		p.Discard = &DiscardParams{
			Alignment:             d.DiscardAlignment,
			Granularity:           d.DiscardGranularity,
			MaxDiscardSectors:     d.MaxDiscardSectors,
			MaxWriteZeroesSectors: d.MaxWriteZeroesSectors,
		}
	}
	return p
}
