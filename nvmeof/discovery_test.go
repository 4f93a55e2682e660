package nvmeof_test

import (
	"fmt"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
)

func TestDiscover(t *testing.T) {
	tt := startTarget(t, target.Config{}, 9, 1<<20)
	if _, err := tt.AddSubsystem("nqn.2026-11.io.ublk-nvmeof:second"); err != nil {
		t.Fatal(err)
	}
	entries, err := nvmeof.Discover(testCtx(t), tt.addr, testHost)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 2 {
		t.Fatalf("%d entries, want 2: %+v", len(entries), entries)
	}
	host, port, _ := net.SplitHostPort(tt.addr)
	e := entries[1]
	if e.SubNQN != testNQN || e.TrAddr != host || e.TrSvcID != port || e.TrType != nvme.NVMF_TRTYPE_TCP ||
		e.AdrFam != nvme.NVMF_ADDR_FAMILY_IP4 || e.SubType != nvme.NVME_NQN_NVME {
		t.Fatalf("entry %+v", e)
	}
	if len(tt.Controllers()) != 0 {
		// Discover disconnects; the target deletes the controller when
		// the admin queue closes, which may take a moment.
		deadline := time.Now().Add(hangDeadline)
		for len(tt.Controllers()) != 0 && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// TestDiscoveryGenerationChange changes the log between the reads of one
// DiscoveryLog: the host must notice and read again.
func TestDiscoveryGenerationChange(t *testing.T) {
	tt := startTarget(t, target.Config{}, 9, 1<<20)
	c := connect(t, tt, nvmeof.ControllerConfig{SubsysNQN: nvme.NVME_DISC_SUBSYS_NAME, NoKeepAlive: true})
	bumps := 0
	tt.InjectFault(target.Fault{QID: 0, Match: target.MatchOpcode(nvme.NVME_ADMIN_GET_LOG_PAGE), Times: 3,
		Before: func() { bumps++; tt.BumpDiscoveryGeneration() }})
	entries, err := c.DiscoveryLog(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || bumps != 3 {
		t.Fatalf("%d entries after %d bumps", len(entries), bumps)
	}

	// A log that never settles is an error, not a loop.
	tt.InjectFault(target.Fault{QID: 0, Match: target.MatchOpcode(nvme.NVME_ADMIN_GET_LOG_PAGE), Before: tt.BumpDiscoveryGeneration})
	if _, err := c.DiscoveryLog(testCtx(t)); err != nvmeof.ErrDiscoveryLogChanging {
		t.Fatalf("ever-changing log: %v", err)
	}
}

func TestAsyncEvents(t *testing.T) {
	tt := startTarget(t, target.Config{}, 9, 1<<20)
	events := make(chan nvmeof.AsyncEvent, 10)
	c := connect(t, tt, nvmeof.ControllerConfig{OnEvent: func(e nvmeof.AsyncEvent) { events <- e }})
	_ = c
	wait := func() nvmeof.AsyncEvent {
		select {
		case e := <-events:
			return e
		case <-time.After(hangDeadline):
			t.Fatal("no asynchronous event")
		}
		return nvmeof.AsyncEvent{}
	}
	if err := tt.sub.AddNamespace(target.NamespaceConfig{NSID: 7, Backend: target.NewMemoryBackend(1 << 20)}); err != nil {
		t.Fatal(err)
	}
	e := wait()
	if e.Type != nvme.NVME_AER_TYPE_NOTICE || e.Info != nvme.NVME_AER_NOTICE_NS_CHANGED || len(e.ChangedNamespaces) != 1 || e.ChangedNamespaces[0] != 7 {
		t.Fatalf("event %v", e)
	}
	// The AER was resubmitted: a second change is reported too.
	tt.sub.RemoveNamespace(7)
	if e := wait(); e.Info != nvme.NVME_AER_NOTICE_NS_CHANGED || len(e.ChangedNamespaces) != 1 {
		t.Fatalf("event %v", e)
	}
	ids, err := c.ActiveNamespaces(testCtx(t))
	if err != nil || len(ids) != 1 {
		t.Fatalf("active namespaces %v, %v", ids, err)
	}

	// A discovery controller hears about discovery log changes.
	dc := connect(t, tt, nvmeof.ControllerConfig{SubsysNQN: nvme.NVME_DISC_SUBSYS_NAME, NoKeepAlive: true,
		OnEvent: func(e nvmeof.AsyncEvent) { events <- e }})
	_ = dc
	if _, err := tt.AddSubsystem("nqn.2026-11.io.ublk-nvmeof:third"); err != nil {
		t.Fatal(err)
	}
	if e := wait(); e.Info != nvme.NVME_AER_NOTICE_DISC_CHANGED || e.LogPage != nvme.NVME_LOG_DISC {
		t.Fatalf("event %v", e)
	}
}

func TestManyQueuesFileBackend(t *testing.T) {
	tg := target.New(target.Config{MaxIOQueues: 4})
	t.Cleanup(func() { tg.Close() })
	sub, err := tg.AddSubsystem(testNQN)
	if err != nil {
		t.Fatal(err)
	}
	fb, err := target.OpenFileBackend(t.TempDir()+"/ns1", 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fb.Close() })
	if err := sub.AddNamespace(target.NamespaceConfig{NSID: 1, Backend: fb, BlockShift: 12}); err != nil {
		t.Fatal(err)
	}
	addr, err := tg.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// Ask for more queues than the target grants.
	c := connect(t, &testTarget{Target: tg, addr: addr.String(), sub: sub}, nvmeof.ControllerConfig{IOQueues: 6, QueueSize: 32})
	if n := len(c.IOQueues()); n != 4 {
		t.Fatalf("%d I/O queues, want the 4 granted", n)
	}
	ctx := testCtx(t)
	ns, err := c.Namespace(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, len(c.IOQueues()))
	for i, q := range c.IOQueues() {
		go func() {
			buf := []byte(strconv.Itoa(i) + "-queue-data")
			blk := make([]byte, 4096)
			copy(blk, buf)
			if err := q.Write(ctx, ns, uint64(i), blk, true); err != nil {
				done <- err
				return
			}
			got := make([]byte, 4096)
			if err := q.Read(ctx, ns, uint64(i), got); err != nil {
				done <- err
				return
			}
			if string(got[:len(buf)]) != string(buf) {
				done <- fmt.Errorf("queue %d read back %q", i, got[:len(buf)])
				return
			}
			done <- nil
		}()
	}
	for range c.IOQueues() {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
}

// TestDiscoveryPaginated: a log larger than one transfer (MDTS 1: 8 KiB)
// is read in pieces and reassembled.
func TestDiscoveryPaginated(t *testing.T) {
	tt := startTarget(t, target.Config{MDTS: 1}, 9, 1<<20)
	for i := range 20 {
		if _, err := tt.AddSubsystem(fmt.Sprintf("nqn.2026-11.io.ublk-nvmeof:page%02d", i)); err != nil {
			t.Fatal(err)
		}
	}
	c := connect(t, tt, nvmeof.ControllerConfig{SubsysNQN: nvme.NVME_DISC_SUBSYS_NAME, NoKeepAlive: true})
	if c.MaxTransfer() != 8192 {
		t.Fatalf("max transfer %d, want 8192", c.MaxTransfer())
	}
	entries, err := c.DiscoveryLog(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 21 {
		t.Fatalf("%d entries, want 21", len(entries))
	}
	for i, e := range entries[:20] {
		if want := fmt.Sprintf("nqn.2026-11.io.ublk-nvmeof:page%02d", i); e.SubNQN != want {
			t.Fatalf("entry %d: %s, want %s", i, e.SubNQN, want)
		}
	}
}
