package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/keepalive"
)

// Connector makes a new association with the controller, in two phases,
// as the Linux host does since 6.7 (4733b65d82bd, "nvme: start keep-alive
// after admin queue setup"): Connect makes the admin queue (fabrics Connect
// with KATO, enable, Identify, Set Features) and identifies the namespace;
// lifecycle then starts keep-alive on it and calls Conn.ConnectIOQueues.
// Connecting many I/O queues over a slow link can so not outlast KATO.
//
// onError must be called when the association fails while it is in use: a
// socket error, a command timeout, a C2HTermReq. It may be called from any
// goroutine, any number of times, also during Connect; it only records the
// error and wakes the controller, it never blocks or tears anything down.
//
// A Connect that fails must have released everything it set up. A
// ConnectIOQueues that fails leaves the association to lifecycle, which
// tears it down in the teardown order (keep-alive stopped first). An error
// whose chain has a method DoNotRetry() bool or DNR() bool returning true
// (a Connect response with the DNR bit set) stops reconnect attempts.
type Connector interface {
	Connect(ctx context.Context, onError func(error)) (Conn, error)
}

// Conn is one association. lifecycle calls ConnectIOQueues once, after
// Connect and with keep-alive running; then, to tear it down, these in
// this order, once each: ShutdownController (on delete, unless the
// association failed or the delete is hurried), Shutdown, WaitIdle,
// FreeIOQueues, FreeAdminQueue. Shutdown may come from
// the goroutine calling Controller.Hurry, the others come from the
// supervisor. A Conn must be comparable (a pointer).
type Conn interface {
	// ConnectIOQueues connects the I/O queues, while keep-alive runs on
	// the admin queue. It must return promptly once ctx is cancelled
	// (lifecycle cancels it when a keep-alive fails, or on delete). If it
	// fails, lifecycle tears the association down: the I/O queues
	// connected so far are freed by FreeIOQueues.
	ConnectIOQueues(ctx context.Context) error

	// KeepAlive sends one Keep Alive on the admin queue; see
	// keepalive.Sender for what it must do when ctx is cancelled.
	keepalive.Sender

	// Namespace identifies the namespace this association serves.
	Namespace() Namespace
	// KATO is the keep-alive timeout set in the fabrics Connect command;
	// zero disables keep-alive.
	KATO() time.Duration
	// Traffic is non-nil when the controller supports traffic-based
	// keep-alive (CTRATT.TBKAS).
	Traffic() keepalive.Traffic
	// IsPathError reports whether err, returned by a command on this
	// association, means the command failed because the association failed
	// (socket error, shut down, timeout, termination) rather than with a
	// status from the controller. Such a command is retried on the next
	// association. It may also be true for a Path Related Status without
	// DNR (nvmeof.IsPathError is): lifecycle recognises that status itself
	// and retries the command on the same association, without recovery,
	// until the retries there are used up (retry.go).
	IsPathError(err error) bool
	// CRDT are the Command Retry Delay Times 1..3 (Identify Controller
	// CRDT1..3, in 100 ms units) when Advanced Command Retry was enabled
	// (Set Features Host Behavior Support, ACRE = 1), zero otherwise: how
	// long to wait before retrying a command whose status has CRD 1..3.
	// lifecycle reads them once, when the association goes LIVE.
	CRDT() [3]time.Duration

	// ShutdownController sends the shutdown notification (CC.SHN normal)
	// and waits for the controller to report it complete (CSTS.SHST), as
	// the Linux host does when it deletes a controller. Keep-alive is
	// stopped and no I/O is in flight. It must return within its own
	// bound (the controller's RTD3E) and promptly once ctx is cancelled.
	ShutdownController(ctx context.Context) error
	// Shutdown shuts every socket down: from now on no command can be
	// written, and every command in flight fails (or completes, if its
	// response was already read). It does not wait.
	Shutdown()
	// WaitIdle waits until every completion handler of every queue has
	// returned and no goroutine of the association touches a queue any
	// more: the queues' usage references are at zero. It is called after
	// Shutdown and must return in bounded time.
	WaitIdle()
	// FreeIOQueues closes and frees the I/O queues.
	FreeIOQueues()
	// FreeAdminQueue closes and frees the admin queue. Called last.
	FreeAdminQueue()
}

// Block is the ublk side, as lifecycle sees it. I/O from the block device
// enters the controller through Controller.Do, which holds it while the
// controller recovers; Block itself is only stopped and removed.
type Block interface {
	// Stop stops the device (ublk STOP_DEV): no new I/O, and the I/O in
	// flight drained. The queues must keep being served until Stop
	// returns.
	Stop(ctx context.Context) error
	// Remove closes the rings, unmaps, closes /dev/ublkcN and deletes the
	// device (DEL_DEV). ctx ends when the delete is hurried
	// (Controller.Hurry): stop waiting for the device's openers then.
	Remove(ctx context.Context) error
}

// Namespace is the identity of a namespace (Identify Namespace and the
// Namespace Identification Descriptor list) and its size. A reconnect must
// find the same identity; the size may change (namespace.go).
type Namespace struct {
	NSID      uint32
	NGUID     [16]byte
	EUI64     [8]byte
	UUID      [16]byte
	Blocks    uint64 // NSZE
	BlockSize uint32 // of the LBA format in use
}

var (
	// ErrDeleted: the controller is being deleted or is dead. It wraps
	// EIO, which is what the block device completes the I/O with.
	ErrDeleted = fmt.Errorf("controller deleted: %w", syscall.EIO)
	// ErrFastIOFail: held I/O failed because fast_io_fail_tmo expired
	// while reconnecting.
	ErrFastIOFail = fmt.Errorf("fast_io_fail_tmo expired: %w", syscall.EIO)
	// ErrRetriesExhausted: an I/O failed on the path more times than
	// Options.MaxRetries, or with a retryable status more times than that
	// on one association (a Path Related Status then fails the path
	// instead, while path failures remain). The error returned wraps it
	// and the last failure.
	ErrRetriesExhausted = fmt.Errorf("retries exhausted: %w", syscall.EIO)
	// ErrNamespaceChanged: a reconnect or a change event found a
	// different namespace.
	ErrNamespaceChanged = errors.New("namespace changed across reconnect")
	// ErrLinkDown: the link or route towards the target went down.
	ErrLinkDown = errors.New("link to target down")
)

// isDNR reports whether err carries the Do Not Retry bit: an error in its
// chain has a method DoNotRetry() bool or DNR() bool (nvme.Status) that
// returns true.
func isDNR(err error) bool {
	var d interface{ DoNotRetry() bool }
	if errors.As(err, &d) && d.DoNotRetry() {
		return true
	}
	var s interface{ DNR() bool }
	return errors.As(err, &s) && s.DNR()
}
