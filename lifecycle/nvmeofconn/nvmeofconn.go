// Package nvmeofconn is the one adapter between lifecycle and the nvmeof
// host library: a lifecycle.Connector that makes an nvmeof association and
// identifies the namespace, and the lifecycle.Conn that wraps it. The
// daemon (attach) uses both directly.
package nvmeofconn

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/keepalive"
	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// Connector makes associations with one controller and namespace. It
// remembers what the first association found (First): what the block
// device is built for. Use it by pointer; do not copy it.
type Connector struct {
	// Config is used for every association; its OnFailure is replaced by
	// lifecycle's error callback.
	Config nvmeof.ControllerConfig
	// NSID is the namespace to expose.
	NSID uint32
	// KeepAliveRTT, if set, receives the round trip of every keep-alive
	// that completed.
	KeepAliveRTT func(time.Duration)
	// IOQueuesConnected, if set, is called with each association once
	// its I/O queues connected, before lifecycle lets I/O in: the queues
	// are idle, so the daemon can hand them to the ublk queues' rings
	// (nvmeof.Queue.Drive). An error fails the association.
	IOQueuesConnected func(ctrl *nvmeof.Controller) error

	mu             sync.Mutex
	firstNS        *nvmeof.Namespace // of the first association
	firstQueues    int               // I/O queues the controller granted first
	firstQueueSize int               // their size: Config.QueueSize within CAP.MQES+1 and MAXCMD
}

// First returns the namespace and the number of I/O queues of the first
// association made; nil and 0 before one was made.
func (k *Connector) First() (*nvmeof.Namespace, int) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.firstNS, k.firstQueues
}

// FirstQueueSize is the I/O queue size the first association negotiated
// (nvmeof.Controller.QueueSize); 0 before one was made.
func (k *Connector) FirstQueueSize() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.firstQueueSize
}

// NamespaceError is a Connect that found no usable namespace NSID.
type NamespaceError struct {
	NSID uint32
	Err  error
}

func (e *NamespaceError) Error() string { return fmt.Sprintf("namespace %d: %v", e.NSID, e.Err) }
func (e *NamespaceError) Unwrap() error { return e.Err }

// Connect implements lifecycle.Connector: the admin queue
// (nvmeof.ConnectAdmin) and the namespace's identity. The I/O queues are
// Conn.ConnectIOQueues.
func (k *Connector) Connect(ctx context.Context, onError func(error)) (lifecycle.Conn, error) {
	conn := &Conn{k: k, nsid: k.NSID, rtt: k.KeepAliveRTT, log: k.Config.Logger, changed: make(chan lifecycle.Namespace, 1)}
	cfg := k.Config
	cfg.OnFailure = onError
	cfg.OnEvent = func(ev nvmeof.AsyncEvent) {
		if k.Config.OnEvent != nil {
			k.Config.OnEvent(ev)
		}
		conn.onEvent(ev)
	}
	ctrl, err := nvmeof.ConnectAdmin(ctx, cfg)
	if err != nil {
		return nil, err
	}
	conn.ctrl = ctrl
	ns, err := ctrl.Namespace(ctx, k.NSID)
	if err != nil {
		ctrl.Close()
		return nil, &NamespaceError{NSID: k.NSID, Err: err}
	}
	conn.ns.Store(ns) // from here events are handled (namespace.go)
	return conn, nil
}

// connected records the first association whose I/O queues connected.
func (k *Connector) connected(ctrl *nvmeof.Controller, ns *nvmeof.Namespace) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.firstNS == nil {
		k.firstNS, k.firstQueues = ns, len(ctrl.IOQueues())
		k.firstQueueSize = ctrl.QueueSize()
	}
}

// Conn is one nvmeof association as lifecycle sees it. The I/O path gets it
// in Controller.Do and uses Controller, NS and IOQueue.
type Conn struct {
	k    *Connector
	ctrl *nvmeof.Controller
	nsid uint32
	// ns is the namespace as last identified: replaced when a
	// namespace-changed event finds it resized, so that I/O is bounded by
	// its current size (namespace.go). nil until Connect identified it.
	ns      atomic.Pointer[nvmeof.Namespace]
	changed chan lifecycle.Namespace // capacity 1: the latest change
	rtt     func(time.Duration)
	log     *slog.Logger // nil: slog.Default()
}

