package attach

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle"
	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle/nvmeofconn"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
	"github.com/ublk-nvmeof/ublk-nvmeof/ublk"
)

// backendRig is blockBackend on a real lifecycle.Controller and NVMe/TCP
// controller, against the in-process target over loopback: the I/O path of
// the daemon without the kernel's ublk driver.
type backendRig struct {
	t    *testing.T
	addr string // the target's
	nqn  string
	tg   *target.Target
	lc   *lifecycle.Controller
	b    *blockBackend
	mem  *target.MemoryBackend
}

// startTarget starts the in-process target made with cfg, with
// subsystem nqn and a namespace 1 of size bytes in 512-byte blocks,
// closed when t ends, and returns it, the namespace's memory and the
// address it listens on.
func startTarget(t *testing.T, cfg target.Config, nqn string, size int64) (*target.Target, *target.MemoryBackend, string) {
	t.Helper()
	tg := target.New(cfg)
	t.Cleanup(func() { tg.Close() })
	sub, err := tg.AddSubsystem(nqn)
	if err != nil {
		t.Fatal(err)
	}
	mem := target.NewMemoryBackend(size)
	if err := sub.AddNamespace(target.NamespaceConfig{NSID: 1, Backend: mem, BlockShift: 9}); err != nil {
		t.Fatal(err)
	}
	addr, err := tg.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return tg, mem, addr.String()
}

// startMemoryTarget starts the in-process target with subsystem nqn and a
// 1 MiB namespace 1 of 512-byte blocks, closed when t ends, and returns
// the attach options that reach it.
func startMemoryTarget(t *testing.T, nqn string) (*target.Target, *target.MemoryBackend, Options) {
	t.Helper()
	tg, mem, addr := startTarget(t, target.Config{}, nqn, 1<<20)
	o := DefaultOptions()
	o.NQN = nqn
	o.TrAddr, o.TrSvcID, _ = net.SplitHostPort(addr)
	return tg, mem, o
}

// connectAssociation makes one association through k as the lifecycle's
// connect does (the admin queue, then the I/O queues), without a
// lifecycle; release tears it down in the lifecycle's order.
func connectAssociation(t *testing.T, ctx context.Context, k lifecycle.Connector) (conn lifecycle.Conn, release func()) {
	t.Helper()
	conn, err := k.Connect(ctx, func(error) {})
	if err != nil {
		t.Fatal(err)
	}
	release = func() {
		conn.Shutdown()
		conn.WaitIdle()
		conn.FreeIOQueues()
		conn.FreeAdminQueue()
	}
	if err := conn.ConnectIOQueues(ctx); err != nil {
		release()
		t.Fatal(err)
	}
	return conn, release
}

// rigLifecycleOptions are the lifecycle options of the rigs against the
// in-process target: reconnect almost at once, never give the controller
// up, log to logger.
func rigLifecycleOptions(logger *slog.Logger) lifecycle.Options {
	lopts := lifecycle.DefaultOptions()
	lopts.ReconnectDelay = 10 * time.Millisecond
	lopts.CtrlLossTmo = -1
	lopts.Logger = logger
	return lopts
}

// startLifecycle makes a lifecycle controller on connector and starts it
// (a failed start deletes it); the caller deletes it.
func startLifecycle(t *testing.T, connector lifecycle.Connector, lopts lifecycle.Options) *lifecycle.Controller {
	t.Helper()
	lc, err := lifecycle.New(connector, lopts)
	if err != nil {
		t.Fatal(err)
	}
	if err := lc.Start(context.Background()); err != nil {
		lc.Delete()
		t.Fatal(err)
	}
	return lc
}

