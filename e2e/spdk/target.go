package spdk

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TargetOptions are nvmf_tgt's command-line choices.
type TargetOptions struct {
	// CoreMask is the reactor mask (-m) ["0x1"]: each reactor polls its
	// core all the time.
	CoreMask string
	// MemoryMB is the memory nvmf_tgt takes without hugepages (-s)
	// [1024].
	MemoryMB int
}

// Target is one running nvmf_tgt: no hugepages (--no-huge), no PCI (-u),
// no core lock, its own RPC socket. StartTarget's cleanup stops it and waits for it.
type Target struct {
	Build     *Build
	RPCSocket string

	cmd    *exec.Cmd
	out    *lockedBuffer
	exited chan struct{} // closed once cmd.Wait returned
	err    error         // cmd.Wait's result, set before exited closes

	exports int // Export calls so far: the first creates the transport
}

// startTimeout bounds nvmf_tgt's start: DPDK's EAL, the reactors and
// subsystem initialisation, on a loaded 2-core machine.
const startTimeout = 60 * time.Second

// StartTarget runs nvmf_tgt and returns once its RPC server answers and
// the framework has initialised. The test's cleanup stops it (SIGTERM,
// then SIGKILL) and waits for it; its output is logged if the test
// failed.
func StartTarget(t testing.TB, b *Build, opts TargetOptions) *Target {
	t.Helper()
	if opts.CoreMask == "" {
		opts.CoreMask = "0x1"
	}
	if opts.MemoryMB == 0 {
		opts.MemoryMB = 1024
	}
	// A short directory of its own: a unix socket's path holds at most
	// 107 bytes, and t.TempDir's can be long.
	dir, err := os.MkdirTemp("", "spdk-tgt-")
	if err != nil {
		t.Fatal(err)
	}
	tg := &Target{
		Build:     b,
		RPCSocket: filepath.Join(dir, "rpc.sock"),
		out:       &lockedBuffer{},
		exited:    make(chan struct{}),
	}
	// --disable-cpumask-locks: other targets on this machine (other
	// tests, benchmarks) may poll the same core; the lock in /var/tmp
	// would refuse the second one.
	tg.cmd = exec.Command(b.NvmfTgt, "--no-huge", "-s", fmt.Sprint(opts.MemoryMB), "-u",
		"-m", opts.CoreMask, "-r", tg.RPCSocket, "--disable-cpumask-locks")
	tg.cmd.Stdout, tg.cmd.Stderr = tg.out, tg.out
	// Its own process group: the cleanup's signals reach nothing else.
	tg.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := tg.cmd.Start(); err != nil {
		_ = os.RemoveAll(dir)
		t.Fatalf("start nvmf_tgt: %v", err)
	}
	go func() {
		tg.err = tg.cmd.Wait()
		close(tg.exited)
	}()
	t.Cleanup(func() {
		if err := tg.Stop(); err != nil {
			t.Errorf("nvmf_tgt: %v", err)
		}
		if t.Failed() {
			t.Logf("nvmf_tgt output:\n%s", tg.Log())
		}
		_ = os.RemoveAll(dir)
	})
	if err := tg.waitReady(); err != nil {
		t.Fatalf("nvmf_tgt: %v\n%s", err, tg.Log())
	}
	return tg
}

// waitReady polls the RPC socket until framework_wait_init answers.
func (tg *Target) waitReady() error {
	deadline := time.Now().Add(startTimeout)
	for {
		_, err := tg.Call("framework_wait_init", nil)
		if err == nil {
			return nil
		}
		select {
		case <-tg.exited:
			return fmt.Errorf("exited before its RPC server answered: %v", tg.err)
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("RPC server not ready after %v: %v", startTimeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Stop stops nvmf_tgt (SIGTERM: it shuts every qpair down; SIGKILL after
// 20 s) and waits for it. It returns an error if nvmf_tgt had exited on
// its own with a failure or did not stop on SIGTERM; calling it again
// returns nil.
func (tg *Target) Stop() error {
	select {
	case <-tg.exited:
		return nil
	default:
	}
	_ = syscall.Kill(-tg.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-tg.exited:
		return nil
	case <-time.After(20 * time.Second):
		_ = syscall.Kill(-tg.cmd.Process.Pid, syscall.SIGKILL)
		<-tg.exited
		return errors.New("did not exit within 20 s of SIGTERM")
	}
}

// Kill kills nvmf_tgt (SIGKILL: a crash; the kernel resets its
// connections) and waits for it.
func (tg *Target) Kill() {
	_ = syscall.Kill(-tg.cmd.Process.Pid, syscall.SIGKILL)
	<-tg.exited
}

// Exited is closed once nvmf_tgt has exited.
func (tg *Target) Exited() <-chan struct{} { return tg.exited }

// Log is everything nvmf_tgt printed so far.
func (tg *Target) Log() string { return tg.out.String() }

// RPCError is a JSON-RPC error response.
type RPCError struct {
	Method  string
	Code    int
	Message string
}

func (e *RPCError) Error() string {
	return fmt.Sprintf("%s: JSON-RPC error %d: %s", e.Method, e.Code, e.Message)
}

// rpcTimeout bounds one JSON-RPC call.
const rpcTimeout = 30 * time.Second

// Call sends one JSON-RPC 2.0 request on the RPC socket and returns its
// result (what scripts/rpc.py does, without a Python start per call).
func (tg *Target) Call(method string, params any) (json.RawMessage, error) {
	conn, err := net.DialTimeout("unix", tg.RPCSocket, rpcTimeout)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(rpcTimeout))
	req := map[string]any{"jsonrpc": "2.0", "id": 1, "method": method}
	if params != nil {
		req["params"] = params
	}
	if err := json.NewEncoder(conn).Encode(req); err != nil {
		return nil, fmt.Errorf("%s: %w", method, err)
	}
	var resp struct {
		Result json.RawMessage `json:"result"`
		Error  *struct {
			Code    int    `json:"code"`
			Message string `json:"message"`
		} `json:"error"`
	}
	if err := json.NewDecoder(conn).Decode(&resp); err != nil {
		return nil, fmt.Errorf("%s: reading the response: %w", method, err)
	}
	if resp.Error != nil {
		return nil, &RPCError{Method: method, Code: resp.Error.Code, Message: resp.Error.Message}
	}
	return resp.Result, nil
}

// MustCall is Call failing the test on error.
func (tg *Target) MustCall(t testing.TB, method string, params any) json.RawMessage {
	t.Helper()
	res, err := tg.Call(method, params)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// RPCPy runs SPDK's scripts/rpc.py against this target with args (e.g.
// "nvmf_subsystem_remove_ns", nqn, "1") and returns its output.
func (tg *Target) RPCPy(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "python3", append([]string{tg.Build.RPCPy, "-s", tg.RPCSocket}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("rpc.py %s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

// lockedBuffer collects a process's output while tests read it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
