// Package lifecycle is the controller state machine and the one place that
// orders connect, error recovery, reconnect and teardown of an NVMe/TCP
// controller and the block device in front of it (docs/design.md,
// "Controller lifecycle").
//
// States and transitions are the Linux host's (nvme_change_ctrl_state):
//
//	to          allowed from
//	CONNECTING  NEW, RESETTING
//	LIVE        CONNECTING
//	RESETTING   NEW, LIVE
//	DELETING    LIVE, RESETTING, CONNECTING
//	DEAD        DELETING
//
// One unexported function, StateMachine.change, changes state; a
// transition the table forbids is rejected with *IllegalTransitionError.
// Every transition is recorded with its reason and time (History) and
// delivered, in order, to observers (Observe): logs, metrics, tests.
//
// A Controller's supervisor goroutine does everything that changes the
// association: Start makes the first one; an error reported by the
// association (socket error, command timeout, C2HTermReq), a failed or
// timed-out keep-alive, a link going down (Options.LinkWatch) or a path
// error on I/O starts error recovery: RESETTING, teardown, CONNECTING,
// then a reconnect every reconnect_delay until ctrl_loss_tmo (at once, as
// an extra attempt, when the link watch sees the path come back); a Connect
// rejected with DNR, a different namespace found on reconnect or after a
// namespace-changed event, or ctrl_loss_tmo delete the controller. The same
// namespace with a new size keeps the device and resizes it; a namespace no
// longer active starts recovery (namespace.go). An I/O that failed with any
// NVMe status without DNR (Namespace Not Ready, a Path Related Status, ...)
// starts no recovery: the controller answered, so Do retries it on the same
// association after the Command Retry Delay the status names (retry.go,
// nvme_decide_disposition), up to MaxRetries times there; a Path Related
// Status that outlasts them is then a failure of the path (recovery, the
// I/O held for the next association). Everything else only
// signals the supervisor, so no callback ever tears down inline, and
// keep-alive's failure is a channel the supervisor selects on: no
// self-join.
//
// A connect has two phases: the admin queue (Connector.Connect), then the
// I/O queues (Conn.ConnectIOQueues). Keep-alive starts between them, as
// the Linux host's since 4733b65d82bd, so that connecting many I/O queues
// cannot outlast KATO; an association whose I/O queues fail to connect is
// torn down keep-alive first (teardown.go, discardConn).
//
// Teardown is in teardown.go, in docs/design.md's order, once: change
// state (no new submissions), stop keep-alive synchronously, quiesce the
// ublk side, on delete send the controller the shutdown notification
// (CC.SHN, bounded), shut the sockets, wait until every completion handler
// and every Do caller has returned, free the I/O queues, then the admin
// queue; on delete, remove the block device.
//
// Wiring: the nvmeof side is lifecycle/nvmeofconn (a Connector and the
// Conn it returns). The ublk side implements Block (Stop: STOP_DEV, Remove:
// DEL_DEV and closing) and sends every I/O through Controller.Do, which
// holds it while the controller recovers and fails it with an error
// wrapping EIO when fast_io_fail_tmo expires or the controller is deleted:
//
//	c, _ := lifecycle.New(&nvmeofconn.Connector{Config: cfg, NSID: 1}, lifecycle.DefaultOptions())
//	if err := c.Start(ctx); err != nil { ... }
//	if err := c.SetBlock(dev); err != nil { ... } // being deleted: remove dev yourself
//	err := c.Do(ctx, func(conn lifecycle.Conn) error {
//		n := conn.(*nvmeofconn.Conn)
//		return n.IOQueue(q).Write(ctx, n.NS(), lba, buf, false)
//	})
//	...
//	c.Delete() // or <-c.Done() when it deleted itself; c.Err() says why
package lifecycle