func newBackendRig(t *testing.T) *backendRig {
	t.Helper()
	const nqn = "nqn.2026-11.io.ublk-nvmeof:backend"
	tg, mem, o := startMemoryTarget(t, nqn)
	connector := &nvmeofconn.Connector{
		Config: nvmeof.ControllerConfig{
			Addr: o.Addr(), SubsysNQN: nqn,
			Host:     nvmeof.HostIdentity{NQN: "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000002"},
			IOQueues: 2, QueueSize: 32, KATO: 5 * time.Second,
			Logger: quietLogger(),
		},
		NSID: 1,
	}
	lc := startLifecycle(t, connector, rigLifecycleOptions(quietLogger()))
	r := &backendRig{t: t, addr: o.Addr(), nqn: nqn, tg: tg, lc: lc, b: newBlockBackend(lc, nil, 2, 32), mem: mem}
	t.Cleanup(func() {
		lc.Delete()
		r.b.wg.Wait()
	})
	return r
}

// io serves one request the way a ublk queue thread does, and returns the
// channel its result (what the kernel would get) arrives on.
func (r *backendRig) io(queue, tag int, op ublk.Op, off int64, buf []byte) <-chan int32 {
	res := r.serve(queue, tag, op, off, buf)
	r.b.Commit(queue)
	return res
}

// serve is io without the Commit that ends a batch.
func (r *backendRig) serve(queue, tag int, op ublk.Op, off int64, buf []byte) <-chan int32 {
	res := make(chan int32, 1)
	r.b.Serve(ublk.NewDetachedRequest(queue, tag, op, 0, off, len(buf), buf, func(v int32) { res <- v }))
	return res
}

func (r *backendRig) wait(what string, ch <-chan int32, want int32) {
	r.t.Helper()
	select {
	case got := <-ch:
		if got != want {
			r.t.Errorf("%s: result %d, want %d", what, got, want)
		}
	case <-time.After(30 * time.Second):
		r.t.Fatalf("%s: no completion (controller %v)", what, r.lc.State())
	}
}

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func pattern(i, n int) []byte {
	return bytes.Repeat([]byte(fmt.Sprintf("%06d", i)), n/6+1)[:n]
}

// writeAll writes block i of 4 KiB with pattern(i) for every i in idx, all
// in flight at once across both queues, in batches of 8 per queue, and
// waits for them.
func (r *backendRig) writeAll(what string, idx []int) {
	r.t.Helper()
	chs := make([]<-chan int32, len(idx))
	for k, i := range idx {
		chs[k] = r.serve(k%2, k/2, ublk.OpWrite, int64(i)*4096, pattern(i, 4096))
		if k%16 >= 14 {
			r.b.Commit(k % 2)
		}
	}
	r.b.Commit(0)
	r.b.Commit(1)
	for k, ch := range chs {
		r.wait(fmt.Sprintf("%s: write %d", what, idx[k]), ch, 4096)
	}
}

// verify reads every block in idx back through the backend and checks it
// on the target's memory too.
func (r *backendRig) verify(idx []int) {
	r.t.Helper()
	for k, i := range idx {
		buf := make([]byte, 4096)
		r.wait(fmt.Sprintf("read %d", i), r.io(k%2, 0, ublk.OpRead, int64(i)*4096, buf), 4096)
		if !bytes.Equal(buf, pattern(i, 4096)) {
			r.t.Errorf("block %d read back %q..., want %q...", i, buf[:12], pattern(i, 12))
		}
		onTarget := make([]byte, 4096)
		r.mem.ReadAt(onTarget, int64(i)*4096)
		if !bytes.Equal(onTarget, pattern(i, 4096)) {
			r.t.Errorf("block %d on the target %q..., want %q...", i, onTarget[:12], pattern(i, 12))
		}
	}
}

func span(from, to int) []int {
	var s []int
	for i := from; i < to; i++ {
		s = append(s, i)
	}
	return s
}

// The fast path: I/O started on the calling goroutine while LIVE and
// completed by the NVMe queue's reader.
func TestBlockBackendLive(t *testing.T) {
	r := newBackendRig(t)
	r.writeAll("live", span(0, 48))
	r.verify(span(0, 48))
	r.wait("flush", r.io(0, 0, ublk.OpFlush, 0, nil), 0)
	if n := r.b.inflight.Load(); n != 0 {
		t.Fatalf("%d requests in flight after all completed", n)
	}
}

