package nvmeof_test

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/internal/pdu"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
)

// failures records OnFailure calls.
type failures struct {
	mu   sync.Mutex
	errs []error
	ch   chan struct{}
}

func newFailures() *failures { return &failures{ch: make(chan struct{}, 100)} }

func (f *failures) record(err error) {
	f.mu.Lock()
	f.errs = append(f.errs, err)
	f.mu.Unlock()
	f.ch <- struct{}{}
}

func (f *failures) wait(t *testing.T) error {
	t.Helper()
	select {
	case <-f.ch:
	case <-time.After(hangDeadline):
		t.Fatal("no failure reported")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.errs[0]
}

func waitFailed(t *testing.T, q *nvmeof.Queue) error {
	t.Helper()
	select {
	case <-q.Failed():
	case <-time.After(hangDeadline):
		t.Fatalf("queue %d did not fail", q.QID())
	}
	return q.Err()
}

func TestKeepAliveTimeoutDeletesController(t *testing.T) {
	tt := startTarget(t, target.Config{}, 9, 1<<20)
	f := newFailures()
	// No keep-alives sent: the target deletes the controller after KATO.
	c := connect(t, tt, nvmeof.ControllerConfig{KATO: 200 * time.Millisecond, OnFailure: f.record})
	err := f.wait(t)
	if !nvmeof.IsPathError(err) {
		t.Fatalf("failure %v is not a path error", err)
	}
	waitFailed(t, c.AdminQueue())
	waitFailed(t, c.IOQueues()[0].Queue)
	if ids := tt.Controllers(); len(ids) != 0 {
		t.Fatalf("controllers %v still exist", ids)
	}
}

func TestKeepAliveKeepsControllerAlive(t *testing.T) {
	tt := startTarget(t, target.Config{}, 9, 1<<20)
	c := connect(t, tt, nvmeof.ControllerConfig{KATO: 300 * time.Millisecond})
	ctx := testCtx(t)
	// Send keep-alives at KATO/4 for several KATO periods.
	for range 20 {
		if err := c.KeepAlive(ctx); err != nil {
			t.Fatal(err)
		}
		time.Sleep(75 * time.Millisecond)
	}
	if ids := tt.Controllers(); len(ids) != 1 {
		t.Fatalf("controllers %v, want one", ids)
	}
	if err := c.AdminQueue().Err(); err != nil {
		t.Fatal(err)
	}
}

func TestTrafficCounts(t *testing.T) {
	tt := startTarget(t, target.Config{TBKAS: true}, 9, 1<<20)
	c := connect(t, tt, nvmeof.ControllerConfig{})
	if !c.TBKAS() {
		t.Fatal("TBKAS not reported")
	}
	ctx := testCtx(t)
	tr := c.Traffic()
	mark := tr.Submitted()
	if tr.CompletedSince(mark) {
		t.Fatal("completed before anything was submitted")
	}
	before := c.AdminQueue().Completions()
	if err := c.KeepAlive(ctx); err != nil {
		t.Fatal(err)
	}
	if !tr.CompletedSince(mark) || c.AdminQueue().Completions() != before+1 || c.AdminQueue().LastCompletion().IsZero() {
		t.Fatal("keep-alive completion not counted")
	}
}

func TestDroppedKeepAliveTimesOut(t *testing.T) {
	tt := startTarget(t, target.Config{}, 9, 1<<20)
	f := newFailures()
	// Without KATO the target never deletes the controller, so only the
	// host's command timeout can notice the lost response.
	c := connect(t, tt, nvmeof.ControllerConfig{NoKeepAlive: true, AdminTimeout: 300 * time.Millisecond, OnFailure: f.record})
	tt.InjectFault(target.Fault{QID: 0, Match: target.MatchKeepAlive(), Drop: true})
	// The keep-alive command times out: the admin queue fails.
	err := c.KeepAlive(testCtx(t))
	if !errors.Is(err, nvmeof.ErrCommandTimeout) || !nvmeof.IsPathError(err) {
		t.Fatalf("keep-alive: %v", err)
	}
	// The timeout was reported before the command completed.
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.errs) == 0 || !errors.Is(f.errs[0], nvmeof.ErrCommandTimeout) {
		t.Fatalf("reported %v", f.errs)
	}
}

