package main

import (
	"context"
	"encoding/json"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/spdk"
)

// Interop with SPDK v24.01 on this machine (e2e/spdk; make spdk-test):
// `discover` against nvmf_tgt, and SPDK's host tools against `serve`.
// Without the SPDK build, and under -short, these skip.

// TestSPDKDiscoverCommand: `ublk-nvmeof discover` reads nvmf_tgt's
// discovery log, both subsystems with their ports, as JSON and as text,
// through either port; a port nothing listens on is a one-line error.
func TestSPDKDiscoverCommand(t *testing.T) {
	b := spdk.Require(t)
	tg := spdk.StartTarget(t, b, spdk.TargetOptions{})
	one := tg.Export(t, spdk.ExportConfig{NQN: "nqn.2016-06.io.spdk:discover-one", Discovery: true})
	two := tg.Export(t, spdk.ExportConfig{NQN: "nqn.2016-06.io.spdk:discover-two", Serial: "UBLKNVMEOFSPDK02"})

	out, errOut, code := runCLI(t, "discover", "-a", "127.0.0.1", "-s", strconv.Itoa(one.Port), "--json")
	var entries []struct{ SubNQN, TrAddr, TrSvcID string }
	if code != 0 || json.Unmarshal([]byte(out), &entries) != nil {
		t.Fatalf("discover: exit %d %q %s", code, out, errOut)
	}
	want := map[string]string{one.NQN: strconv.Itoa(one.Port), two.NQN: strconv.Itoa(two.Port)}
	for _, e := range entries {
		t.Logf("discovery entry: %s %s:%s", e.SubNQN, e.TrAddr, e.TrSvcID)
		if port, ok := want[e.SubNQN]; ok && e.TrSvcID == port && e.TrAddr == "127.0.0.1" {
			delete(want, e.SubNQN)
		}
	}
	if len(want) != 0 {
		t.Fatalf("the discovery log %+v lacks %v", entries, want)
	}
	out, _, code = runCLI(t, "discover", "-a", "127.0.0.1", "-s", strconv.Itoa(one.Port))
	if code != 0 || !strings.Contains(out, one.NQN) || !strings.Contains(out, two.NQN) {
		t.Fatalf("discover (text): exit %d %q", code, out)
	}

	// nvmf_tgt's discovery subsystem answers on every port it listens
	// on (allow_any_listener), two's too.
	out, errOut, code = runCLI(t, "discover", "-a", "127.0.0.1", "-s", strconv.Itoa(two.Port), "--json")
	if code != 0 || !strings.Contains(out, one.NQN) || !strings.Contains(out, two.NQN) {
		t.Fatalf("discover on the second port: exit %d %q %s", code, out, errOut)
	}

	// A port nothing listens on: one line, a failure status.
	free := spdk.Port(t)
	_, errOut, code = runCLI(t, "discover", "-a", "127.0.0.1", "-s", strconv.Itoa(free), "--timeout", "20s")
	if code == 0 || strings.Count(strings.TrimSpace(errOut), "\n") != 0 {
		t.Fatalf("discover on a port without a listener: exit %d %q", code, errOut)
	}
	t.Logf("without a listener: exit %d: %s", code, strings.TrimSpace(errOut))
}

// perfTotal matches spdk_nvme_perf's summary line:
// "Total : IOPS MiB/s average min max".
var perfTotal = regexp.MustCompile(`(?m)^\s*Total\s*:\s*([0-9.]+)\s+([0-9.]+)\s`)