// A write whose connection closes under it fails with a path error on the
// fast path and is retried on the next association: no error reaches the
// block device, and the data is there.
func TestBlockBackendRetriesPathError(t *testing.T) {
	r := newBackendRig(t)
	remove := r.tg.InjectFault(target.Fault{QID: target.AnyQueue, Match: target.MatchOpcode(nvme.NVME_CMD_WRITE), Times: 1, Close: true})
	defer remove()
	r.writeAll("connection closed", span(0, 32))
	r.verify(span(0, 32))
	var recovered bool
	for _, tr := range r.lc.States().History() {
		recovered = recovered || tr.To == lifecycle.StateResetting
	}
	if !recovered {
		t.Fatal("the closed connection did not start recovery")
	}
}

// A write answered with Invalid Namespace on the fast path (SPDK's
// nvmf_tgt, from the namespace's removal until its change event arrives)
// is held and retried on the next association, which finds the namespace
// active again: no error reaches the block device, and the data is there.
func TestBlockBackendRetriesInvalidNamespace(t *testing.T) {
	r := newBackendRig(t)
	remove := r.tg.InjectFault(target.Fault{QID: target.AnyQueue, Match: target.MatchOpcode(nvme.NVME_CMD_WRITE), Times: 1,
		Status: nvme.NVME_SC_INVALID_NS | nvme.NVME_STATUS_DNR})
	defer remove()
	r.writeAll("invalid namespace", span(0, 8))
	r.verify(span(0, 8))
	var recovered bool
	for _, tr := range r.lc.States().History() {
		recovered = recovered || tr.To == lifecycle.StateResetting
	}
	if !recovered {
		t.Fatal("Invalid Namespace did not start recovery")
	}
}

// A write completed with a status without DNR on the fast path
// (Namespace Not Ready, as a namespace briefly disabled) is retried through
// lifecycle.Retry on the same association: it lands, and no recovery
// starts.
func TestBlockBackendRetriesStatus(t *testing.T) {
	r := newBackendRig(t)
	remove := r.tg.InjectFault(target.Fault{QID: target.AnyQueue, Match: target.MatchOpcode(nvme.NVME_CMD_WRITE), Times: 3,
		Status: nvme.NVME_SC_NS_NOT_READY})
	defer remove()
	r.writeAll("namespace not ready", span(0, 8))
	r.verify(span(0, 8))
	for _, tr := range r.lc.States().History() {
		if tr.To == lifecycle.StateResetting {
			t.Fatalf("a status started recovery (%s)", tr.Reason)
		}
	}
}

// I/O arriving while the controller reconnects takes the slow path: held,
// then served on the new association.
func TestBlockBackendHeldWhileReconnecting(t *testing.T) {
	r := newBackendRig(t)
	r.writeAll("before", span(0, 8))
	resetting := make(chan struct{})
	r.lc.States().Observe(func(tr lifecycle.Transition) {
		if tr.To == lifecycle.StateResetting {
			close(resetting)
		}
	})
	// Keep the controller away from LIVE until the I/O is held: every
	// fabrics command on an admin queue (the Connect first) closes it.
	remove := r.tg.InjectFault(target.Fault{QID: 0, Match: target.MatchOpcode(nvme.NVME_FABRICS_COMMAND), Close: true})
	r.tg.DropConnections()
	<-resetting
	chs := make([]<-chan int32, 0, 8)
	for k, i := range span(8, 16) {
		chs = append(chs, r.io(k%2, k/2, ublk.OpWrite, int64(i)*4096, pattern(i, 4096)))
	}
	deadline := time.Now().Add(30 * time.Second)
	for r.lc.Held() != len(chs) {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d writes held, controller %v", r.lc.Held(), len(chs), r.lc.State())
		}
		time.Sleep(time.Millisecond)
	}
	remove()
	for k, ch := range chs {
		r.wait(fmt.Sprintf("held write %d", 8+k), ch, 4096)
	}
	r.verify(span(0, 16))
}