func TestKeepAliveContextCancel(t *testing.T) {
	tt := startTarget(t, target.Config{}, 9, 1<<20)
	c := connect(t, tt, nvmeof.ControllerConfig{})
	tt.InjectFault(target.Fault{QID: 0, Match: target.MatchKeepAlive(), Delay: 200 * time.Millisecond, Times: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := c.KeepAlive(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("keep-alive: %v", err)
	}
	// The command is still accounted to the queue; teardown waits for it.
	c.Close()
}

func TestCommandTimeout(t *testing.T) {
	tt := startTarget(t, target.Config{}, 9, 1<<20)
	f := newFailures()
	c := connect(t, tt, nvmeof.ControllerConfig{IOTimeout: 200 * time.Millisecond, OnFailure: f.record})
	ns, err := c.Namespace(testCtx(t), 1)
	if err != nil {
		t.Fatal(err)
	}
	tt.InjectFault(target.Fault{QID: 1, Match: target.MatchOpcode(nvme.NVME_CMD_READ), Delay: time.Hour})
	err = c.IOQueues()[0].Read(testCtx(t), ns, 0, make([]byte, 512))
	if !errors.Is(err, nvmeof.ErrCommandTimeout) {
		t.Fatalf("read: %v", err)
	}
	if err := f.wait(t); !errors.Is(err, nvmeof.ErrCommandTimeout) {
		t.Fatalf("reported %v", err)
	}
}

func TestConnectionLossMidIO(t *testing.T) {
	for _, mode := range []string{"close-on-command", "close-mid-data", "target-drops-all"} {
		t.Run(mode, func(t *testing.T) {
			tt := startTarget(t, target.Config{C2HChunk: 4096}, 9, 4<<20)
			f := newFailures()
			c := connect(t, tt, nvmeof.ControllerConfig{OnFailure: f.record})
			ctx := testCtx(t)
			ns, err := c.Namespace(ctx, 1)
			if err != nil {
				t.Fatal(err)
			}
			q := c.IOQueues()[0]
			switch mode {
			case "close-on-command":
				tt.InjectFault(target.Fault{QID: 1, Match: target.MatchOpcode(nvme.NVME_CMD_READ), Times: 1, Close: true})
			case "close-mid-data":
				tt.InjectFault(target.Fault{QID: 1, Match: target.MatchOpcode(nvme.NVME_CMD_READ), Times: 1, CloseAfterData: 6000})
			case "target-drops-all":
				tt.InjectFault(target.Fault{QID: 1, Match: target.MatchOpcode(nvme.NVME_CMD_READ), Times: 1,
					Delay: time.Hour, Before: func() { go tt.DropConnections() }})
			}
			// Many reads in flight; all must complete (some may succeed
			// before the failure), none may hang.
			var wg sync.WaitGroup
			var failed atomic.Int32
			for i := range 32 {
				var req nvmeof.Request
				if err := ns.PrepareRead(&req, uint64(i*32), make([]byte, 16384)); err != nil {
					t.Fatal(err)
				}
				wg.Add(1)
				r := req
				if err := q.Submit(&r, func(err error) {
					if err != nil {
						if !nvmeof.IsPathError(err) {
							t.Errorf("read failed with %v, want a path error", err)
						}
						failed.Add(1)
					}
					wg.Done()
				}); err != nil {
					wg.Done()
					failed.Add(1)
				}
			}
			wg.Wait()
			if failed.Load() == 0 {
				t.Fatal("no read failed")
			}
			f.wait(t)
			// New submissions fail at once.
			if err := q.Read(ctx, ns, 0, make([]byte, 512)); !nvmeof.IsPathError(err) {
				t.Fatalf("read on a failed queue: %v", err)
			}
		})
	}
}

// TestShutdownOrder checks the teardown steps: Shutdown fails what is in
// flight, Wait returns only after every done callback returned, and a
// callback that resubmits gets an error instead of deadlocking.
func TestShutdownOrder(t *testing.T) {
	tt := startTarget(t, target.Config{}, 9, 1<<20)
	c := connect(t, tt, nvmeof.ControllerConfig{})
	ns, err := c.Namespace(testCtx(t), 1)
	if err != nil {
		t.Fatal(err)
	}
	tt.InjectFault(target.Fault{QID: 1, Match: target.MatchOpcode(nvme.NVME_CMD_WRITE), Delay: time.Hour})
	q := c.IOQueues()[0]
	const n = 16
	var returned atomic.Int32
	var resubmitErrs atomic.Int32
	for i := range n {
		req := new(nvmeof.Request)
		if err := ns.PrepareWrite(req, uint64(i), make([]byte, 512), false); err != nil {
			t.Fatal(err)
		}
		if err := q.Submit(req, func(err error) {
			if !errors.Is(err, nvmeof.ErrQueueShutdown) {
				t.Errorf("in-flight write: %v", err)
			}
			// Resubmitting from the callback must not deadlock.
			again := new(nvmeof.Request)
			ns.PrepareFlush(again)
			if q.Submit(again, func(error) {}) != nil {
				resubmitErrs.Add(1)
			}
			time.Sleep(time.Millisecond) // a slow handler: Wait must wait for it
			returned.Add(1)
		}); err != nil {
			t.Fatal(err)
		}
	}
	c.Shutdown()
	c.WaitIdle()
	if got := returned.Load(); got != n {
		t.Fatalf("WaitIdle returned with %d of %d handlers done", got, n)
	}
	if resubmitErrs.Load() != n {
		t.Fatalf("%d resubmissions after shutdown were accepted", n-resubmitErrs.Load())
	}
	c.FreeIOQueues()
	c.FreeAdminQueue()
}

// hostile PDUs sent by the target instead of a response: each must fail
// the queue with an error, never panic or hang.
func TestHostilePDUs(t *testing.T) {
	resp := func(cid uint16, st nvme.Status) []byte {
		var cqe nvme.Completion
		cqe.SetCommandID(cid)
		cqe.SetStatus(st)
		h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeCapsuleResp}, Resp: cqe}
		return pdu.Append(nil, &h, nil, pdu.Options{})
	}
	c2h := func(cid uint16, off uint32, n int, flags uint8) []byte {
		h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeC2HData, Flags: flags}, Data: pdu.DataHeader{CommandID: cid, DataOffset: off}}
		return pdu.Append(nil, &h, make([]byte, n), pdu.Options{})
	}
	cases := map[string]func(cmd *nvme.Command) []byte{
		"response for unknown command":   func(cmd *nvme.Command) []byte { return resp(cmd.CommandID()^0x0100, 0) },
		"response with stale generation": func(cmd *nvme.Command) []byte { return resp(cmd.CommandID()^0x1000, 0) },
		"data beyond the buffer":         func(cmd *nvme.Command) []byte { return c2h(cmd.CommandID(), 0, 1024, 0) },
		"data at a wrong offset":         func(cmd *nvme.Command) []byte { return c2h(cmd.CommandID(), 256, 128, 0) },
		"success before all data": func(cmd *nvme.Command) []byte {
			return c2h(cmd.CommandID(), 0, 256, pdu.NVME_TCP_F_DATA_LAST|pdu.NVME_TCP_F_DATA_SUCCESS)
		},
		"response before all data": func(cmd *nvme.Command) []byte { return resp(cmd.CommandID(), 0) },
		"huge plen": func(cmd *nvme.Command) []byte {
			b := c2h(cmd.CommandID(), 0, 512, 0)
			binary.LittleEndian.PutUint32(b[4:], 0xffffffff)
			return b
		},
		"bad hlen": func(cmd *nvme.Command) []byte {
			b := resp(cmd.CommandID(), 0)
			b[2] = 200
			return b
		},
		"unknown type": func(cmd *nvme.Command) []byte { return []byte{0x8, 0, 24, 0, 24, 0, 0, 0} },
		"icresp mid-stream": func(cmd *nvme.Command) []byte {
			h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeICResp}, ICResp: pdu.ICResp{MaxH2CData: 4096}}
			return pdu.Append(nil, &h, nil, pdu.Options{})
		},
		"host-to-controller type": func(cmd *nvme.Command) []byte {
			h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeCapsuleCmd}, Cmd: *cmd}
			return pdu.Append(nil, &h, nil, pdu.Options{})
		},
		"r2t for a read": func(cmd *nvme.Command) []byte {
			h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeR2T}, R2T: pdu.R2T{CommandID: cmd.CommandID(), Length: 512}}
			return pdu.Append(nil, &h, nil, pdu.Options{})
		},
		"c2h term req": func(cmd *nvme.Command) []byte {
			h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeC2HTermReq}, Term: pdu.TermReq{FES: pdu.NVME_TCP_FES_INVALID_PDU_HDR}}
			return pdu.Append(nil, &h, make([]byte, 8), pdu.Options{})
		},
		"truncated header then close": func(cmd *nvme.Command) []byte { return resp(cmd.CommandID(), 0)[:10] },
		"digest flag not negotiated": func(cmd *nvme.Command) []byte {
			b := resp(cmd.CommandID(), 0)
			b[1] |= pdu.NVME_TCP_F_HDGST
			return b
		},
	}
	for name, reply := range cases {
		t.Run(name, func(t *testing.T) {
			tt := startTarget(t, target.Config{}, 9, 1<<20)
			f := newFailures()
			c := connect(t, tt, nvmeof.ControllerConfig{OnFailure: f.record})
			ns, err := c.Namespace(testCtx(t), 1)
			if err != nil {
				t.Fatal(err)
			}
			remove := tt.InjectFault(target.Fault{QID: 1, Match: target.MatchOpcode(nvme.NVME_CMD_READ), Reply: reply, Times: 1})
			defer remove()
			q := c.IOQueues()[0]
			if name == "truncated header then close" {
				// Close the target side after the partial header.
				tt.InjectFault(target.Fault{QID: 1, Match: target.MatchOpcode(nvme.NVME_CMD_FLUSH), Close: true})
				var req nvmeof.Request
				ns.PrepareFlush(&req)
				defer func() { q.Submit(&req, func(error) {}) }()
				go func() {
					time.Sleep(10 * time.Millisecond)
					tt.DropConnections()
				}()
			}
			err = q.Read(testCtx(t), ns, 0, make([]byte, 512))
			if err == nil || !nvmeof.IsPathError(err) {
				t.Fatalf("read: %v, want a path error", err)
			}
			qerr := waitFailed(t, q.Queue)
			var pe *pdu.ProtocolError
			var te *nvmeof.TermReqError
			if !errors.As(qerr, &pe) && !errors.As(qerr, &te) && !errors.Is(qerr, io.ErrUnexpectedEOF) && !errors.Is(qerr, net.ErrClosed) {
				t.Logf("queue failed with %v", qerr)
			}
			f.wait(t)
		})
	}
}

