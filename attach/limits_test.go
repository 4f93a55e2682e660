package attach

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle"
	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle/nvmeofconn"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/scripted"
)

// scriptedConnector is attach's connector for a scripted controller
// listening on loopback.
func scriptedConnector(t *testing.T, script *scripted.Script, queueSize int) (*nvmeofconn.Connector, Options) {
	t.Helper()
	srv, err := scripted.Listen("127.0.0.1:0", script)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	host, port, _ := net.SplitHostPort(srv.Addr().String())
	o := DefaultOptions()
	o.TrAddr, o.TrSvcID, o.NQN, o.NSID, o.QueueSize = host, port, scripted.PoliteNQN, 1, queueSize
	return &nvmeofconn.Connector{
		Config: nvmeof.ControllerConfig{
			Addr: o.Addr(), SubsysNQN: o.NQN,
			Host:     nvmeof.HostIdentity{NQN: "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000004"},
			IOQueues: 2, QueueSize: queueSize, KATO: 5 * time.Second, Logger: quietLogger(),
		},
		NSID: 1,
	}, o
}

// TestDeviceFollowsControllerLimits: the ublk queue depth follows the
// queue size the controller allowed (MAXCMD below --queue-size), and the
// device's write-zeroes, discard and request size limits follow WZSL,
// DMRSL and MDTS.
func TestDeviceFollowsControllerLimits(t *testing.T) {
	p := scripted.NewPolite()
	p.Controller.MAXCMD = 16
	p.Controller.MDTS = 1 // 8 KiB
	p.NVM.WZSL = 0        // MDTS bounds Write Zeroes then: 16 blocks
	p.NVM.DMRSL = 24
	k, _ := scriptedConnector(t, &scripted.Script{Polite: p}, 128)
	_, release := connectAssociation(t, context.Background(), k)
	defer release()
	// run.go: depth := min(connector.FirstQueueSize()-1, 4096)
	if n := k.FirstQueueSize(); n != 16 {
		t.Errorf("negotiated queue size %d, want 16 (MAXCMD)", n)
	}
	ns, _ := k.First()
	params := blockParams(ns)
	if params.MaxIOBytes != 8192 {
		t.Errorf("max I/O %d bytes, want 8192 (MDTS 1)", params.MaxIOBytes)
	}
	if d := params.Discard; d == nil || d.MaxWriteZeroesSectors != 16 || d.MaxDiscardSectors != 24 {
		t.Errorf("discard params %+v, want write zeroes 16 and discard 24 sectors", d)
	}
}

// TestAttachConnectRefusesBadMDTS: attach's connect (the lifecycle's
// first connect through the nvmeofconn connector, classified as Run
// classifies it) against a controller reporting MDTS 51, 52 or 255 ends
// with a one-line error naming MDTS, and no panic.
func TestAttachConnectRefusesBadMDTS(t *testing.T) {
	for _, mdts := range []uint8{51, 52, 255} {
		p := scripted.NewPolite()
		p.Controller.MDTS = mdts
		k, o := scriptedConnector(t, &scripted.Script{Polite: p}, 128)
		lopts := lifecycle.DefaultOptions()
		lopts.Logger = quietLogger()
		lc, err := lifecycle.New(k, lopts)
		if err != nil {
			t.Fatal(err)
		}
		err = lc.Start(context.Background())
		lc.Delete()
		if err == nil {
			t.Fatalf("MDTS %d: connected", mdts)
		}
		msg := classifyConnectError(o, err).Error()
		if !strings.Contains(msg, "MDTS") || strings.Contains(msg, "\n") {
			t.Errorf("MDTS %d: %q, want one line naming MDTS", mdts, msg)
		}
	}
}
