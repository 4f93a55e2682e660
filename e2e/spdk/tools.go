package spdk

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TrID is the transport ID string SPDK's host tools take with -r for an
// NVMe/TCP subsystem at addr ("host:port"); nqn "" leaves subnqn out (the
// tools then use the discovery NQN).
func TrID(t testing.TB, addr, nqn string) string {
	t.Helper()
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("transport ID for %q: %v", addr, err)
	}
	s := fmt.Sprintf("trtype:TCP adrfam:IPv4 traddr:%s trsvcid:%s", host, port)
	if nqn != "" {
		s += " subnqn:" + nqn
	}
	return s
}

// RunTool runs one of the build's host tools to completion and returns
// its output (stdout and stderr together); err is non-nil if it could not
// run or exited with a failure. The process runs in a group of its own,
// killed whole when ctx ends, and is always waited for.
func RunTool(ctx context.Context, path string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, path, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	err := cmd.Run()
	return out.String(), err
}

// RequireHugepages skips the test unless mb MiB of hugepages are free on a
// mounted hugetlbfs: spdk_nvme_identify and spdk_nvme_discover have no
// --no-huge option (nvmf_tgt and spdk_nvme_perf do).
func RequireHugepages(t testing.TB, mb int) {
	t.Helper()
	free, err := freeHugepagesMB()
	if err != nil {
		t.Skipf("SPDK interop: hugepages: %v", err)
	}
	if free < mb {
		t.Skipf("SPDK interop: spdk_nvme_identify and spdk_nvme_discover need %d MiB of hugepages, %d MiB free "+
			"(e.g. echo 512 > /proc/sys/vm/nr_hugepages; mount -t hugetlbfs nodev /dev/hugepages)", mb, free)
	}
	if !hugetlbfsMounted() {
		t.Skipf("SPDK interop: no hugetlbfs mounted (mount -t hugetlbfs nodev /dev/hugepages)")
	}
}

// freeHugepagesMB is HugePages_Free times Hugepagesize from /proc/meminfo.
func freeHugepagesMB() (int, error) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var pages, sizeKB int
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 {
			continue
		}
		switch fields[0] {
		case "HugePages_Free:":
			pages, _ = strconv.Atoi(fields[1])
		case "Hugepagesize:":
			sizeKB, _ = strconv.Atoi(fields[1])
		}
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return pages * sizeKB / 1024, nil
}

func hugetlbfsMounted() bool {
	b, err := os.ReadFile("/proc/mounts")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 3 && f[2] == "hugetlbfs" {
			return true
		}
	}
	return false
}

// Tool is a host tool running in the background (spdk_nvme_discover waits
// for discovery log changes until it is signalled).
type Tool struct {
	cmd    *exec.Cmd
	out    *lockedBuffer
	exited chan struct{}
	err    error // cmd.Wait's, set before exited closes
}

// StartTool starts a host tool; the test's cleanup kills it if it still
// runs, and waits for it.
func StartTool(t testing.TB, path string, args ...string) *Tool {
	t.Helper()
	tl := &Tool{cmd: exec.Command(path, args...), out: &lockedBuffer{}, exited: make(chan struct{})}
	tl.cmd.Stdout, tl.cmd.Stderr = tl.out, tl.out
	tl.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := tl.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", path, err)
	}
	go func() {
		tl.err = tl.cmd.Wait()
		close(tl.exited)
	}()
	t.Cleanup(func() {
		_ = syscall.Kill(-tl.cmd.Process.Pid, syscall.SIGKILL)
		<-tl.exited
	})
	return tl
}

// Output is what the tool printed so far.
func (tl *Tool) Output() string { return tl.out.String() }

// WaitOutput waits until the output contains s, the tool exits, or ctx
// ends; it reports whether s was printed.
func (tl *Tool) WaitOutput(ctx context.Context, s string) bool {
	for {
		if strings.Contains(tl.Output(), s) {
			return true
		}
		select {
		case <-tl.exited:
			return strings.Contains(tl.Output(), s)
		case <-ctx.Done():
			return false
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Stop sends sig to the tool's process group and returns its exit
// (cmd.Wait's error) once it exited, or ctx's error.
func (tl *Tool) Stop(ctx context.Context, sig syscall.Signal) error {
	_ = syscall.Kill(-tl.cmd.Process.Pid, sig)
	select {
	case <-tl.exited:
		return tl.err
	case <-ctx.Done():
		return ctx.Err()
	}
}
