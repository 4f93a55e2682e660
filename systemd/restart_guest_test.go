package systemd

import (
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/load"
	"github.com/ublk-nvmeof/ublk-nvmeof/ublk"
)

// TestGuestSystemdRestartHandoff: `systemctl restart` of the unit under a
// verified load (e2e/load): the old daemon gets SIGUSR2 (RestartKillSignal)
// and hands the device over instead of deleting it, the new one takes it
// over (attach --recover); the load sees no error and everything it wrote
// reads back. With ublk QUIESCE (7.3) the old daemon serves the I/O in
// flight to the end and leaves the device QUIESCED; without it (6.12), and
// on a BATCH_IO device (attach's default on 7.3), it exits at once and the
// driver reissues that I/O to the new daemon. Either way: a pause, not an
// error.
func TestGuestSystemdRestartHandoff(t *testing.T) {
	guest.Require(t)
	feats := kernelFeatures(t)
	quiesced := feats.Has(ublk.FeatureQuiesce) && !feats.Has(ublk.FeatureBatchIO)
	restartHandoff(t, nil, quiesced)
}

// TestGuestSystemdRestartHandoffQuiesced: the same with --batch-io off
// where the kernel has BATCH_IO, so that the hand-over by QUIESCE_DEV is
// proven on the kernel whose default no longer takes it.
func TestGuestSystemdRestartHandoffQuiesced(t *testing.T) {
	guest.Require(t)
	if feats := kernelFeatures(t); !feats.Has(ublk.FeatureQuiesce) || !feats.Has(ublk.FeatureBatchIO) {
		t.Skipf("kernel features %v: without BATCH_IO TestGuestSystemdRestartHandoff hands over by QUIESCE where there is QUIESCE", feats)
	}
	restartHandoff(t, map[string]string{
		"batch.conf": "[Service]\nEnvironment=UBLK_NVMEOF_BATCH_IO=off\n",
	}, true)
}

func kernelFeatures(t *testing.T) ublk.Features {
	ctl, err := ublk.OpenControl()
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close()
	feats, err := ctl.Features()
	if err != nil {
		t.Fatal(err)
	}
	return feats
}

// restartHandoff restarts the unit (with dropIns) under load; quiesced:
// the old daemon must have handed over by QUIESCE_DEV, else by exiting.
func restartHandoff(t *testing.T, dropIns map[string]string, quiesced bool) {
	tg := guest.NewTarget(t, guest.TargetOptions{NQN: "nqn.2026-11.io.ublk-nvmeof:restart", Device: "/dev/ram1", Port: 4439, PortID: 9})
	r := newUnitRig(t, tg, dropIns)
	device, firstPID := r.start()

	const blocks = 4096 // 16 MiB
	if err := load.Zero(device, 0, blocks, true); err != nil {
		t.Fatal(err)
	}
	l, err := load.Start(load.Config{Path: device, Blocks: blocks, RandomJobs: 2, SequentialJobs: 1,
		ReadPercent: 30, MaxIOBlocks: 8, Direct: true, Run: 4242})
	if err != nil {
		t.Fatal(err)
	}
	stopped := false
	defer func() {
		if !stopped {
			l.Stop()
		}
	}()
	waitProgress(t, l, 100, "before the restart")

	// Type=notify: restart returns once the new daemon sent READY=1.
	if out, err := r.m.systemctl(t, "restart", rigService); err != nil {
		t.Fatalf("restart: %v\n%s\n%s", err, out, r.logs())
	}
	p := r.show()
	if pid, _ := strconv.Atoi(p["MainPID"]); p["ActiveState"] != "active" || pid == firstPID || !strings.HasPrefix(p["StatusText"], "serving "+device+",") {
		t.Fatalf("after restart: %v, want %s served by a new daemon\n%s", p, device, r.logs())
	}
	waitProgress(t, l, 100, "after the restart")
	st := l.Stop()
	stopped = true
	n, errs := l.Errors()
	t.Logf("load: %v", st)
	if n != 0 || st.Mismatches != 0 {
		t.Fatalf("the application saw %d I/O errors and %d bad blocks across the restart: %v %v\n%s", n, st.Mismatches, errs, l.Mismatches(), r.logs())
	}
	rep, err := l.Verify(device)
	if err != nil {
		t.Fatalf("verify after the restart: %v", err)
	}
	t.Logf("verify: %v", rep)

	b, _ := os.ReadFile(r.daemonLog)
	want := "handing over by exiting"
	if quiesced {
		want = "handed over: device quiesced for the next daemon"
	}
	if !strings.Contains(string(b), want) || !strings.Contains(string(b), "recovering the device a dead daemon left") {
		t.Fatalf("daemon log lacks %q or the recovery\n%s", want, r.logs())
	}
	r.stop(device)
}

// waitProgress waits until the load completed n more I/Os.
func waitProgress(t *testing.T, l *load.Load, n uint64, when string) {
	t.Helper()
	target := l.Completed() + n
	deadline := time.Now().Add(2 * time.Minute)
	for l.Completed() < target {
		if time.Now().After(deadline) {
			t.Fatalf("the load made no progress %s: %v", when, l.Stats())
		}
		time.Sleep(10 * time.Millisecond)
	}
}
