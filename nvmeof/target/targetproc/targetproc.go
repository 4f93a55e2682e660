// Package targetproc runs the in-process target (package target) in a
// process of its own, a second run of the test binary, for tests that
// count allocations: testing.AllocsPerRun counts every goroutine of the
// process, and the target's allocations are not the host's.
//
// The test binary's TestMain calls ServeIfChild first; a test calls Start.
package targetproc

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
)

// childEnv names the subsystem and the namespace size the child serves:
// "<nqn> <bytes>".
const childEnv = "UBLK_NVMEOF_TARGETPROC"

// ServeIfChild serves, if this process is a child started by Start, one
// subsystem with a memory namespace (NSID 1, 512-byte blocks) on a
// loopback port: it prints the address and serves until its stdin
// closes, then returns the exit code and true. Otherwise it returns
// false at once.
func ServeIfChild() (int, bool) {
	spec, ok := os.LookupEnv(childEnv)
	if !ok {
		return 0, false
	}
	nqn, sizeText, _ := strings.Cut(spec, " ")
	size, err := strconv.ParseInt(sizeText, 10, 64)
	if err != nil {
		fmt.Fprintf(os.Stderr, "targetproc: %s=%q: %v\n", childEnv, spec, err)
		return 1, true
	}
	tg := target.New(target.Config{})
	defer tg.Close()
	sub, err := tg.AddSubsystem(nqn)
	if err == nil {
		err = sub.AddNamespace(target.NamespaceConfig{NSID: 1, Backend: target.NewMemoryBackend(size), BlockShift: 9})
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1, true
	}
	addr, err := tg.Listen("127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1, true
	}
	fmt.Printf("addr=%s\n", addr)
	io.Copy(io.Discard, os.Stdin)
	return 0, true
}

// Start runs the test binary again as the target process serving nqn with
// a namespace of size bytes, and returns its address. The test's cleanup
// closes its stdin and waits for it.
func Start(t testing.TB, nqn string, size int64) string {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s %d", childEnv, nqn, size))
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
