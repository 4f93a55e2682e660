package nvmeof

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/internal/pdu"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// TestICRespChecks: the queue refuses an ICResp it cannot work with.
func TestICRespChecks(t *testing.T) {
	for _, tc := range []struct {
		name    string
		resp    pdu.ICResp
		digests bool
		want    string
	}{
		{"pfv", pdu.ICResp{PFV: 1, MaxH2CData: 4096}, false, "PFV"},
		{"digest not granted", pdu.ICResp{MaxH2CData: 4096}, true, "digests"},
		{"digest not asked", pdu.ICResp{Digest: 1, MaxH2CData: 4096}, false, "digests"},
		{"maxh2cdata small", pdu.ICResp{MaxH2CData: 512}, false, "MAXH2CDATA"},
		{"maxh2cdata unaligned", pdu.ICResp{MaxH2CData: 4098}, false, "MAXH2CDATA"},
		{"cpda", pdu.ICResp{CPDA: 32, MaxH2CData: 4096}, false, "CPDA"},
		{"term req", pdu.ICResp{}, false, "C2HTermReq"},
		{"silence", pdu.ICResp{}, false, "deadline"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hostSide, ctrlSide := net.Pipe()
			defer hostSide.Close()
			ctrlDone := make(chan struct{})
			go func() {
				defer close(ctrlDone)
				defer ctrlSide.Close()
				if _, err := io.ReadFull(ctrlSide, make([]byte, 128)); err != nil {
					return
				}
				switch tc.name {
				case "term req":
					h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeC2HTermReq}, Term: pdu.TermReq{FES: pdu.NVME_TCP_FES_UNSUPPORTED_PARAM}}
					ctrlSide.Write(pdu.Append(nil, &h, nil, pdu.Options{}))
				case "silence":
					io.Copy(io.Discard, ctrlSide)
				default:
					h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeICResp}, ICResp: tc.resp}
					ctrlSide.Write(pdu.Append(nil, &h, nil, pdu.Options{}))
				}
			}()
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			defer cancel()
			q, err := NewQueue(ctx, hostSide, QueueConfig{QID: 1, Size: 4, HeaderDigest: tc.digests, Logger: slog.New(slog.DiscardHandler)})
			if err == nil {
				q.Close()
				t.Fatal("ICResp accepted")
			}
			if !strings.Contains(err.Error(), tc.want) && !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("error %q does not mention %q", err, tc.want)
			}
			hostSide.Close()
			<-ctrlDone
		})
	}
}

// pipeController answers ICReq on ctrl, then a CapsuleResp for every
// capsule (no data, no digests) it reads, until the pipe closes.
func pipeController(ctrl net.Conn) {
	defer ctrl.Close()
	if _, err := io.ReadFull(ctrl, make([]byte, 128)); err != nil {
		return
	}
	h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeICResp}, ICResp: pdu.ICResp{MaxH2CData: 8192}}
	if _, err := ctrl.Write(pdu.Append(nil, &h, nil, pdu.Options{})); err != nil {
		return
	}
	rd := pdu.NewReader(ctrl, pdu.HostToController, 8192)
	for {
		var cmd pdu.Header
		if err := rd.ReadHeader(&cmd); err != nil {
			return
		}
		resp := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeCapsuleResp}}
		resp.Resp.SetCommandID(cmd.Cmd.CommandID())
		if _, err := ctrl.Write(pdu.Append(nil, &resp, nil, pdu.Options{})); err != nil {
			return
		}
	}
}

