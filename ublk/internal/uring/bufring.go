package uring

import (
	"fmt"
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/ublk/internal/uapi"
)

// BufRing is a provided buffer ring (IORING_REGISTER_PBUF_RING, 5.19):
// buffers handed to the kernel ahead of time, taken one per completion
// by operations with IOSQE_BUFFER_SELECT on its group. It owns the ring's
// memory (page-aligned anonymous mmap, never on the Go heap) but not the
// buffers it lists: they must stay mapped while they are in the ring or
// named by a completion not yet handled.
//
// Only the ring's submitting thread uses it: the kernel reads the entries
// and the tail, the application alone writes them.
type BufRing struct {
	r       *Ring
	mem     []byte
	entries uint16 // a power of two
	bgid    uint16
	tail    uint16 // next entry to fill; published by Advance
	filled  uint16 // entries filled since the last Advance
}

// maxBufRingEntries is the kernel's limit (io_register_pbuf_ring).
const maxBufRingEntries = 1 << 15

// RegisterBufRing registers a provided buffer ring of entries slots (a
// power of two, at most 32768) as buffer group bgid.
func (r *Ring) RegisterBufRing(entries int, bgid uint16) (*BufRing, error) {
	if entries <= 0 || entries > maxBufRingEntries || entries&(entries-1) != 0 {
		return nil, fmt.Errorf("io_uring: %d buffer ring entries: not a power of two in 1..%d", entries, maxBufRingEntries)
	}
	size := roundUpPage(entries * int(unsafe.Sizeof(uapi.IoUringBuf{})))
	mem, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return nil, os.NewSyscallError("mmap", err)
	}
	reg := uapi.IoUringBufReg{
		RingAddr:    uint64(uintptr(unsafe.Pointer(&mem[0]))),
		RingEntries: uint32(entries),
		Bgid:        bgid,
	}
	if err := r.register(uapi.IORING_REGISTER_PBUF_RING, unsafe.Pointer(&reg), 1); err != nil {
		unix.Munmap(mem)
		return nil, err
	}
	return &BufRing{r: r, mem: mem, entries: uint16(entries), bgid: bgid}, nil
}

func roundUpPage(n int) int {
	p := os.Getpagesize()
	return (n + p - 1) / p * p
}

// Group is the ring's buffer group id, the sqe->buf_group of the
// operations that take its buffers.
func (b *BufRing) Group() uint16 { return b.bgid }

// Add fills the next entry with buf as buffer id bid. The kernel sees it
// only after Advance. At most the ring's entries may be filled and not
// yet used; more would overwrite buffers the kernel has not taken.
func (b *BufRing) Add(buf []byte, bid uint16) {
	i := (b.tail + b.filled) & (b.entries - 1)
	e := (*uapi.IoUringBuf)(unsafe.Pointer(&b.mem[int(i)*int(unsafe.Sizeof(uapi.IoUringBuf{}))]))
	e.Addr = uint64(uintptr(unsafe.Pointer(unsafe.SliceData(buf))))
	e.Len = uint32(len(buf))
	e.Bid = bid
	b.filled++
}

// Advance publishes the entries filled since the last call: the kernel
// may take them from here on. The tail is the first entry's resv field;
// it is written with the bid beside it in one atomic 32-bit store (a
// release on every architecture Go supports), so that the entries are
// visible before it. The first entry's bid is rewritten with the value
// it already has.
func (b *BufRing) Advance() {
	b.tail += b.filled
	b.filled = 0
	p := unsafe.Pointer(&b.mem[uapi.IoUringBufRingTailOffset-2])
	var w [2]uint16 // bid, tail: in memory order, whatever the byte order
	w[0] = *(*uint16)(p)
	w[1] = b.tail
	atomic.StoreUint32((*uint32)(p), *(*uint32)(unsafe.Pointer(&w)))
}

// Close unregisters the ring and unmaps its memory. Operations that may
// still take a buffer from it must have completed.
func (b *BufRing) Close() error {
	if b.mem == nil {
		return nil
	}
	reg := uapi.IoUringBufReg{Bgid: b.bgid}
	err := b.r.register(uapi.IORING_UNREGISTER_PBUF_RING, unsafe.Pointer(&reg), 1)
	unix.Munmap(b.mem)
	b.mem = nil
	return err
}

// CQEBuffer returns the id of the buffer a completion used, and whether it
// used one (IORING_CQE_F_BUFFER).
func CQEBuffer(c CQE) (bid uint16, ok bool) {
	if c.Flags&uapi.IORING_CQE_F_BUFFER == 0 {
		return 0, false
	}
	return uint16(c.Flags >> uapi.IORING_CQE_BUFFER_SHIFT), true
}

// PrepRecvSelect fills s as IORING_OP_RECV into a buffer the kernel takes
// from group bgid (IOSQE_BUFFER_SELECT); the completion names it.
func PrepRecvSelect(s SQE, fd int, bgid uint16, userData uint64) {
	raw := s.Raw()
	raw.Opcode = uapi.IORING_OP_RECV
	raw.Fd = int32(fd)
	raw.Flags |= uapi.IOSQE_BUFFER_SELECT
	raw.BufIndex = bgid // buf_group shares the union with buf_index
	raw.UserData = userData
}

// PrepURingCmdMultishot fills s as a multishot IORING_OP_URING_CMD
// (IORING_URING_CMD_MULTISHOT): each completion takes a buffer of group
// bgid and carries IORING_CQE_F_MORE while more may follow.
func PrepURingCmdMultishot(s SQE, fd int, cmdOp uint32, bgid uint16, userData uint64) {
	PrepURingCmd(s, fd, cmdOp, userData)
	raw := s.Raw()
	raw.Flags |= uapi.IOSQE_BUFFER_SELECT
	raw.OpFlags |= uapi.IORING_URING_CMD_MULTISHOT
	raw.BufIndex = bgid
}
