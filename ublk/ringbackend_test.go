package ublk

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/ublk-nvmeof/ublk-nvmeof/ublk/internal/uapi"
)

type nopRingBackend struct{ NullBackend }

func (nopRingBackend) RingCompletion(*QueueRing, RingCQE) {}

// nopZeroCopyBackend declares that it serves zero copy.
type nopZeroCopyBackend struct{ nopRingBackend }

func (nopZeroCopyBackend) ServesZeroCopy() bool { return true }

// ZeroCopy on a kernel without UBLK_F_AUTO_BUF_REG (6.12's features, or
// none reported before 6.5) is refused before ADD_DEV, naming the feature
// and the release that has it.
func TestZeroCopyNeedsAutoBufReg(t *testing.T) {
	for _, f := range []Features{0, 0x1fe} {
		c := &Control{fd: -1, features: f}
		_, err := c.addDev(context.Background(), Options{Queues: 1, Depth: 1, ZeroCopy: true})
		if !errors.Is(err, ErrNotSupported) || !strings.Contains(err.Error(), "UBLK_F_AUTO_BUF_REG") || !strings.Contains(err.Error(), "6.16") {
			t.Errorf("features %v: addDev with ZeroCopy = %v; want ErrNotSupported naming UBLK_F_AUTO_BUF_REG and 6.16", f, err)
		}
	}
}

// Zero copy needs a RingBackend: Create refuses any other before it sends
// anything to the kernel, and a device found with AUTO_BUF_REG (Recover)
// is refused the same way.
func TestZeroCopyNeedsRingBackend(t *testing.T) {
	c := &Control{fd: -1, features: 0x1fffff}
	_, err := c.Create(context.Background(), Options{Queues: 1, Depth: 1, ZeroCopy: true, Params: Params{Size: mib}}, NullBackend{})
	if err == nil || !strings.Contains(err.Error(), "RingBackend") {
		t.Errorf("Create with ZeroCopy and NullBackend = %v; want a refusal naming RingBackend", err)
	}
	if _, _, err := ringBackendOf(NullBackend{}, FeatureAutoBufReg); err == nil {
		t.Error("ringBackendOf accepted a plain Backend for an AUTO_BUF_REG device")
	}
	rb, zc, err := ringBackendOf(nopZeroCopyBackend{}, FeatureAutoBufReg)
	if err != nil || rb == nil || !zc {
		t.Errorf("ringBackendOf(ZeroCopyBackend, AUTO_BUF_REG) = %v, %v, %v", rb, zc, err)
	}
	if rb, zc, err := ringBackendOf(nopRingBackend{}, 0); err != nil || rb == nil || zc {
		t.Errorf("ringBackendOf(RingBackend, copy) = %v, %v, %v; want the backend, no zero copy", rb, zc, err)
	}
}

// A RingBackend that copies through Buf (attach's, whose Serve reads
// r.Buf) is refused for a device with AUTO_BUF_REG, whether it was
// created with ZeroCopy or recovered: it does not declare that it serves
// zero copy (ZeroCopyBackend).
func TestZeroCopyNeedsZeroCopyBackend(t *testing.T) {
	c := &Control{fd: -1, features: 0x1fffff}
	_, err := c.Create(context.Background(), Options{Queues: 1, Depth: 1, ZeroCopy: true, Params: Params{Size: mib}}, nopRingBackend{})
	if err == nil || !strings.Contains(err.Error(), "ZeroCopyBackend") {
		t.Errorf("Create with ZeroCopy and a copying RingBackend = %v; want a refusal naming ZeroCopyBackend", err)
	}
	if _, _, err := ringBackendOf(nopRingBackend{}, FeatureAutoBufReg); err == nil || !strings.Contains(err.Error(), "ZeroCopyBackend") {
		t.Errorf("ringBackendOf(copying RingBackend, AUTO_BUF_REG) = %v; want a refusal naming ZeroCopyBackend", err)
	}
}

// The tag's buffer slot rides in sqe->addr as struct ublk_auto_buf_reg,
// with no flags: what the driver reads in ublk_sqe_addr_to_auto_buf_reg.
func TestAutoBufRegAddr(t *testing.T) {
	for _, tag := range []int{0, 1, 4095} {
		got := autoBufReg(tag)
		if got != uint64(tag) {
			t.Errorf("autoBufReg(%d) = %#x, want %#x", tag, got, tag)
		}
		if got>>16&0xff&^uapi.UBLK_AUTO_BUF_REG_F_MASK != 0 || got>>24 != 0 {
			t.Errorf("autoBufReg(%d) = %#x sets reserved bits", tag, got)
		}
	}
}

// A RingBackend's operation must stay inside its request's data, on its
// own queue's ring, and keep clear of the queue's user-data bit; requests
// without data have nothing to move.
func TestQueueRingChecksRange(t *testing.T) {
	q := newQueue(0, 4, 1<<20, -1, true, nopRingBackend{}, nil)
	q.ringBackend, q.zeroCopy = nopRingBackend{}, true
	q.qr.q = q
	other := newQueue(1, 4, 1<<20, -1, true, nopRingBackend{}, nil)
	r := &q.reqs[1]
	r.Op, r.Length = OpRead, 8192
	if !r.ZeroCopy() || r.Ring() != &q.qr {
		t.Fatalf("zero-copy READ: ZeroCopy %v, Ring %p; want true, the queue's", r.ZeroCopy(), r.Ring())
	}
	cases := []struct {
		name   string
		req    *Request
		off, n int
		ud     uint64
	}{
		{"negative offset", r, -1, 512, 0},
		{"empty", r, 0, 0, 0},
		{"past the end", r, 4096, 4097, 0},
		{"offset past the end", r, 8193, 1, 0},
		{"overflowing", r, 1, int(^uint(0) >> 1), 0},
		{"queue's user-data bit", r, 0, 512, 1 << 63},
		{"another queue's request", &other.reqs[1], 0, 512, 0},
	}
	for _, c := range cases {
		if err := q.qr.dataRange(c.req, c.off, c.n, c.ud); err == nil {
			t.Errorf("%s: accepted", c.name)
		}
	}
	if err := q.qr.dataRange(r, 4096, 4096, 1<<62); err != nil {
		t.Errorf("the last 4096 bytes: %v", err)
	}
	r.Op, r.Length = OpFlush, 0
	if err := q.qr.dataRange(r, 0, 1, 0); err == nil || r.ZeroCopy() {
		t.Errorf("FLUSH: range accepted (%v) or ZeroCopy true", err)
	}
	var detached Request
	if detached.Ring() != nil || detached.ZeroCopy() {
		t.Error("a request of no queue has a ring or zero copy")
	}
}