// Deferred commands are sent by Push at the latest; a command without
// Defer is sent without one.
func TestDeferAndPush(t *testing.T) {
	host, ctrl := net.Pipe()
	ctrlDone := make(chan struct{})
	go func() { defer close(ctrlDone); pipeController(ctrl) }()
	defer func() { <-ctrlDone }()
	q, err := NewQueue(context.Background(), host, QueueConfig{QID: 1, Size: 8, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()

	done := make(chan error, 4)
	reqs := make([]Request, 3)
	for i := range reqs {
		reqs[i].Defer = true
		if err := q.Submit(&reqs[i], func(err error) { done <- err }); err != nil {
			t.Fatal(err)
		}
	}
	// The writer may have sent some (it sends whatever it finds queued
	// when it runs); Push sends the rest.
	q.Push()
	for range reqs {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	var now Request
	if err := q.Submit(&now, func(err error) { done <- err }); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// scriptedController answers ICReq on ctrl with resp, then hands every
// PDU the host sends to handle (with the connection's options), until the
// pipe closes or handle returns false. Data is read into h's buffer.
func scriptedController(ctrl net.Conn, resp pdu.ICResp, handle func(h *pdu.Header, data []byte, o pdu.Options) bool) {
	defer ctrl.Close()
	icreq := make([]byte, 128)
	if _, err := io.ReadFull(ctrl, icreq); err != nil {
		return
	}
	h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeICResp}, ICResp: resp}
	if _, err := ctrl.Write(pdu.Append(nil, &h, nil, pdu.Options{})); err != nil {
		return
	}
	o := pdu.Options{HeaderDigest: resp.Digest&pdu.NVME_TCP_HDR_DIGEST_ENABLE != 0, DataDigest: resp.Digest&pdu.NVME_TCP_DATA_DIGEST_ENABLE != 0}
	rd := pdu.NewReader(ctrl, pdu.HostToController, 1<<20)
	rd.Options = o
	for {
		var cmd pdu.Header
		if err := rd.ReadHeader(&cmd); err != nil {
			return
		}
		data := make([]byte, cmd.DataLen)
		if err := rd.ReadData(data); cmd.DataLen > 0 && err != nil {
			return
		}
		if !handle(&cmd, data, o) {
			io.Copy(io.Discard, ctrl)
			return
		}
	}
}

func quietQueueConfig(qid uint16, size int) QueueConfig {
	return QueueConfig{QID: qid, Size: size, Timeout: hangTimeout, Logger: slog.New(slog.DiscardHandler)}
}

// writeOnQueue writes n bytes through I/O queue 1 (depth 4, MaxData n)
// connected over nc and returns the write's result; the queue is closed
// before it returns.
func writeOnQueue(t *testing.T, nc net.Conn, n int) error {
	t.Helper()
	cfg := quietQueueConfig(1, 4)
	cfg.MaxData = n
	q, err := NewQueue(context.Background(), nc, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	done := make(chan error, 1)
	req := &Request{Data: make([]byte, n), Write: true}
	if err := q.Submit(req, func(err error) { done <- err }); err != nil {
		t.Fatal(err)
	}
	return waitDone(t, "write", done)
}

// hangTimeout bounds waits in these tests: reaching it means a hang.
const hangTimeout = 60 * time.Second

func waitDone(t *testing.T, what string, ch <-chan error) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(hangTimeout):
		t.Fatalf("%s: never completed", what)
		return nil
	}
}

// TestQueueDepthIsSQSIZE: a queue of Size entries, whose Connect says
// SQSIZE = Size-1 (0's based), keeps at most SQSIZE commands outstanding
// (Linux: tag depth ctrl->sqsize); the next Submit is refused.
func TestQueueDepthIsSQSIZE(t *testing.T) {
	host, ctrl := net.Pipe()
	received := make(chan uint16, 16)
	ctrlDone := make(chan struct{})
	go func() {
		defer close(ctrlDone)
		scriptedController(ctrl, pdu.ICResp{MaxH2CData: 8192}, func(h *pdu.Header, _ []byte, _ pdu.Options) bool {
			received <- h.Cmd.CommandID() // and never answer
			return true
		})
	}()
	defer func() { <-ctrlDone }()
	q, err := NewQueue(context.Background(), host, quietQueueConfig(1, 4))
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	if q.Depth() != q.Size()-1 {
		t.Fatalf("depth %d of a queue of %d entries", q.Depth(), q.Size())
	}
	for i := range q.Size() - 1 {
		if err := q.Submit(&Request{}, func(error) {}); err != nil {
			t.Fatalf("command %d of SQSIZE %d: %v", i+1, q.Size()-1, err)
		}
		<-received
	}
	if err := q.Submit(&Request{}, func(error) {}); !errors.Is(err, ErrQueueFull) {
		t.Fatalf("command SQSIZE+1 (%d): %v, want ErrQueueFull", q.Size(), err)
	}
}

// TestSecondR2TWhileActive: the host announced MAXR2T 0 (one R2T
// outstanding per command); a second R2T while the data of the first is
// still being sent is a protocol error that fails the queue
// (nvme_tcp_handle_r2t), not a second transfer queued behind it.
func TestSecondR2TWhileActive(t *testing.T) {
	const n = 256 << 10
	host, ctrl := net.Pipe()
	ctrlDone := make(chan struct{})
	hostFailed := make(chan struct{})
	go func() {
		defer close(ctrlDone)
		scriptedController(ctrl, pdu.ICResp{MaxH2CData: n / 4}, func(h *pdu.Header, _ []byte, o pdu.Options) bool {
			if h.Type != pdu.TypeCapsuleCmd {
				return true
			}
			// Two R2Ts back to back, reading none of the data the
			// first asks for until the host has failed: its writer
			// is still sending the first of that R2T's two H2CData
			// PDUs (net.Pipe does not buffer) when the second
			// arrives.
			var b []byte
			for _, off := range []uint32{0, n / 2} {
				r := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeR2T},
					R2T: pdu.R2T{CommandID: h.Cmd.CommandID(), TTag: uint16(1 + off/(n/2)), Offset: off, Length: n / 2}}
				b = pdu.Append(b, &r, nil, o)
			}
			ctrl.Write(b)
			<-hostFailed
			return false
		})
	}()
	defer func() { <-ctrlDone }()
	defer close(hostFailed)
	err := writeOnQueue(t, host, n)
	var pe *pdu.ProtocolError
	if !errors.As(err, &pe) || !strings.Contains(pe.Msg, "MAXR2T") {
		t.Fatalf("write: %v, want a protocol error about the second R2T", err)
	}
}

