// Package nvmeofconn connects lifecycle to the nvmeof host library: a
// lifecycle.Connector that makes an nvmeof association and identifies the
// namespace, and the lifecycle.Conn that wraps it.
package nvmeofconn

import (
	"context"
	"fmt"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/keepalive"
	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
)

// Connector makes associations with one controller and namespace.
type Connector struct {
	// Config is used for every association; its OnFailure is replaced by
	// lifecycle's error callback.
	Config nvmeof.ControllerConfig
	// NSID is the namespace to expose.
	NSID uint32
}

// Connect implements lifecycle.Connector.
func (k *Connector) Connect(ctx context.Context, onError func(error)) (lifecycle.Conn, error) {
	cfg := k.Config
	cfg.OnFailure = onError
	ctrl, err := nvmeof.Connect(ctx, cfg)
	if err != nil {
		return nil, err
	}
	ns, err := ctrl.Namespace(ctx, k.NSID)
	if err != nil {
		ctrl.Close()
		return nil, fmt.Errorf("namespace %d: %w", k.NSID, err)
	}
	return &Conn{ctrl: ctrl, ns: ns}, nil
}

// Conn is one nvmeof association as lifecycle sees it. The I/O path gets it
// in Controller.Do and uses Controller, NS and IOQueue.
type Conn struct {
	ctrl *nvmeof.Controller
	ns   *nvmeof.Namespace
}

var _ lifecycle.Conn = (*Conn)(nil)

// Controller is the nvmeof association.
func (c *Conn) Controller() *nvmeof.Controller { return c.ctrl }

// NS is the namespace, for building I/O commands.
func (c *Conn) NS() *nvmeof.Namespace { return c.ns }

// IOQueue returns the I/O queue for ublk queue i (queues are shared
// round-robin if the controller granted fewer).
func (c *Conn) IOQueue(i int) *nvmeof.IOQueue {
	qs := c.ctrl.IOQueues()
	return qs[i%len(qs)]
}

func (c *Conn) KeepAlive(ctx context.Context) error { return c.ctrl.KeepAlive(ctx) }

func (c *Conn) Namespace() lifecycle.Namespace {
	return lifecycle.Namespace{
		NSID:      c.ns.NSID,
		NGUID:     c.ns.NGUID,
		EUI64:     c.ns.EUI64,
		UUID:      c.ns.UUID,
		Blocks:    c.ns.Blocks,
		BlockSize: uint32(c.ns.BlockSize()),
	}
}

func (c *Conn) KATO() time.Duration { return c.ctrl.KATO() }

func (c *Conn) Traffic() keepalive.Traffic {
	if !c.ctrl.TBKAS() {
		return nil
	}
	return c.ctrl.Traffic()
}

func (c *Conn) IsPathError(err error) bool { return nvmeof.IsPathError(err) }
func (c *Conn) Shutdown()                  { c.ctrl.Shutdown() }
func (c *Conn) WaitIdle()                  { c.ctrl.WaitIdle() }
func (c *Conn) FreeIOQueues()              { c.ctrl.FreeIOQueues() }
func (c *Conn) FreeAdminQueue()            { c.ctrl.FreeAdminQueue() }
