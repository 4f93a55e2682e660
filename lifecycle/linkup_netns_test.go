package lifecycle

import (
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle/linkwatch"

	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle/internal/netnstest"
)

// The real link watch in a network namespace of the test's own, with a veth
// pair: the peer going down takes the carrier away from the link the route
// to the target leaves by (a cable pulled), which starts recovery at once;
// the peer coming back up makes the controller reconnect at once, on a fake
// clock that never moves, so not after reconnect_delay. Needs CAP_SYS_ADMIN
// and veth; skipped otherwise.
func TestLinkWatchNetnsEarlyReconnect(t *testing.T) {
	ns := netnstest.New(t)
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "ublkv0"}, PeerName: "ublkv1"}
	if err := h.LinkAdd(veth); err != nil {
		t.Skipf("cannot create a veth pair (veth missing?): %v", err)
	}
	v0, err := h.LinkByName("ublkv0")
	if err != nil {
		t.Fatal(err)
	}
	v1, err := h.LinkByName("ublkv1")
	if err != nil {
		t.Fatal(err)
	}
	addr, err := netlink.ParseAddr("10.77.0.1/24")
	if err != nil {
		t.Fatal(err)
	}
	if err := h.AddrAdd(v0, addr); err != nil {
		t.Fatal(err)
	}
	for _, l := range []netlink.Link{v0, v1} {
		if err := h.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	// The path is up once v0 has its carrier (veth: when the peer is up).
	waitFor(t, "ublkv0 to be operationally up", func() bool {
		l, err := h.LinkByName("ublkv0")
		return err == nil && l.Attrs().OperState == netlink.OperUp
	})

	// The target is 10.77.0.9, on v0's subnet: only the fake connector
	// talks to it, the watch only looks at the route and link.
	w := &linkwatch.Watcher{Addr: netip.MustParseAddr("10.77.0.9"), Namespace: &ns, Logger: quiet}
	hs := newHarness(t, func(o *Options, _ *fakeTarget) { o.LinkWatch = w })

	// Pull the cable: the peer down, v0 loses its carrier.
	if err := h.LinkSetDown(v1); err != nil {
		t.Fatal(err)
	}
	hs.waitState(StateConnecting)
	if got := hs.c.States().History(); len(got) < 3 || got[2].To != StateResetting {
		t.Fatalf("transitions %v: want recovery started by the link watch", got)
	} else if !got[2].Time.Equal(epoch) {
		t.Fatalf("recovery started at %v, want at once (%v)", got[2].Time, epoch)
	}
	hs.clk.WaitTimers(1) // waiting out reconnect_delay
	if n := hs.tgt.connectCount(); n != 1 {
		t.Fatalf("%d connects while the link was down", n)
	}

	// Plug it back: the controller reconnects without the clock moving.
	if err := h.LinkSetUp(v1); err != nil {
		t.Fatal(err)
	}
	hs.waitState(StateLive)
	hist := hs.c.States().History()
	if last := hist[len(hist)-1]; !last.Time.Equal(epoch) {
		t.Fatalf("LIVE again at %v, want at once (%v), not after reconnect_delay", last.Time, epoch)
	}
	if n := hs.tgt.connectCount(); n != 2 {
		t.Fatalf("%d connects, want 2", n)
	}
	if err := <-hs.doWrite(8, 88); err != nil {
		t.Fatalf("write after the early reconnect: %v", err)
	}
	hs.finish()
}
