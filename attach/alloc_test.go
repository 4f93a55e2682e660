package attach

import (
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle/nvmeofconn"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target/targetproc"
	"github.com/ublk-nvmeof/ublk-nvmeof/ublk"
)

const allocNQN = "nqn.2026-11.io.ublk-nvmeof:alloc"

// blockBackend's Serve and Commit, and the completion back to the ublk
// request, allocate nothing per I/O in steady state (issue #14): 4 KiB
// reads and writes on the queues' goroutines (the host has no ublk ring
// here), without and with digests. The requests are made before counting.
func TestBlockBackendAllocsPerIO(t *testing.T) {
	addr := targetproc.Start(t, allocNQN, 1<<20) // AllocsPerRun counts the whole process: the target runs in its own
	for _, dg := range []bool{false, true} {
		connector := &nvmeofconn.Connector{
			Config: nvmeof.ControllerConfig{
				Addr: addr, SubsysNQN: allocNQN,
				Host:     nvmeof.HostIdentity{NQN: "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000003"},
				IOQueues: 1, QueueSize: 32, KATO: 5 * time.Second,
				HeaderDigest: dg, DataDigest: dg,
				Logger: quietLogger(),
			},
			NSID: 1,
		}
		lc := startLifecycle(t, connector, rigLifecycleOptions(quietLogger()))
		b := newBlockBackend(lc, nil, 1, 32)
		for _, op := range []ublk.Op{ublk.OpRead, ublk.OpWrite} {
			const runs = 500
			buf := make([]byte, 4096)
			res := make(chan int32, 1)
			done := func(v int32) { res <- v }
			reqs := make([]*ublk.Request, 0, 100+runs+1)
			for range cap(reqs) {
				reqs = append(reqs, ublk.NewDetachedRequest(0, 0, op, 0, 4096, len(buf), buf, done))
			}
			next := 0
			one := func() {
				b.Serve(reqs[next])
				next++
				b.Commit(0)
				if v := <-res; v != int32(len(buf)) {
					t.Fatalf("digests %v, %v: result %d, want %d", dg, op, v, len(buf))
				}
			}
			for range 100 {
				one()
			}
			if allocs := testing.AllocsPerRun(runs, one); allocs != 0 {
				t.Errorf("digests %v, %v: %v allocations per 4 KiB I/O, want 0", dg, op, allocs)
			}
		}
		lc.Delete()
		b.wg.Wait()
	}
}
