package nvmeof

import (
	"net"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/internal/pdu"
)

// gateConn holds the host writer's Write that completes a byte count
// (gateAt) until the host's reader has come back for more after the
// controller armed it: the writer is then past the data, but has not yet
// run its bookkeeping, when the reader handles what the controller sent
// next. Close releases it.
type gateConn struct {
	net.Conn
	gateAt    int64
	written   atomic.Int64
	armed     atomic.Bool // the controller is about to send what the reader must handle
	delivered atomic.Bool // a Read returned data while armed
	release   chan struct{}
	once      sync.Once
}

func (g *gateConn) open() { g.once.Do(func() { close(g.release) }) }

func (g *gateConn) Read(p []byte) (int, error) {
	if g.delivered.Load() {
		g.open() // the reader handled it and reads on
	}
	n, err := g.Conn.Read(p)
	if n > 0 && g.armed.Load() {
		g.delivered.Store(true)
	}
	return n, err
}

func (g *gateConn) Write(p []byte) (int, error) {
	before := g.written.Load()
	n, err := g.Conn.Write(p)
	if after := g.written.Add(int64(n)); before < g.gateAt && after >= g.gateAt {
		<-g.release
	}
	return n, err
}

func (g *gateConn) Close() error {
	g.open()
	return g.Conn.Close()
}

// TestNextR2TAfterDataSent: a controller may send a command's next R2T as
// soon as it has received the data of the previous one (MAXR2T 0 allows
// one outstanding). The host's reader can see that R2T before its writer,
// which has sent the data, has marked the previous R2T done: that is no
// protocol error, the write completes.
func TestNextR2TAfterDataSent(t *testing.T) {
	const n = 512 << 10
	host, ctrl := net.Pipe()
	// ICReq, the command capsule, then the first R2T's H2CData PDU.
	const hdrs = 128 + 72 + 24
	g := &gateConn{Conn: host, gateAt: hdrs + n/2, release: make(chan struct{})}
	ctrlDone := make(chan struct{})
	go func() {
		defer close(ctrlDone)
		var got int
		scriptedController(ctrl, pdu.ICResp{MaxH2CData: n}, func(h *pdu.Header, data []byte, o pdu.Options) bool {
			switch h.Type {
			case pdu.TypeCapsuleCmd:
				r := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeR2T},
					R2T: pdu.R2T{CommandID: h.Cmd.CommandID(), TTag: 1, Offset: 0, Length: n / 2}}
				_, err := ctrl.Write(pdu.Append(nil, &r, nil, o))
				return err == nil
			case pdu.TypeH2CData:
				got += len(data)
				var b []byte
				switch got {
				case n / 2:
					g.armed.Store(true)
					r := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeR2T},
						R2T: pdu.R2T{CommandID: h.Data.CommandID, TTag: 2, Offset: n / 2, Length: n / 2}}
					b = pdu.Append(nil, &r, nil, o)
				case n:
					r := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeCapsuleResp}}
					r.Resp.SetCommandID(h.Data.CommandID)
					b = pdu.Append(nil, &r, nil, o)
				default:
					return true
				}
				_, err := ctrl.Write(b)
				return err == nil
			}
			return false
		})
	}()
	defer func() { <-ctrlDone }()
	if err := writeOnQueue(t, g, n); err != nil {
		t.Fatalf("write with a second R2T sent once the first one's data arrived: %v", err)
	}
}
