package main

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/attach"
	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/load"
)

// Secrets made with nvme-cli 2.3 gen-dhchap-key.
const (
	authKeyA    = "DHHC-1:01:bHuByyp0b3RFSx1xQPMVO1HKmUWfzveoahfydpW4fNgSLMVm:"
	authKeyB    = "DHHC-1:01:hu688yn1RDFCP9LNeEsWgy0Uqqe6cs1zhSjRdGMWD1TV8Hue:"
	authKeyCtrl = "DHHC-1:03:6Sk/KoEx2yBxvZz2+MVzAw15dsEOjogC/Dcj/9iyvG4qXaA0fd0gfgsqx9dEplu9B2192fQw9dYGrvAEY/4u+zR22jo=:"
	authKeyBad  = "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:"
	authHostID  = "8d1c6f0e-3b4a-4e59-a1d2-7c9e0f5b2a61"
	authHostNQN = "nqn.2014-08.org.nvmexpress:uuid:" + authHostID
)

// writeKey replaces path atomically with secret, as the README says to.
func writeKey(t *testing.T, path, secret string) {
	t.Helper()
	if err := os.WriteFile(path+".new", []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".new", path); err != nil {
		t.Fatal(err)
	}
}

func nvmetSet(t *testing.T, path, value string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(value), 0); err != nil {
		t.Fatalf("%s = %q: %v", path, value, err)
	}
}

