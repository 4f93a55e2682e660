package attach

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle/nvmeofconn"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
	"github.com/ublk-nvmeof/ublk-nvmeof/ublk"
)

// allocTargetEnv makes the test binary the target process of
// TestBlockBackendAllocsPerIO (TestMain): testing.AllocsPerRun counts
// every goroutine's allocations, and the target's are not the daemon's.
const allocTargetEnv = "ATTACH_TEST_ALLOC_TARGET"

const allocNQN = "nqn.2026-11.io.ublk-nvmeof:alloc"

// serveAllocTarget is the in-process target in a process of its own: it
// prints its address and serves until its stdin closes.
func serveAllocTarget() int {
	tg := target.New(target.Config{})
	defer tg.Close()
	sub, err := tg.AddSubsystem(allocNQN)
	if err == nil {
		err = sub.AddNamespace(target.NamespaceConfig{NSID: 1, Backend: target.NewMemoryBackend(1 << 20), BlockShift: 9})
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	addr, err := tg.Listen("127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Printf("addr=%s\n", addr)
	io.Copy(io.Discard, os.Stdin)
	return 0
}

// allocTargetProcess starts the target process and returns its address.
func allocTargetProcess(t *testing.T) string {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), allocTargetEnv+"=1")
	cmd.Stderr = io.Discard
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		if err := cmd.Wait(); err != nil {
			t.Errorf("target process: %v", err)
		}
	})
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if addr, ok := strings.CutPrefix(sc.Text(), "addr="); ok {
			go io.Copy(io.Discard, stdout) // until the process exits
			return addr
		}
	}
	t.Fatalf("the target process printed no address (%v)", sc.Err())
	return ""
}

// blockBackend's Serve and Commit, and the completion back to the ublk
// request, allocate nothing per I/O in steady state (issue #14): 4 KiB
// reads and writes on the queues' goroutines (the host has no ublk ring
// here), without and with digests. The requests are made before counting.
func TestBlockBackendAllocsPerIO(t *testing.T) {
	addr := allocTargetProcess(t)
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