// TestDataDigestErrorFailsOneCommand: a C2HData PDU whose data digest does
// not match fails that command alone with Data Transfer Error and no DNR
// (retryable; nvme_tcp_recv_ddgst), and the queue goes on: the next
// command on it succeeds. Both ways a read completes: a CapsuleResp after
// the data, or the SUCCESS flag on the last C2HData.
func TestDataDigestErrorFailsOneCommand(t *testing.T) {
	for _, c2hSuccess := range []bool{false, true} {
		t.Run(fmt.Sprintf("c2hsuccess=%v", c2hSuccess), func(t *testing.T) {
			host, ctrl := net.Pipe()
			ctrlDone := make(chan struct{})
			reads := 0
			go func() {
				defer close(ctrlDone)
				resp := pdu.ICResp{MaxH2CData: 8192, Digest: pdu.NVME_TCP_HDR_DIGEST_ENABLE | pdu.NVME_TCP_DATA_DIGEST_ENABLE}
				scriptedController(ctrl, resp, func(h *pdu.Header, _ []byte, o pdu.Options) bool {
					reads++
					cid := h.Cmd.CommandID()
					// 1024 bytes in two PDUs; the first read's second
					// PDU has a bad data digest.
					var b []byte
					for _, off := range []uint32{0, 512} {
						d := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeC2HData}, Data: pdu.DataHeader{CommandID: cid, DataOffset: off}}
						if off == 512 {
							d.Flags = pdu.NVME_TCP_F_DATA_LAST
							if c2hSuccess {
								d.Flags |= pdu.NVME_TCP_F_DATA_SUCCESS
							}
						}
						b = pdu.Append(b, &d, bytes.Repeat([]byte{byte(reads)}, 512), o)
						if reads == 1 && off == 512 {
							b[len(b)-1] ^= 0xff
						}
					}
					if !c2hSuccess {
						var cqe nvme.Completion
						cqe.SetCommandID(cid)
						r := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeCapsuleResp}, Resp: cqe}
						b = pdu.Append(b, &r, nil, o)
					}
					_, err := ctrl.Write(b)
					return err == nil
				})
			}()
			defer func() { <-ctrlDone }()
			cfg := quietQueueConfig(1, 4)
			cfg.HeaderDigest, cfg.DataDigest = true, true
			q, err := NewQueue(context.Background(), host, cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer q.Close()
			read := func() ([]byte, error) {
				done := make(chan error, 1)
				req := &Request{Data: make([]byte, 1024)}
				req.Cmd.SetOpcode(nvme.NVME_CMD_READ)
				if err := q.Submit(req, func(err error) { done <- err }); err != nil {
					t.Fatal(err)
				}
				return req.Data, waitDone(t, "read", done)
			}
			_, err = read()
			var st nvme.Status
			if !errors.As(err, &st) || !errors.Is(err, nvme.NVME_SC_DATA_XFER_ERROR) || st.DNR() {
				t.Fatalf("read with a bad data digest: %v, want Data Transfer Error without DNR", err)
			}
			if err := q.Err(); err != nil {
				t.Fatalf("the queue failed: %v", err)
			}
			data, err := read()
			if err != nil || !bytes.Equal(data, bytes.Repeat([]byte{2}, 1024)) {
				t.Fatalf("read after the digest error: %v, data %x...", err, data[:4])
			}
		})
	}
}

