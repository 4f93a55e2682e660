package linkwatch

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle/internal/netnstest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeNet is a routing table of one route and a set of links.
type fakeNet struct {
	routeTo  int // 0: no route
	links    map[int]Link
	lookups  int
	linkErrs error
}

func (n *fakeNet) tracker() *tracker {
	return &tracker{
		route: func() (int, error) {
			n.lookups++
			if n.routeTo == 0 {
				return 0, unix.ENETUNREACH
			}
			return n.routeTo, nil
		},
		link: func(i int) (Link, error) {
			if n.linkErrs != nil {
				return Link{}, n.linkErrs
			}
			return n.links[i], nil
		},
	}
}

func TestTracker(t *testing.T) {
	n := &fakeNet{routeTo: 2, links: map[int]Link{
		2: {Index: 2, Name: "eth0", Up: true},
		3: {Index: 3, Name: "eth1", Up: true},
	}}
	tr := n.tracker()
	if err := tr.routeChanged(); err != nil {
		t.Fatalf("initially: %v", err)
	}
	if tr.takeBack() {
		t.Fatal("back without having been down")
	}
	// Another link going down does not matter.
	if err := tr.linkChanged(Link{Index: 3, Name: "eth1"}); err != nil {
		t.Fatalf("eth1 down: %v", err)
	}
	// The route's link going down does, once.
	if err := tr.linkChanged(Link{Index: 2, Name: "eth0"}); err == nil {
		t.Fatal("eth0 down not reported")
	}
	if err := tr.linkChanged(Link{Index: 2, Name: "eth0"}); err != nil {
		t.Fatalf("reported twice: %v", err)
	}
	// The route goes away while down: still one report.
	n.routeTo = 0
	if err := tr.routeChanged(); err != nil {
		t.Fatalf("reported twice: %v", err)
	}
	if tr.takeBack() {
		t.Fatal("back while there is no route")
	}
	// The route comes back over eth1: the path is up again, reported once.
	n.routeTo = 3
	if err := tr.routeChanged(); err != nil {
		t.Fatalf("route over eth1: %v", err)
	}
	if !tr.takeBack() {
		t.Fatal("the path back over eth1 not reported")
	}
	if err := tr.routeChanged(); err != nil || tr.takeBack() {
		t.Fatalf("the path back reported twice (err %v)", err)
	}
	// Now losing the route is reported.
	n.routeTo = 0
	if err := tr.routeChanged(); !errors.Is(err, ErrNoRoute) {
		t.Fatalf("no route: %v", err)
	}
	// Back over eth0, which is deleted.
	n.routeTo = 2
	if err := tr.routeChanged(); err != nil {
		t.Fatalf("route back: %v", err)
	}
	if err := tr.linkChanged(Link{Index: 2, Name: "eth0", Up: true, Deleted: true}); err == nil {
		t.Fatal("deletion not reported")
	}
}

func TestTrackerInitiallyDown(t *testing.T) {
	n := &fakeNet{routeTo: 2, links: map[int]Link{2: {Index: 2, Name: "eth0"}}}
	if err := n.tracker().routeChanged(); err == nil {
		t.Fatal("a path starting down was not reported")
	}
	n = &fakeNet{}
	if err := n.tracker().routeChanged(); !errors.Is(err, ErrNoRoute) {
		t.Fatalf("no route at start: %v", err)
	}
	n = &fakeNet{routeTo: 2, linkErrs: errors.New("no such link")}
	if err := n.tracker().routeChanged(); err == nil {
		t.Fatal("a vanished link was not reported")
	}
}

// The real thing, inside a namespace of the test's own: the route to
// 127.0.0.1 leaves by lo; setting lo down reports the path down, setting it
// up and down again reports it again. Only loopback is involved.
func TestWatcherLoopbackInNetns(t *testing.T) {
	ns := netnstest.New(t)
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := h.LinkSetUp(lo); err != nil {
		t.Skipf("cannot set lo up in the namespace: %v", err)
	}

	downs := make(chan error, 16)
	ups := make(chan struct{}, 16)
	settled := make(chan bool, 64)
	w := &Watcher{Addr: netip.MustParseAddr("127.0.0.1"), Namespace: &ns, Logger: slog.New(slog.DiscardHandler),
		settled: func(down bool) { settled <- down }}
	ctx, cancel := context.WithCancel(context.Background())
	ended := make(chan error, 1)
	go func() {
		ended <- w.Watch(ctx, func(err error) { downs <- err }, func() { ups <- struct{}{} })
	}()
	defer func() {
		cancel()
		if err := <-ended; err != nil {
			t.Errorf("Watch: %v", err)
		}
	}()
	// waitSettled waits until the watcher has processed events up to a
	// state where the path is (or is not) down.
	waitSettled := func(want bool) {
		t.Helper()
		for {
			select {
			case got := <-settled:
				if got == want {
					return
				}
			case <-time.After(20 * time.Second):
				t.Fatalf("watcher never settled with down=%v", want)
			}
		}
	}

	waitSettled(false) // subscribed, initial lookup done: up
	select {
	case err := <-downs:
		t.Fatalf("reported down while up: %v", err)
	default:
	}
	for i := 0; i < 2; i++ {
		if err := h.LinkSetDown(lo); err != nil {
			t.Fatal(err)
		}
		waitSettled(true)
		select {
		case err := <-downs:
			t.Logf("down %d: %v", i, err)
		default:
			t.Fatalf("lo down %d not reported", i)
		}
		select {
		case <-ups:
			t.Fatalf("path reported back while lo is down (%d)", i)
		default:
		}
		if err := h.LinkSetUp(lo); err != nil {
			t.Fatal(err)
		}
		waitSettled(false) // back up: the next down is a new failure
		select {
		case <-ups:
		default:
			t.Fatalf("lo up %d not reported", i)
		}
	}
	select {
	case <-ups:
		t.Fatal("the path back reported twice")
	default:
	}
	select {
	case err := <-downs:
		t.Fatalf("one failure reported twice: %v", err)
	default:
	}
}
