package nvmeof_test

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
)

// allocTargetEnv makes the test binary the target process of
// TestDrivenAllocsPerIO (TestMain): testing.AllocsPerRun counts every
// goroutine's allocations, and the target's are not the host's.
const allocTargetEnv = "NVMEOF_TEST_ALLOC_TARGET"

// serveAllocTarget is the in-process target in a process of its own: it
// prints its address and serves until its stdin closes.
func serveAllocTarget() int {
	tg := target.New(target.Config{})
	defer tg.Close()
	sub, err := tg.AddSubsystem(testNQN)
	if err == nil {
		err = sub.AddNamespace(target.NamespaceConfig{NSID: 1, Backend: target.NewMemoryBackend(8 << 20), BlockShift: 9})
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

// targetProcess starts the target process and returns its address.
func targetProcess(t *testing.T) *testTarget {
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
			return &testTarget{addr: addr}
		}
	}
	t.Fatalf("the target process printed no address (%v)", sc.Err())
	return nil
}

// The driven fast path allocates nothing per I/O in steady state (issue
// #14): a 4 KiB read or write deferred and pushed on the Driver's thread,
// as ublk's Serve does, and its completion, with and without digests.
// testing.AllocsPerRun counts every goroutine's allocations, the poll
// driver's too; the target runs in a process of its own.
func TestDrivenAllocsPerIO(t *testing.T) {
	tt := targetProcess(t)
	for _, dg := range []bool{false, true} {
		_, ns, q, d := drivenQueue(t, tt, nvmeof.ControllerConfig{HeaderDigest: dg, DataDigest: dg})
		for _, write := range []bool{false, true} {
			var r nvmeof.Request
			buf := make([]byte, 4096)
			done := make(chan error, 1)
			complete := func(err error) { done <- err }
			submit := func() {
				if err := q.Submit(&r, complete); err != nil {
					done <- err
					return
				}
				q.Push()
			}
			var prepErr error
			one := func() {
				if write {
					prepErr = ns.PrepareWrite(&r, 8, buf, false)
				} else {
					prepErr = ns.PrepareRead(&r, 8, buf)
				}
				r.Defer = true
				if err := d.Post(submit); err != nil {
					t.Fatal(err)
				}
				if err := <-done; err != nil {
					t.Fatalf("digests %v, write %v: %v", dg, write, err)
				}
			}
			for range 100 { // steady state: buffers grown, pools filled
				one()
			}
			allocs := testing.AllocsPerRun(1000, one)
			if prepErr != nil {
				t.Fatal(prepErr)
			}
			if allocs != 0 {
				t.Errorf("digests %v, write %v: %v allocations per 4 KiB I/O, want 0", dg, write, allocs)
			}
		}
	}
}
