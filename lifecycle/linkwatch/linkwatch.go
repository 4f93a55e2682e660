// Package linkwatch detects that the path to the target failed faster than
// keep-alive can: it follows, through rtnetlink, the route towards traddr
// and the state of the link that route leaves by, and reports the path down
// as soon as the link goes down, disappears, or no route is left. lifecycle
// then starts error recovery at once instead of after up to KATO. It also
// reports the path up again once there is a route over a link that is up,
// so that lifecycle reconnects at once instead of after reconnect_delay.
//
// The decision (tracker) is separate from netlink so that it can be tested
// anywhere; Watcher feeds it from rtnetlink.
package linkwatch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// ErrNoRoute is reported when no route towards the target is left.
var ErrNoRoute = errors.New("no route to the target")

// Link is the state of a network link as the tracker needs it.
type Link struct {
	Index int
	Name  string
	// Up: administratively up and operationally not down.
	Up bool
	// Deleted: the link is gone.
	Deleted bool
}

// tracker decides, from the route lookups and link states it is given,
// when the path goes down and when it comes back. It reports each failure
// once, and again only after the path has come back; it reports the path
// back once per failure.
type tracker struct {
	// route returns the index of the link the route towards the target
	// leaves by.
	route func() (int, error)
	// link returns the current state of a link.
	link func(index int) (Link, error)

	out  int  // the route's output link; 0 if there is no route
	down bool // a failure was reported and the path has not come back
	// back is set when the path came back after a reported failure; the
	// watcher takes it with takeBack.
	back bool
}

// takeBack reports, once, that the path came back after a failure.
func (t *tracker) takeBack() bool {
	b := t.back
	t.back = false
	return b
}

// report returns err the first time the path goes down.
func (t *tracker) report(err error) error {
	if t.down {
		return nil
	}
	t.down = true
	return err
}

// routeChanged looks the route up again (initially, and after any route
// change) and returns an error if the path is now down.
func (t *tracker) routeChanged() error {
	idx, err := t.route()
	if err != nil {
		t.out = 0
		return t.report(fmt.Errorf("%w: %v", ErrNoRoute, err))
	}
	t.out = idx
	l, err := t.link(idx)
	if err != nil {
		return t.report(fmt.Errorf("link %d: %w", idx, err))
	}
	return t.linkChanged(l)
}

// linkChanged takes a link's new state and returns an error if the path is
// now down.
func (t *tracker) linkChanged(l Link) error {
	if l.Index != t.out {
		return nil
	}
	if l.Deleted || !l.Up {
		what := "down"
		if l.Deleted {
			what = "deleted"
		}
		return t.report(fmt.Errorf("link %s (%d) to the target is %s", l.Name, l.Index, what))
	}
	if t.down {
		t.down = false
		t.back = true
	}
	return nil
}

// Watcher watches the path towards Addr. It implements
// lifecycle.LinkWatcher.
type Watcher struct {
	Addr netip.Addr
	// Namespace is the network namespace to watch; nil: the current one.
	Namespace *netns.NsHandle
	Logger    *slog.Logger

	// settled, if set (tests), is called after the initial lookup and
	// after every event, with whether the path is down.
	settled func(down bool)
}

func linkFromAttrs(a *netlink.LinkAttrs) Link {
	up := a.Flags&net.FlagUp != 0
	switch a.OperState {
	case netlink.OperDown, netlink.OperLowerLayerDown, netlink.OperNotPresent:
		up = false
	}
	return Link{Index: a.Index, Name: a.Name, Up: up}
}

// Watch implements lifecycle.LinkWatcher: it runs until ctx is done, calls
// down each time the path fails and up each time it comes back after a
// failure. The netlink subscriptions' goroutines are joined before it
// returns.
func (w *Watcher) Watch(ctx context.Context, down func(error), up func()) error {
	log := w.Logger
	if log == nil {
		log = slog.Default()
	}
	ns := netns.None()
	if w.Namespace != nil {
		ns = *w.Namespace
	}
	// Route sockets only: a handle for every family fails with
	// EPROTONOSUPPORT on a kernel without some of them (XFRM, say), and
	// the watch would be gone without a word but a log line.
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("linkwatch: %w", err)
	}
	defer h.Close()

	done := make(chan struct{})
	links := make(chan netlink.LinkUpdate, 64)
	routes := make(chan netlink.RouteUpdate, 64)
	onErr := func(err error) { log.Debug("linkwatch: netlink", "err", err) }
	if err := netlink.LinkSubscribeWithOptions(links, done, netlink.LinkSubscribeOptions{Namespace: &ns, ErrorCallback: onErr}); err != nil {
		close(done)
		return fmt.Errorf("linkwatch: subscribe to links: %w", err)
	}
	if err := netlink.RouteSubscribeWithOptions(routes, done, netlink.RouteSubscribeOptions{Namespace: &ns, ErrorCallback: onErr}); err != nil {
		close(done)
		for range links {
		}
		return fmt.Errorf("linkwatch: subscribe to routes: %w", err)
	}
	// Closing done closes the sockets; each subscription's goroutine then
	// closes its channel. Drain both so that neither is left blocked on a
	// send: that is the join.
	defer func() {
		close(done)
		for range links {
		}
		for range routes {
		}
	}()

	dst := net.IP(w.Addr.AsSlice())
	t := &tracker{
		route: func() (int, error) {
			rs, err := h.RouteGet(dst)
			if err != nil {
				return 0, err
			}
			if len(rs) == 0 || rs[0].LinkIndex == 0 {
				return 0, unix.ENETUNREACH
			}
			return rs[0].LinkIndex, nil
		},
		link: func(index int) (Link, error) {
			l, err := h.LinkByIndex(index)
			if err != nil {
				return Link{}, err
			}
			return linkFromAttrs(l.Attrs()), nil
		},
	}
	// decide acts on the current state, not on an update's: updates can
	// arrive after a lookup that already saw a newer state, and a stale
	// "down" must not count as a new failure.
	decide := func() {
		if err := t.routeChanged(); err != nil {
			down(err)
		}
		if t.takeBack() {
			log.Info("linkwatch: path to the target is back")
			up()
		}
	}
	// Subscribed first, looked up second: no change can fall in between.
	decide()
	for {
		if w.settled != nil {
			w.settled(t.down)
		}
		select {
		case <-ctx.Done():
			return nil
		case _, ok := <-links:
			if !ok {
				return errors.New("linkwatch: link subscription ended")
			}
			decide()
		case _, ok := <-routes:
			if !ok {
				return errors.New("linkwatch: route subscription ended")
			}
			decide()
		}
	}
}
