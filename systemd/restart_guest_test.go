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
// flight to the end and leaves the device QUIESCED; without it (6.12) it
// exits at once and the driver reissues that I/O to the new daemon. Either
// way: a pause, not an error.
func TestGuestSystemdRestartHandoff(t *testing.T) {
	guest.Require(t)
	ctl, err := ublk.OpenControl()
	if err != nil {
		t.Fatal(err)
	}
	feats, err := ctl.Features()
	ctl.Close()
	if err != nil {
		t.Fatal(err)
	}
	tg := guest.NewTarget(t, guest.TargetOptions{NQN: "nqn.2026-11.io.ublk-nvmeof:restart", Device: "/dev/ram1", Port: 4439, PortID: 9})
	r := newUnitRig(t, tg, nil)
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
	want := "handing over by exiting" // 6.12
	if feats.Has(ublk.FeatureQuiesce) {
		want = "handed over: device quiesced for the next daemon"
	}
	if !strings.Contains(string(b), want) || !strings.Contains(string(b), "recovering the device a dead daemon left") {
		t.Fatalf("daemon log lacks %q or the recovery (kernel QUIESCE: %v)\n%s", want, feats.Has(ublk.FeatureQuiesce), r.logs())
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
