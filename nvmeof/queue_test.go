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