// TestSPDKPerfAgainstServe: spdk_nvme_perf, SPDK's NVMe/TCP host, drives
// `serve` on several queues: 4 KiB random read/write and 128 KiB writes
// (R2T from serve), digests off and on. Every run must end without an I/O
// error, and serve must exit cleanly afterwards (no goroutine left).
func TestSPDKPerfAgainstServe(t *testing.T) {
	b := spdk.Require(t)
	const nqn = "nqn.2026-11.io.ublk-nvmeof:spdk-perf"
	cmd, line, stderr := startServeLoopback(t, nqn, "--size", "64M", "--block-size", "4096")
	f := strings.Fields(line)
	addr := f[len(f)-1]
	trid := spdk.TrID(t, addr, nqn)

	for _, run := range []struct {
		name string
		args []string
	}{
		{"4k-randrw-qd32-2queues", []string{"-q", "32", "-o", "4096", "-w", "randrw", "-M", "50", "-P", "2"}},
		{"4k-randrw-qd32-digests", []string{"-q", "32", "-o", "4096", "-w", "randrw", "-M", "50", "-H", "-I"}},
		{"128k-write-qd8", []string{"-q", "8", "-o", "131072", "-w", "write"}},
		{"128k-read-qd8-digests", []string{"-q", "8", "-o", "131072", "-w", "read", "-H", "-I"}},
	} {
		t.Run(run.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			args := append([]string{"-r", trid, "-t", "3", "--no-huge", "-s", "512", "-c", "0x1"}, run.args...)
			out, err := spdk.RunTool(ctx, b.NVMePerf, args...)
			if err != nil {
				t.Fatalf("spdk_nvme_perf %s: %v\n%s", strings.Join(args, " "), err, out)
			}
			m := perfTotal.FindStringSubmatch(out)
			if m == nil {
				t.Fatalf("spdk_nvme_perf printed no Total line:\n%s", out)
			}
			iops, _ := strconv.ParseFloat(m[1], 64)
			if iops <= 0 {
				t.Fatalf("spdk_nvme_perf: %s IOPS:\n%s", m[1], out)
			}
			for _, bad := range []string{"error", "failed"} {
				if strings.Contains(strings.ToLower(out), bad) {
					t.Fatalf("spdk_nvme_perf reported %q:\n%s", bad, out)
				}
			}
			t.Logf("spdk_nvme_perf %s: %s IOPS, %s MiB/s", run.name, m[1], m[2])
		})
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("serve after spdk_nvme_perf: %v\n%s", err, stderr.String())
	}
}

// TestSPDKIdentifyAndDiscoverAgainstServe: spdk_nvme_identify reads
// serve's controller and namespace, and its discovery log;
// spdk_nvme_discover prints the discovery log and waits for changes until
// signalled. Both need hugepages (they have no --no-huge).
func TestSPDKIdentifyAndDiscoverAgainstServe(t *testing.T) {
	b := spdk.Require(t)
	spdk.RequireHugepages(t, 256)
	// spdk_nvme_discover prints the log, then polls for changes until
	// signalled: its stdout to a pipe must be line-buffered to be seen.
	stdbuf, err := exec.LookPath("stdbuf")
	if err != nil {
		t.Skipf("spdk_nvme_discover's output needs stdbuf (coreutils) to be line-buffered: %v", err)
	}
	const nqn = "nqn.2026-11.io.ublk-nvmeof:spdk-identify"
	cmd, line, stderr := startServeLoopback(t, nqn, "--size", "16M", "--block-size", "4096")
	f := strings.Fields(line)
	addr := f[len(f)-1]
	_, port, _ := strings.Cut(addr, ":")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	out, err := spdk.RunTool(ctx, b.NVMeIdentify, "-r", spdk.TrID(t, addr, nqn), "-d", "128")
	if err != nil {
		t.Fatalf("spdk_nvme_identify: %v\n%s", err, out)
	}
	for _, want := range []string{
		"Subsystem NQN:                         " + nqn,
		"Model Number:",
		"Size (in LBAs):                        4096",
		"Current LBA Format:",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("spdk_nvme_identify's output lacks %q", want)
		}
	}
	if t.Failed() {
		t.Fatalf("spdk_nvme_identify:\n%s", out)
	}
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "Model Number:") || strings.HasPrefix(line, "Maximum Data Transfer Size:") ||
			strings.HasPrefix(line, "Size (in LBAs):") {
			t.Logf("spdk_nvme_identify: %s", strings.Join(strings.Fields(line), " "))
		}
	}

	out, err = spdk.RunTool(ctx, b.NVMeIdentify, "-r", spdk.TrID(t, addr, ""), "-d", "128")
	if err != nil || !strings.Contains(out, nqn) || !strings.Contains(out, "Discovery Log Page") {
		t.Fatalf("spdk_nvme_identify on the discovery subsystem: %v\n%s", err, out)
	}

	tool := spdk.StartTool(t, stdbuf, "-oL", b.NVMeDiscover, "-r", spdk.TrID(t, addr, ""))
	if !tool.WaitOutput(ctx, "NVM Subsystem Qualified Name:          "+nqn) {
		t.Fatalf("spdk_nvme_discover never printed %s:\n%s", nqn, tool.Output())
	}
	if !strings.Contains(tool.Output(), "Transport Service Identifier:          "+port) {
		t.Errorf("spdk_nvme_discover's entry lacks port %s:\n%s", port, tool.Output())
	}
	if err := tool.Stop(ctx, syscall.SIGTERM); err != nil {
		t.Fatalf("spdk_nvme_discover after SIGTERM: %v\n%s", err, tool.Output())
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("serve after SPDK's identify and discover: %v\n%s", err, stderr.String())
	}
}
