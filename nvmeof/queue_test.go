package nvmeof

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/internal/pdu"
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