func TestStalledTarget(t *testing.T) {
	tt := startTarget(t, target.Config{}, 9, 1<<20)
	c := connect(t, tt, nvmeof.ControllerConfig{IOTimeout: 300 * time.Millisecond})
	ns, err := c.Namespace(testCtx(t), 1)
	if err != nil {
		t.Fatal(err)
	}
	tt.InjectFault(target.Fault{QID: 1, Times: 1, Stall: 2 * time.Second})
	err = c.IOQueues()[0].Write(testCtx(t), ns, 0, make([]byte, 64<<10), false)
	if !errors.Is(err, nvmeof.ErrCommandTimeout) {
		t.Fatalf("write to a stalled target: %v", err)
	}
}

// TestDigestErrors: with digests negotiated, a corrupted header digest
// from the controller fails the queue with an error (the PDU boundaries
// are lost); a corrupted data digest fails only that command, with Data
// Transfer Error and no DNR (nvme_tcp_recv_ddgst), and the queue goes on.
func TestDigestErrors(t *testing.T) {
	o := pdu.Options{HeaderDigest: true, DataDigest: true}
	cases := map[string]func(cmd *nvme.Command) []byte{
		"header digest": func(cmd *nvme.Command) []byte {
			var cqe nvme.Completion
			cqe.SetCommandID(cmd.CommandID())
			h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeCapsuleResp}, Resp: cqe}
			b := pdu.Append(nil, &h, nil, o)
			b[len(b)-1] ^= 0xff
			return b
		},
		"data digest": func(cmd *nvme.Command) []byte {
			h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeC2HData, Flags: pdu.NVME_TCP_F_DATA_LAST | pdu.NVME_TCP_F_DATA_SUCCESS},
				Data: pdu.DataHeader{CommandID: cmd.CommandID()}}
			b := pdu.Append(nil, &h, make([]byte, 512), o)
			b[len(b)-1] ^= 0xff
			return b
		},
	}
	for name, reply := range cases {
		t.Run(name, func(t *testing.T) {
			tt := startTarget(t, target.Config{}, 9, 1<<20)
			c := connect(t, tt, nvmeof.ControllerConfig{HeaderDigest: true, DataDigest: true})
			ns, err := c.Namespace(testCtx(t), 1)
			if err != nil {
				t.Fatal(err)
			}
			tt.InjectFault(target.Fault{QID: 1, Match: target.MatchOpcode(nvme.NVME_CMD_READ), Reply: reply, Times: 1})
			q := c.IOQueues()[0]
			err = q.Read(testCtx(t), ns, 0, make([]byte, 512))
			if name == "data digest" {
				var st nvme.Status
				if !errors.As(err, &st) || !errors.Is(err, nvme.NVME_SC_DATA_XFER_ERROR) || st.DNR() {
					t.Fatalf("read: %v, want Data Transfer Error without DNR", err)
				}
				if err := q.Read(testCtx(t), ns, 0, make([]byte, 512)); err != nil || q.Err() != nil {
					t.Fatalf("read after the data digest error: %v (queue: %v)", err, q.Err())
				}
				return
			}
			if !nvmeof.IsPathError(err) {
				t.Fatalf("read: %v, want a path error", err)
			}
			qerr := waitFailed(t, q.Queue)
			var pe *pdu.ProtocolError
			if !errors.As(qerr, &pe) && !errors.Is(qerr, pdu.ErrDataDigest) {
				t.Fatalf("queue failed with %v, want a digest error", qerr)
			}
		})
	}
}

// TestTrafficBasedKeepAlive: with TBKAS, I/O alone keeps the controller
// alive; once the I/O stops, the target deletes it after KATO.
func TestTrafficBasedKeepAlive(t *testing.T) {
	tt := startTarget(t, target.Config{TBKAS: true}, 9, 1<<20)
	f := newFailures()
	c := connect(t, tt, nvmeof.ControllerConfig{KATO: 300 * time.Millisecond, OnFailure: f.record})
	ctx := testCtx(t)
	ns, err := c.Namespace(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	q := c.IOQueues()[0]
	for range 20 {
		if err := q.Read(ctx, ns, 0, make([]byte, 512)); err != nil {
			t.Fatalf("read with traffic as keep-alive: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if len(tt.Controllers()) != 1 {
		t.Fatal("controller deleted while I/O flowed")
	}
	f.wait(t) // no traffic, no keep-alive: deleted
	if len(tt.Controllers()) != 0 {
		t.Fatal("controller still there")
	}
}