// After delete every request fails with EIO at once.
func TestBlockBackendAfterDelete(t *testing.T) {
	r := newBackendRig(t)
	r.lc.Delete()
	r.wait("write after delete", r.io(0, 0, ublk.OpWrite, 0, pattern(0, 4096)), -5 /* -EIO */)
}

// blockError gives the block layer an errno it knows what to do with.
func TestBlockError(t *testing.T) {
	for _, c := range []struct {
		err  error
		want error
	}{
		{nil, nil},
		{&nvmeof.QueueError{QID: 1, Err: &net.OpError{Op: "read", Err: syscall.ECONNRESET}}, syscall.EIO},
		{fmt.Errorf("%w: x", lifecycle.ErrRetriesExhausted), syscall.EIO},
		// After the retries the last status decides, as nvme_error_status.
		{fmt.Errorf("%w: %w", lifecycle.ErrRetriesExhausted, nvme.NVME_SC_INVALID_OPCODE), syscall.EOPNOTSUPP},
		{fmt.Errorf("%w: %w", lifecycle.ErrRetriesExhausted, nvme.NVME_SC_ANA_TRANSITION), syscall.EIO},
		{fmt.Errorf("%w: %w", lifecycle.ErrRetriesExhausted, nvme.NVME_SC_NS_NOT_READY), syscall.EIO},
		{lifecycle.ErrDeleted, syscall.EIO},
		{syscall.EINVAL, syscall.EINVAL},
		{nvme.Status(nvme.NVME_SC_INVALID_OPCODE), syscall.EOPNOTSUPP},
		{nvme.Status(nvme.NVME_SC_LBA_RANGE), syscall.ENOSPC},
		{nvme.Status(nvme.NVME_SC_INTERNAL), syscall.EIO},
	} {
		if got := blockError(c.err); got != c.want {
			t.Errorf("blockError(%v) = %v, want %v", c.err, got, c.want)
		}
	}
}

// A namespace the target lacks is ErrNoNamespace (exit status 7), the
// keep-alive round trip reaches the hook, and the connector remembers the
// first association.
func TestConnectorNamespaceAndRTT(t *testing.T) {
	r := newBackendRig(t)
	ctx := context.Background()
	cfg := nvmeof.ControllerConfig{
		Addr: r.addr, SubsysNQN: r.nqn,
		Host:     nvmeof.HostIdentity{NQN: "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000003"},
		IOQueues: 1, QueueSize: 8, KATO: 5 * time.Second, Logger: quietLogger(),
	}
	missing := &nvmeofconn.Connector{Config: cfg, NSID: 9}
	if _, err := missing.Connect(ctx, func(error) {}); !errors.Is(classifyConnectError(Options{}, err), ErrNoNamespace) {
		t.Fatalf("connect to namespace 9: %v, want ErrNoNamespace", err)
	}
	if ns, queues := missing.First(); ns != nil || queues != 0 {
		t.Fatalf("no association made, but First says namespace %v, %d queues", ns, queues)
	}
	var rtts []time.Duration
	k := &nvmeofconn.Connector{Config: cfg, NSID: 1, KeepAliveRTT: func(d time.Duration) { rtts = append(rtts, d) }}
	conn, release := connectAssociation(t, ctx, k)
	defer release()
	if ns, queues := k.First(); ns == nil || ns.NSID != 1 || queues != 1 {
		t.Fatalf("first association: namespace %v, %d queues", ns, queues)
	}
	if err := conn.KeepAlive(ctx); err != nil || len(rtts) != 1 || rtts[0] <= 0 {
		t.Fatalf("keep-alive: %v, round trips %v", err, rtts)
	}
}
