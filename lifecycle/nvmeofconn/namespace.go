package nvmeofconn

import (
	"context"
	"errors"
	"log/slog"
	"slices"

	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// Namespace Attribute Changed events (NVMe Base Specification 2.1,
// 5.2.2.1): the association identifies its namespace again, as the Linux
// host's scan work does (nvme_scan_ns_list, nvme_validate_ns), and hands
// the result to lifecycle (lifecycle.NamespaceWatcher), which decides:
// resize, delete, or recover (lifecycle/namespace.go). What must happen
// before any I/O sees the change happens here, on the controller's event
// goroutine: a resized namespace bounds I/O by its new size at once; a
// namespace of another identity fails every I/O from now on.

var _ lifecycle.NamespaceWatcher = (*Conn)(nil)

// NamespaceChanged implements lifecycle.NamespaceWatcher.
func (c *Conn) NamespaceChanged() <-chan lifecycle.Namespace { return c.changed }

// identity is what lifecycle compares of a namespace.
func identity(ns *nvmeof.Namespace) lifecycle.Namespace {
	return lifecycle.Namespace{
		NSID:      ns.NSID,
		NGUID:     ns.NGUID,
		EUI64:     ns.EUI64,
		UUID:      ns.UUID,
		Blocks:    ns.Blocks,
		BlockSize: uint32(ns.BlockSize()),
	}
}

// onEvent is the association's OnEvent, on its event goroutine (which may
// issue admin commands; Shutdown fails them, and WaitIdle joins it).
func (c *Conn) onEvent(ev nvmeof.AsyncEvent) {
	if ev.Type != nvme.NVME_AER_TYPE_NOTICE || ev.Info != nvme.NVME_AER_NOTICE_NS_CHANGED || !c.listed(ev.ChangedNamespaces) {
		return
	}
	cur := c.ns.Load()
	if cur == nil {
		return // during Connect, which identifies the namespace afterwards
	}
	ctx, cancel := context.WithTimeout(context.Background(), nvmeof.DefaultAdminTimeout)
	defer cancel()
	ns, err := c.revalidate(ctx)
	switch {
	case err != nil:
		// The association failed under the commands (its own failure
		// reports that), or the controller answered with an error:
		// keep what is known, as nvme_validate_ns does without DNR.
		c.logger().Warn("namespace changed, but identifying it again failed; keeping it as it was", "nsid", c.nsid, "err", err)
		return
	case ns == nil:
		c.logger().Warn("namespace no longer active on the controller", "nsid", c.nsid)
		gone := identity(cur)
		gone.Blocks = 0
		c.publish(gone)
		return
	}
	if identity(cur).SameIdentity(identity(ns)) != nil {
		// Another namespace under this NSID: no I/O may reach it. A
		// namespace of no blocks fails every read and write here;
		// lifecycle deletes the controller.
		fenced := *cur
		fenced.Blocks = 0
		c.ns.Store(&fenced)
	} else if ns.Blocks != cur.Blocks {
		c.ns.Store(ns) // I/O is bounded by the new size from now on
	}
	c.publish(identity(ns))
}

// listed reports whether a Changed Namespace List names this namespace:
// it does when it lists its NSID, when it overflowed (FFFFFFFFh first), or
// when it is empty (the log could not be read).
func (c *Conn) listed(ids []uint32) bool {
	return len(ids) == 0 || slices.Contains(ids, c.nsid) || slices.Contains(ids, nvme.NVME_NSID_ALL)
}

// revalidate identifies the namespace again. It returns nil and no error
// when the namespace is no longer active: not in the active namespace
// list, Identify Namespace all zeroes, or Invalid Namespace.
func (c *Conn) revalidate(ctx context.Context) (*nvmeof.Namespace, error) {
	var st nvme.Status
	active, err := c.ctrl.ActiveNamespaces(ctx)
	switch {
	case err == nil:
		if !slices.Contains(active, c.nsid) {
			return nil, nil
		}
	case errors.As(err, &st):
		// CNS 02h is optional before NVMe 1.1: Identify decides.
	default:
		return nil, err
	}
	ns, err := c.ctrl.Namespace(ctx, c.nsid)
	switch {
	case err == nil:
		return ns, nil
	case errors.Is(err, nvmeof.ErrNamespaceNotActive), errors.Is(err, nvme.NVME_SC_INVALID_NS):
		return nil, nil
	}
	return nil, err
}

// publish hands n to lifecycle, replacing a change it has not taken yet.
// The event goroutine is the only sender.
func (c *Conn) publish(n lifecycle.Namespace) {
	for {
		select {
		case c.changed <- n:
			return
		default:
		}
		select {
		case <-c.changed:
		default:
		}
	}
}

func (c *Conn) logger() *slog.Logger {
	if c.log != nil {
		return c.log
	}
	return slog.Default()
}