// TestICRespReservedDigestBits: each digest bit must match what was asked
// for; the reserved bits of the digest field are ignored, as Linux's
// nvme_tcp_init_connection ignores them.
func TestICRespReservedDigestBits(t *testing.T) {
	host, ctrl := net.Pipe()
	ctrlDone := make(chan struct{})
	go func() {
		defer close(ctrlDone)
		scriptedController(ctrl, pdu.ICResp{MaxH2CData: 4096, Digest: 0xfc | pdu.NVME_TCP_HDR_DIGEST_ENABLE}, func(*pdu.Header, []byte, pdu.Options) bool { return true })
	}()
	defer func() { <-ctrlDone }()
	cfg := quietQueueConfig(1, 4)
	cfg.HeaderDigest = true
	q, err := NewQueue(context.Background(), host, cfg)
	if err != nil {
		host.Close()
		t.Fatalf("ICResp with reserved digest bits set: %v", err)
	}
	q.Close()
}

// TestCPDAPadding: with CPDA > 0 every H2C PDU carrying data (in-capsule
// data, H2CData) starts its data at a multiple of (CPDA+1)*4 bytes, and
// no H2CData is longer than MAXH2CDATA.
func TestCPDAPadding(t *testing.T) {
	const cpda, maxH2C = 7, 4096 // 32-byte alignment
	host, ctrl := net.Pipe()
	ctrlDone := make(chan struct{})
	bad := make(chan string, 16)
	go func() {
		defer close(ctrlDone)
		scriptedController(ctrl, pdu.ICResp{MaxH2CData: maxH2C, CPDA: cpda}, func(h *pdu.Header, _ []byte, o pdu.Options) bool {
			if h.DataLen > 0 && int(h.PDO)%((cpda+1)*4) != 0 {
				bad <- fmt.Sprintf("%v with PDO %d", h.Type, h.PDO)
			}
			var b []byte
			switch {
			case h.Type == pdu.TypeCapsuleCmd && h.DataLen == 0:
				_, n, _ := h.Cmd.SGL()
				r := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeR2T}, R2T: pdu.R2T{CommandID: h.Cmd.CommandID(), TTag: 1, Length: n}}
				b = pdu.Append(b, &r, nil, o)
			case h.Type == pdu.TypeH2CData && h.Data.DataLength > maxH2C:
				bad <- fmt.Sprintf("H2CData of %d bytes", h.Data.DataLength)
				return false
			case h.Type == pdu.TypeH2CData && h.Flags&pdu.NVME_TCP_F_DATA_LAST == 0:
				return true
			}
			var cqe nvme.Completion
			cqe.SetCommandID(h.Cmd.CommandID())
			if h.Type == pdu.TypeH2CData {
				cqe.SetCommandID(h.Data.CommandID)
			}
			r := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeCapsuleResp}, Resp: cqe}
			_, err := ctrl.Write(pdu.Append(b, &r, nil, o))
			return err == nil
		})
	}()
	defer func() { <-ctrlDone }()
	q, err := NewQueue(context.Background(), host, quietQueueConfig(1, 4))
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	q.SetInCapsuleSize(4096)
	for _, n := range []int{100, 4096, 3 * maxH2C} {
		done := make(chan error, 1)
		req := &Request{Data: make([]byte, n), Write: true}
		req.Cmd.SetOpcode(nvme.NVME_CMD_WRITE)
		if err := q.Submit(req, func(err error) { done <- err }); err != nil {
			t.Fatal(err)
		}
		if err := waitDone(t, fmt.Sprintf("write of %d", n), done); err != nil {
			t.Fatalf("write of %d: %v", n, err)
		}
	}
	for {
		select {
		case b := <-bad:
			t.Error(b)
		default:
			return
		}
	}
}
