package nvmeof_test

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
)

// Interop with the Linux kernel, in the e2e VM (go test ./e2e -run TestVM).

// TestGuestHostAgainstLinuxTarget runs this host library against the Linux
// nvmet-tcp target: discovery, connect, identify, I/O at several queue
// depths with data verification, digests off and on, orderly shutdown.
func TestGuestHostAgainstLinuxTarget(t *testing.T) {
	guest.Require(t)
	const port = 4431
	tg := guest.NewTarget(t, guest.TargetOptions{NQN: "nqn.2026-11.io.ublk-nvmeof:nvmeof-interop", Port: port, PortID: 31})
	addr := "127.0.0.1:" + strconv.Itoa(port)
	ctx := testCtx(t)

	entries, err := nvmeof.Discover(ctx, addr, testHost)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, e := range entries {
		t.Logf("discovery entry: %s %s:%s subtype %d", e.SubNQN, e.TrAddr, e.TrSvcID, e.SubType)
		if e.SubNQN == tg.Opts.NQN && e.TrSvcID == strconv.Itoa(port) && e.TrType == nvme.NVMF_TRTYPE_TCP {
			found = true
		}
	}
	if !found {
		t.Fatalf("subsystem %s not in the discovery log", tg.Opts.NQN)
	}

	for _, dg := range []struct{ hd, dd bool }{{false, false}, {true, true}} {
		t.Run(fmt.Sprintf("hdgst=%v,ddgst=%v", dg.hd, dg.dd), func(t *testing.T) {
			c, err := nvmeof.Connect(ctx, nvmeof.ControllerConfig{Addr: addr, SubsysNQN: tg.Opts.NQN, Host: testHost,
				IOQueues: 2, QueueSize: 128, HeaderDigest: dg.hd, DataDigest: dg.dd})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			id := c.Identify()
			t.Logf("linux target: cntlid %d mn %q mdts %d ioccsz %d oncs %#x vwc %d ctratt %#x maxh2cdata %d",
				c.CNTLID(), id.MN, id.MDTS, id.IOCCSZ, id.ONCS, id.VWC, id.CTRATT, c.IOQueues()[0].MaxH2CData())
			nsids, err := c.ActiveNamespaces(ctx)
			if err != nil || len(nsids) == 0 || nsids[0] != uint32(tg.Opts.NSID) {
				t.Fatalf("active namespaces %v, %v", nsids, err)
			}
			ns, err := c.Namespace(ctx, uint32(tg.Opts.NSID))
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("namespace %+v", *ns)
			if err := c.KeepAlive(ctx); err != nil {
				t.Fatal(err)
			}
			for _, qd := range []int{1, 32, 127} {
				ioPattern(t, c, qd, 64)
			}
			q := c.IOQueues()[1]
			if ns.SupportsWriteZeroes() {
				if err := q.WriteZeroes(ctx, ns, 0, 16, false); err != nil {
					t.Fatal(err)
				}
				got := make([]byte, 16*ns.BlockSize())
				if err := q.Read(ctx, ns, 0, got); err != nil || !bytes.Equal(got, make([]byte, len(got))) {
					t.Fatalf("after write zeroes: %v", err)
				}
			}
			if ns.SupportsDeallocate() {
				if err := q.Deallocate(ctx, ns, []nvme.DSMRange{{SLBA: 64, NLB: 8}}); err != nil {
					t.Fatal(err)
				}
			}
			if err := c.ShutdownController(ctx); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestGuestLinuxHostAgainstTarget runs the Linux nvme-tcp initiator against
// the in-process target: the kernel connects, writes through the block
// device, and the data lands in the target's namespace; data put in the
// namespace reads back through the kernel.
func TestGuestLinuxHostAgainstTarget(t *testing.T) {
	guest.Require(t)
	for i, extra := range [][]string{nil, {"hdr_digest", "data_digest"}} {
		t.Run(fmt.Sprintf("opts=%v", extra), func(t *testing.T) {
			port := 4441 + i
			const size = 16 << 20
			tg := target.New(target.Config{})
			defer tg.Close()
			nqn := "nqn.2026-11.io.ublk-nvmeof:inprocess"
			sub, err := tg.AddSubsystem(nqn)
			if err != nil {
				t.Fatal(err)
			}
			mem := target.NewMemoryBackend(size)
			rng := rand.New(rand.NewPCG(9, uint64(i)))
			preset := make([]byte, 1<<20)
			for j := range preset {
				preset[j] = byte(rng.Uint32())
			}
			mem.WriteAt(preset, 4<<20)
			if err := sub.AddNamespace(target.NamespaceConfig{NSID: 1, Backend: mem, BlockShift: 9,
				NGUID: [16]byte{0x42, 1}}); err != nil {
				t.Fatal(err)
			}
			if _, err := tg.Listen("127.0.0.1:" + strconv.Itoa(port)); err != nil {
				t.Fatal(err)
			}
			kc, err := guest.ConnectKernel(&guest.Target{Opts: guest.TargetOptions{NQN: nqn, Addr: "127.0.0.1", Port: port, NSID: 1}}, extra...)
			if err != nil {
				t.Fatal(err)
			}
			disconnected := false
			defer func() {
				if !disconnected {
					kc.Disconnect()
				}
			}()
			dev := kc.NamespaceDevice(1)
			f, err := os.OpenFile(dev, os.O_RDWR|os.O_SYNC, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()

			// Kernel reads what the target holds.
			got := make([]byte, len(preset))
			if _, err := f.ReadAt(got, 4<<20); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, preset) {
				t.Fatal("kernel read different data than the namespace holds")
			}

			// Kernel writes land in the namespace, from several writers
			// at once (several queues, R2T and in-capsule sizes).
			var wg sync.WaitGroup
			chunks := make([][]byte, 16)
			for j := range chunks {
				chunks[j] = make([]byte, (j+1)*4096)
				for k := range chunks[j] {
					chunks[j][k] = byte(rng.Uint32())
				}
			}
			errs := make(chan error, len(chunks))
			for j, c := range chunks {
				wg.Add(1)
				go func() {
					defer wg.Done()
					_, err := f.WriteAt(c, int64(j)*(256<<10))
					errs <- err
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				if err != nil {
					t.Fatal(err)
				}
			}
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
			for j, c := range chunks {
				back := make([]byte, len(c))
				mem.ReadAt(back, int64(j)*(256<<10))
				if !bytes.Equal(back, c) {
					t.Fatalf("write %d did not reach the namespace", j)
				}
			}
			f.Close()
			if err := kc.Disconnect(); err != nil {
				t.Fatal(err)
			}
			disconnected = true
			// The kernel deletes its controller: the target's goes too.
			deadline := time.Now().Add(30 * time.Second)
			for len(tg.Controllers()) > 0 && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			if ids := tg.Controllers(); len(ids) > 0 {
				t.Fatalf("target controllers %v left after the kernel disconnected", ids)
			}
		})
	}
}

// TestGuestLinuxTargetHotRemove: the Linux target disables the namespace
// (I/O fails with a status, a namespace-changed event arrives), then
// removes the port under load (every command in flight fails with a path
// error, the failure is reported, teardown does not hang).
func TestGuestLinuxTargetHotRemove(t *testing.T) {
	guest.Require(t)
	const port = 4432
	tg := guest.NewTarget(t, guest.TargetOptions{NQN: "nqn.2026-11.io.ublk-nvmeof:nvmeof-hotremove", Port: port, PortID: 32})
	ctx := testCtx(t)
	f := newFailures()
	events := make(chan nvmeof.AsyncEvent, 10)
	c, err := nvmeof.Connect(ctx, nvmeof.ControllerConfig{Addr: "127.0.0.1:" + strconv.Itoa(port), SubsysNQN: tg.Opts.NQN,
		Host: testHost, OnFailure: f.record, OnEvent: func(e nvmeof.AsyncEvent) { events <- e }})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ns, err := c.Namespace(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	q := c.IOQueues()[0]

	if err := tg.SetNamespaceEnabled(false); err != nil {
		t.Fatal(err)
	}
	select {
	case e := <-events:
		t.Logf("event: %v", e)
		if e.Info != nvme.NVME_AER_NOTICE_NS_CHANGED {
			t.Fatalf("event %v", e)
		}
	case <-time.After(hangDeadline):
		t.Fatal("no namespace-changed event")
	}
	err = q.Read(ctx, ns, 0, make([]byte, 4096))
	var st nvme.Status
	if !errors.As(err, &st) {
		t.Fatalf("read from a disabled namespace: %v, want a status", err)
	}
	t.Logf("read from a disabled namespace: %v", err)
	if err := tg.SetNamespaceEnabled(true); err != nil {
		t.Fatal(err)
	}
	<-events

	// Reads in flight while the port goes away.
	var wg sync.WaitGroup
	stop := make(chan struct{})
	var pathErrs atomic.Int32
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 64<<10)
			for {
				select {
				case <-stop:
					return
				default:
				}
				err := q.Read(ctx, ns, uint64(i*128), buf)
				if err != nil {
					if !nvmeof.IsPathError(err) {
						t.Errorf("read: %v, want a path error", err)
					}
					pathErrs.Add(1)
					return
				}
			}
		}()
	}
	time.Sleep(200 * time.Millisecond)
	if err := tg.UnlinkPort(); err != nil {
		t.Fatal(err)
	}
	t.Logf("reported: %v", f.wait(t))
	// The admin queue's failure may be the one reported, before the I/O
	// queue's: stop the readers only once the I/O queue failed too, or
	// they may stop without having seen it.
	select {
	case <-q.Failed():
	case <-time.After(hangDeadline):
		t.Fatal("the I/O queue did not fail after the port went away")
	}
	close(stop)
	wg.Wait()
	if pathErrs.Load() == 0 {
		t.Fatal("no read saw the port go")
	}
	c.Shutdown()
	c.WaitIdle()
	if err := tg.LinkPort(); err != nil {
		t.Fatal(err)
	}
}

// TestGuestLinuxHostReconnects: the in-process target drops every
// connection; the Linux initiator reconnects (a new controller) and I/O
// through its block device carries on.
func TestGuestLinuxHostReconnects(t *testing.T) {
	guest.Require(t)
	const port = 4451
	tg := target.New(target.Config{})
	defer tg.Close()
	nqn := "nqn.2026-11.io.ublk-nvmeof:inprocess-reconnect"
	sub, err := tg.AddSubsystem(nqn)
	if err != nil {
		t.Fatal(err)
	}
	mem := target.NewMemoryBackend(8 << 20)
	if err := sub.AddNamespace(target.NamespaceConfig{NSID: 1, Backend: mem, BlockShift: 12}); err != nil {
		t.Fatal(err)
	}
	if _, err := tg.Listen("127.0.0.1:" + strconv.Itoa(port)); err != nil {
		t.Fatal(err)
	}
	kc, err := guest.ConnectKernel(&guest.Target{Opts: guest.TargetOptions{NQN: nqn, Addr: "127.0.0.1", Port: port, NSID: 1}},
		"reconnect_delay=1", "ctrl_loss_tmo=60")
	if err != nil {
		t.Fatal(err)
	}
	defer kc.Disconnect()
	f, err := os.OpenFile(kc.NamespaceDevice(1), os.O_RDWR|os.O_SYNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	first := tg.Controllers()
	block := bytes.Repeat([]byte{0x5a}, 4096)
	if _, err := f.WriteAt(block, 0); err != nil {
		t.Fatal(err)
	}
	tg.DropConnections()
	// This write is held by the kernel until it has reconnected.
	block2 := bytes.Repeat([]byte{0xa5}, 4096)
	if _, err := f.WriteAt(block2, 8192); err != nil {
		t.Fatalf("write across the reconnect: %v", err)
	}
	got := make([]byte, 4096)
	mem.ReadAt(got, 8192)
	if !bytes.Equal(got, block2) {
		t.Fatal("write after the reconnect did not reach the namespace")
	}
	now := tg.Controllers()
	t.Logf("controllers before %v, after %v", first, now)
	if len(now) != 1 || len(first) != 1 || now[0] == first[0] {
		t.Fatalf("controllers before %v, after %v: want a new one", first, now)
	}
}