// TestGuestAttachAuth: `attach` against Linux nvmet that requires
// DH-HMAC-CHAP. Wrong host secret, wrong controller secret and no secret
// exit 6 with one line and leave no device; with the right files a
// verified load runs, and goes on without an error across a reconnect
// after a secret was rotated on the target and in the file (the new
// association uses the new secret); a secret rotated on the target only ends the
// reconnects at the first failure (not at ctrl-loss-tmo) with a clear
// error and no device left.
func TestGuestAttachAuth(t *testing.T) {
	guest.Require(t)
	t.Setenv("UBLK_NVMEOF_RUN_DIR", t.TempDir())
	tg := guest.NewTarget(t, guest.TargetOptions{NQN: "nqn.2026-11.io.ublk-nvmeof:attach-auth", Device: "/dev/ram1", Port: 4481, PortID: 41})
	sub := filepath.Join("/sys/kernel/config/nvmet/subsystems", tg.Opts.NQN)
	host := filepath.Join("/sys/kernel/config/nvmet/hosts", authHostNQN)
	nvmetSet(t, filepath.Join(sub, "attr_allow_any_host"), "0")
	if err := os.Mkdir(host, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(host) })
	if err := os.Symlink(host, filepath.Join(sub, "allowed_hosts", authHostNQN)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(filepath.Join(sub, "allowed_hosts", authHostNQN)) })
	nvmetSet(t, filepath.Join(host, "dhchap_key"), authKeyA)
	nvmetSet(t, filepath.Join(host, "dhchap_ctrl_key"), authKeyCtrl)
	nvmetSet(t, filepath.Join(host, "dhchap_hash"), "hmac(sha384)")
	nvmetSet(t, filepath.Join(host, "dhchap_dhgroup"), "ffdhe3072")

	dir := t.TempDir()
	keyFile, ctrlFile, badFile := filepath.Join(dir, "host.key"), filepath.Join(dir, "ctrl.key"), filepath.Join(dir, "bad.key")
	writeKey(t, keyFile, authKeyA)
	writeKey(t, ctrlFile, authKeyCtrl)
	writeKey(t, badFile, authKeyBad)
	base := []string{"attach", "-a", "127.0.0.1", "-s", "4481", "-n", tg.Opts.NQN, "-q", authHostNQN, "-i", "1", "-c", "1", "-l", "20"}

	for _, c := range []struct {
		name string
		args []string
		msg  string
	}{
		{"wrong host secret", []string{"--dhchap-secret-file", badFile}, "rejected the host"},
		{"wrong controller secret", []string{"--dhchap-secret-file", keyFile, "--dhchap-ctrl-secret-file", badFile}, "controller failed bidirectional authentication"},
		{"no secret", nil, "requires in-band authentication"},
	} {
		start := time.Now()
		_, stderr, code := runCLI(t, append(base, c.args...)...)
		lines := strings.Split(strings.TrimSpace(stderr), "\n")
		last := lines[len(lines)-1]
		t.Logf("%s: exit %d after %v: %s", c.name, code, time.Since(start).Round(time.Millisecond), last)
		if code != exitRejected || !strings.HasPrefix(last, "ublk-nvmeof: ") || !strings.Contains(last, c.msg) {
			t.Errorf("%s: exit %d, stderr %q; want exit %d and a last line with %q", c.name, code, stderr, exitRejected, c.msg)
		}
		if devs := ublkDevices(t); len(devs) != 0 {
			t.Fatalf("%s: devices left: %v", c.name, devs)
		}
	}

	const blocks = 1024 // 4 MiB of the RAM disk, stamped by the load
	if err := load.Zero("/dev/ram1", 0, blocks, true); err != nil {
		t.Fatal(err)
	}
	d := startAttach(t, append(base[1:], "--dhchap-secret-file", keyFile, "--dhchap-ctrl-secret-file", ctrlFile)...)
	if err := guest.WaitFor(d.device, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	// The verified load runs across the reconnect below.
	l, err := load.Start(load.Config{Path: d.device, Blocks: blocks, RandomJobs: 2, SequentialJobs: 1,
		ReadPercent: 30, MaxIOBlocks: 8, Direct: true, Run: uint64(time.Now().UnixNano())})
	if err != nil {
		t.Fatal(err)
	}
	waitIO := func(after time.Time, n uint64) {
		t.Helper()
		mark := l.Completed()
		for deadline := time.Now().Add(90 * time.Second); l.Completed() < mark+n || !l.LastSuccess().After(after); {
			if time.Now().After(deadline) {
				t.Fatalf("no I/O completing (a hang): %v\n%s", l.Stats(), d.stderr)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	waitIO(time.Now(), 50)

	// Rotation on both sides, then a forced reconnect: the daemon reads
	// the file again and the new association authenticates with B (A is
	// refused by now, so I/O completing after it proves it). The load
	// sees no error: its I/O waits for the new association.
	nvmetSet(t, filepath.Join(host, "dhchap_key"), authKeyB)
	writeKey(t, keyFile, authKeyB)
	if err := tg.DeleteControllers(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(90 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		out, stderr, code := runCLI(t, "status", "--json", d.device)
		var st attach.Status
		if code != 0 || json.Unmarshal([]byte(out), &st) != nil {
			t.Fatalf("status: exit %d %s %s", code, out, stderr)
		}
		if st.Reconnects >= 1 && st.State == "LIVE" {
			t.Logf("reconnected: %d reconnect(s), %s", st.Reconnects, st.State)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no reconnect (a hang): %+v\n%s", st, d.stderr)
		}
	}
	waitIO(time.Now(), 50)
	st := l.Stop()
	t.Logf("load across the reconnect: %v", st)
	if st.WritesFailed+st.ReadsFailed+st.Mismatches != 0 || st.WritesAcked == 0 {
		n, errs := l.Errors()
		t.Fatalf("load %v; %d errors %v; mismatches %v", st, n, errs, l.Mismatches())
	}
	for _, path := range []string{d.device, "/dev/ram1"} {
		if _, err := l.Verify(path); err != nil {
			t.Fatalf("verify through %s: %v", path, err)
		}
	}

	// Rotation on the target only: the next reconnect fails
	// authentication, which ends the retries at once (not after
	// ctrl-loss-tmo) with a clear error, and the device goes away.
	nvmetSet(t, filepath.Join(host, "dhchap_key"), authKeyA)
	start := time.Now()
	if err := tg.DeleteControllers(); err != nil {
		t.Fatal(err)
	}
	code := d.wait(t)
	stderr := d.stderr.String()
	lines := strings.Split(strings.TrimSpace(stderr), "\n")
	last := lines[len(lines)-1]
	t.Logf("after a target-only rotation: exit %d after %v: %s", code, time.Since(start).Round(time.Millisecond), last)
	// "not retrying": lifecycle stopped on the DNR-like error, instead of
	// retrying until ctrl-loss-tmo.
	if code != exitLost || !strings.Contains(last, "rejected the host") || !strings.Contains(last, "not retrying") {
		t.Fatalf("exit %d, last line %q", code, last)
	}
	if devs := ublkDevices(t); len(devs) != 0 {
		t.Fatalf("devices left: %v", devs)
	}
}

// startServe runs `serve` with args and returns when it listens.
func startServe(t *testing.T, args ...string) {
	t.Helper()
	srv := exec.Command(os.Args[0], append([]string{"serve"}, args...)...)
	srv.Env = append(os.Environ(), envRunMain+"=1")
	var stderr lockedBuffer
	srv.Stderr = &stderr
	stdout, err := srv.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = srv.Process.Signal(syscall.SIGTERM)
		if err := srv.Wait(); err != nil {
			t.Errorf("serve: %v\n%s", err, stderr.String())
		}
	})
	if _, err := bufio.NewReader(stdout).ReadString('\n'); err != nil {
		t.Fatalf("serve did not start: %v\n%s", err, stderr.String())
	}
}

// TestGuestKernelInitiatorToServeAuth: the Linux kernel's nvme-tcp
// initiator (nvme connect -S ... -C ...) authenticates with `serve`, the
// in-process target's controller side, for several hashes and groups,
// uni- and bidirectionally; data written through /dev/nvmeXnY is in the
// exported file. A wrong host secret, or a controller secret serve does
// not hold, is refused by the kernel's connect.
func TestGuestKernelInitiatorToServeAuth(t *testing.T) {
	guest.Require(t)
	dir := t.TempDir()
	keyFile, ctrlFile := filepath.Join(dir, "host.key"), filepath.Join(dir, "ctrl.key")
	writeKey(t, keyFile, authKeyA)
	writeKey(t, ctrlFile, authKeyCtrl)
	for i, tc := range []struct {
		hash, group string
		bidi        bool
	}{
		{"sha256", "null", false},
		{"sha384", "ffdhe2048", true},
		{"sha512", "ffdhe4096", true},
	} {
		t.Run(tc.hash+"/"+tc.group, func(t *testing.T) {
			port := 4482 + i
			nqn := "nqn.2026-11.io.ublk-nvmeof:serve-auth"
			file := filepath.Join(dir, "ns"+tc.hash)
			startServe(t, "--listen", "127.0.0.1:"+strconv.Itoa(port), "--nqn", nqn, "--file", file, "--size", "8M",
				"--dhchap-secret-file", keyFile, "--dhchap-ctrl-secret-file", ctrlFile, "--dhchap-hash", tc.hash, "--dhchap-dhgroup", tc.group)
			tg := &guest.Target{Opts: guest.TargetOptions{NQN: nqn, Addr: "127.0.0.1", Port: port, NSID: 1}}
			opts := []string{"hostnqn=" + authHostNQN, "hostid=" + authHostID, "dhchap_secret=" + authKeyA}
			if tc.bidi {
				opts = append(opts, "dhchap_ctrl_secret="+authKeyCtrl)
			}
			kc, err := guest.ConnectKernel(tg, opts...)
			if err != nil {
				t.Fatal(err)
			}
			pattern := guest.AlignedBuf(t, 1<<20)
			if _, err := rand.Read(pattern); err != nil {
				t.Fatal(err)
			}
			guest.DirectIO(t, kc.NamespaceDevice(1), pattern, 1<<20, true)
			if err := kc.Disconnect(); err != nil {
				t.Fatal(err)
			}
			b, err := os.ReadFile(file)
			if err != nil || len(b) < 2<<20 || !bytes.Equal(b[1<<20:2<<20], pattern) {
				t.Fatalf("the exported file differs from what the kernel wrote (%v)", err)
			}

			for name, bad := range map[string][]string{
				"wrong host secret":       {"hostnqn=" + authHostNQN, "hostid=" + authHostID, "dhchap_secret=" + authKeyBad},
				"wrong controller secret": {"hostnqn=" + authHostNQN, "hostid=" + authHostID, "dhchap_secret=" + authKeyA, "dhchap_ctrl_secret=" + authKeyBad},
			} {
				if kc, err := guest.ConnectKernel(tg, bad...); err == nil {
					_ = kc.Disconnect()
					t.Fatalf("%s: the kernel connected", name)
				} else {
					t.Logf("%s: %v", name, err)
				}
			}
		})
	}
}