var _ lifecycle.Conn = (*Conn)(nil)

// Controller is the nvmeof association.
func (c *Conn) Controller() *nvmeof.Controller { return c.ctrl }

// NS is the namespace as last identified, for building I/O commands: its
// size bounds them.
func (c *Conn) NS() *nvmeof.Namespace { return c.ns.Load() }

// IOQueue returns the I/O queue for ublk queue i (queues are shared
// round-robin if the controller granted fewer).
func (c *Conn) IOQueue(i int) *nvmeof.IOQueue {
	qs := c.ctrl.IOQueues()
	return qs[i%len(qs)]
}

// ConnectIOQueues implements lifecycle.Conn: keep-alive runs on the admin
// queue meanwhile.
func (c *Conn) ConnectIOQueues(ctx context.Context) error {
	if err := c.ctrl.ConnectIOQueues(ctx); err != nil {
		return err
	}
	if f := c.k.IOQueuesConnected; f != nil {
		if err := f(c.ctrl); err != nil {
			return err
		}
	}
	c.k.connected(c.ctrl, c.NS())
	return nil
}

func (c *Conn) KeepAlive(ctx context.Context) error {
	start := time.Now()
	err := c.ctrl.KeepAlive(ctx)
	if err == nil && c.rtt != nil {
		c.rtt(time.Since(start))
	}
	return err
}

func (c *Conn) Namespace() lifecycle.Namespace { return identity(c.ns.Load()) }

func (c *Conn) KATO() time.Duration { return c.ctrl.KATO() }

func (c *Conn) Traffic() keepalive.Traffic {
	if !c.ctrl.TBKAS() {
		return nil
	}
	return c.ctrl.Traffic()
}

// IsPathError implements lifecycle.Conn with IsPathError.
func (c *Conn) IsPathError(err error) bool { return IsPathError(err) }

// IsPathError reports whether an I/O of an association failed with err
// because of the association or its namespace, not because of the I/O:
// nvmeof.IsPathError, or Invalid Namespace (with or without DNR). Every
// I/O of an association is for its one namespace, identified active at
// Connect; Invalid Namespace says it is not active any more. SPDK's
// nvmf_tgt answers so from the moment a namespace is removed
// (nvmf_subsystem_remove_ns), before its Namespace Attribute Changed event
// reaches the host (Linux nvmet answers a disabled namespace with a path
// status instead). As for the removal that event reports (namespace.go),
// the I/O is held and the association recovers, reconnecting until the
// namespace is back; the retries stay bounded (Options.MaxRetries).
func IsPathError(err error) bool {
	return nvmeof.IsPathError(err) || errors.Is(err, nvme.NVME_SC_INVALID_NS)
}

// CRDT implements lifecycle.Conn: the controller's Command Retry Delay
// Times, only when it accepted Advanced Command Retry (ACRE); without it a
// controller must not ask for a delay (CRD 0), so none is honoured.
func (c *Conn) CRDT() [3]time.Duration {
	if !c.ctrl.ACRE() {
		return [3]time.Duration{}
	}
	return c.ctrl.CRDT()
}

// ShutdownController implements lifecycle.Conn: CC.SHN, then CSTS.SHST,
// within the controller's RTD3E (nvmeof.Controller.ShutdownTimeout).
func (c *Conn) ShutdownController(ctx context.Context) error {
	return c.ctrl.ShutdownController(ctx)
}

func (c *Conn) Shutdown()       { c.ctrl.Shutdown() }
func (c *Conn) WaitIdle()       { c.ctrl.WaitIdle() }
func (c *Conn) FreeIOQueues()   { c.ctrl.FreeIOQueues() }
func (c *Conn) FreeAdminQueue() { c.ctrl.FreeAdminQueue() }
