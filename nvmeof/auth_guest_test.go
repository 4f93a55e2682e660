package nvmeof_test

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/auth"
)

// In-band authentication against Linux nvmet (CONFIG_NVME_TARGET_AUTH), in
// the e2e VM.

// Secrets made with nvme-cli 2.3 (nvme/auth/testdata).
const (
	guestHostSecret  = "DHHC-1:01:bHuByyp0b3RFSx1xQPMVO1HKmUWfzveoahfydpW4fNgSLMVm:"
	guestCtrlSecret  = "DHHC-1:03:6Sk/KoEx2yBxvZz2+MVzAw15dsEOjogC/Dcj/9iyvG4qXaA0fd0gfgsqx9dEplu9B2192fQw9dYGrvAEY/4u+zR22jo=:"
	guestOtherSecret = "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:"
)

// nvmetHost gives hostNQN DH-HMAC-CHAP settings on tg's subsystem
// (/sys/kernel/config/nvmet/hosts/<nqn>, linked into allowed_hosts) and
// removes them when t ends.
type nvmetHost struct {
	dir, link string
}

func newNvmetHost(t *testing.T, tg *guest.Target, hostNQN string) *nvmetHost {
	t.Helper()
	sub := filepath.Join("/sys/kernel/config/nvmet/subsystems", tg.Opts.NQN)
	h := &nvmetHost{dir: filepath.Join("/sys/kernel/config/nvmet/hosts", hostNQN), link: filepath.Join(sub, "allowed_hosts", hostNQN)}
	if err := os.WriteFile(filepath.Join(sub, "attr_allow_any_host"), []byte("0"), 0); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(h.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.Remove(h.dir); err != nil {
			t.Errorf("remove %s: %v", h.dir, err)
		}
	})
	if err := os.Symlink(h.dir, h.link); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.Remove(h.link); err != nil {
			t.Errorf("remove %s: %v", h.link, err)
		}
	})
	return h
}

func (h *nvmetHost) set(t *testing.T, attr, value string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(h.dir, attr), []byte(value), 0); err != nil {
		t.Fatalf("nvmet host %s = %q: %v", attr, value, err)
	}
}

// configure sets the host's secret, the controller's (empty: none), the
// hash and the DH group. A fresh host entry has no controller secret, and
// each case makes its own.
func (h *nvmetHost) configure(t *testing.T, hostKey, ctrlKey string, hash auth.HashID, group auth.DHGroupID) {
	h.set(t, "dhchap_key", hostKey)
	if ctrlKey != "" {
		h.set(t, "dhchap_ctrl_key", ctrlKey)
	}
	h.set(t, "dhchap_hash", hash.String())
	h.set(t, "dhchap_dhgroup", group.String())
}

// transcript is one queue's exchange with Linux nvmet, recorded for the
// known-answer test in nvmeof/auth (testdata/linux-nvmet-*.json).
type transcript struct {
	Kernel     string   `json:"kernel"`
	HostNQN    string   `json:"hostnqn"`
	SubsysNQN  string   `json:"subnqn"`
	HostSecret string   `json:"host_secret"`
	CtrlSecret string   `json:"ctrl_secret,omitempty"`
	Hash       string   `json:"hash"`
	DHGroup    string   `json:"dhgroup"`
	QID        uint16   `json:"qid"`
	Rand       string   `json:"rand"`
	Messages   []string `json:"messages"` // "send <hex>" / "recv <hex>", trailing zeros dropped
}

type recorder struct {
	mu  sync.Mutex
	buf *bytes.Buffer
}

func (r *recorder) Read(p []byte) (int, error) {
	n, err := rand.Read(p)
	r.mu.Lock()
	r.buf.Write(p[:n])
	r.mu.Unlock()
	return n, err
}

// recordTranscripts installs the hook that records each queue's exchange.
func recordTranscripts(t *testing.T, base transcript) *[]*transcript {
	var mu sync.Mutex
	var out []*transcript
	nvmeof.SetAuthTestHook(func(qid uint16, cfg *auth.HostConfig) {
		tr := base
		tr.QID = qid
		rb := &bytes.Buffer{}
		cfg.Rand = &recorder{buf: rb}
		cfg.Trace = func(sent bool, msg []byte) {
			dir := "recv"
			if sent {
				dir = "send"
			}
			mu.Lock()
			defer mu.Unlock()
			tr.Rand = hex.EncodeToString(rb.Bytes())
			tr.Messages = append(tr.Messages, dir+" "+hex.EncodeToString(bytes.TrimRight(msg, "\x00")))
		}
		mu.Lock()
		out = append(out, &tr)
		mu.Unlock()
	})
	t.Cleanup(func() { nvmeof.SetAuthTestHook(nil) })
	return &out
}

func kernelRelease() string {
	b, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return strings.TrimSpace(string(b))
}

// TestGuestAuthAgainstLinuxTarget attaches this host to Linux nvmet with
// DH-HMAC-CHAP for each hash and a spread of DH groups, unidirectional and
// bidirectional, with I/O verified on every queue; then a wrong host
// secret, a wrong controller secret and a missing secret fail clearly and
// are not retried. It prints the connect time with and without
// authentication and logs the transcripts (TRANSCRIPT lines) that
// nvmeof/auth's known-answer test replays.
func TestGuestAuthAgainstLinuxTarget(t *testing.T) {
	guest.Require(t)
	const port = 4480
	tg := guest.NewTarget(t, guest.TargetOptions{NQN: "nqn.2026-11.io.ublk-nvmeof:auth", Port: port, PortID: 40})
	addr := "127.0.0.1:" + strconv.Itoa(port)
	ctx := testCtx(t)

	connect := func(a *nvmeof.AuthConfig) (*nvmeof.Controller, time.Duration, error) {
		start := time.Now()
		c, err := nvmeof.Connect(ctx, nvmeof.ControllerConfig{Addr: addr, SubsysNQN: tg.Opts.NQN, Host: testHost, IOQueues: 2, QueueSize: 32, Auth: a})
		return c, time.Since(start), err
	}
	// Baseline: the same target without authentication (the second of
	// two connects, as the first warms the target up).
	var plain time.Duration
	for range 2 {
		c, took, err := connect(nil)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		plain = took
	}

	hostKey, ctrlKey := mustSecret(t, guestHostSecret), mustSecret(t, guestCtrlSecret)
	cases := []struct {
		hash  auth.HashID
		group auth.DHGroupID
		bidi  bool
	}{
		{auth.NVME_AUTH_HASH_SHA256, auth.NVME_AUTH_DHGROUP_NULL, false},
		{auth.NVME_AUTH_HASH_SHA256, auth.NVME_AUTH_DHGROUP_NULL, true},
		{auth.NVME_AUTH_HASH_SHA384, auth.NVME_AUTH_DHGROUP_2048, false},
		{auth.NVME_AUTH_HASH_SHA256, auth.NVME_AUTH_DHGROUP_2048, true},
		{auth.NVME_AUTH_HASH_SHA512, auth.NVME_AUTH_DHGROUP_3072, true},
		{auth.NVME_AUTH_HASH_SHA384, auth.NVME_AUTH_DHGROUP_4096, true},
		{auth.NVME_AUTH_HASH_SHA256, auth.NVME_AUTH_DHGROUP_6144, true},
		{auth.NVME_AUTH_HASH_SHA512, auth.NVME_AUTH_DHGROUP_8192, false},
		{auth.NVME_AUTH_HASH_SHA512, auth.NVME_AUTH_DHGROUP_8192, true},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("%v/%v/bidi=%v", tc.hash, tc.group, tc.bidi), func(t *testing.T) {
			a := nvmeof.StaticSecrets(hostKey, nil)
			base := transcript{Kernel: kernelRelease(), HostNQN: testHost.NQN, SubsysNQN: tg.Opts.NQN, HostSecret: guestHostSecret, Hash: tc.hash.String(), DHGroup: tc.group.String()}
			ck := ""
			if tc.bidi {
				a, ck = nvmeof.StaticSecrets(hostKey, ctrlKey), guestCtrlSecret
				base.CtrlSecret = guestCtrlSecret
			}
			newNvmetHost(t, tg, testHost.NQN).configure(t, guestHostSecret, ck, tc.hash, tc.group)
			trs := recordTranscripts(t, base)
			c, took, err := connect(a)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			t.Logf("connect with %v/%v bidi=%v: %v (without authentication: %v)", tc.hash, tc.group, tc.bidi, took.Round(time.Millisecond), plain.Round(time.Millisecond))
			ioPattern(t, c, 8, 16)
			ns, err := c.Namespace(ctx, 1)
			if err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, ns.BlockSize())
			if err := c.IOQueues()[1].Read(ctx, ns, 0, buf); err != nil {
				t.Fatalf("I/O on queue 2: %v", err)
			}
			// The admin queue always authenticates. An I/O queue does
			// when the target sets AUTHREQ.ATR in its Connect response
			// (nvmet 6.12 does for every queue, 7.3 only for the admin
			// queue) or, bidirectionally, because the host wants the
			// controller authenticated on every queue.
			got := len(*trs)
			t.Logf("%d of 3 queues authenticated", got)
			if got == 0 {
				t.Fatal("no queue authenticated")
			}
			if (*trs)[0].QID != 0 || got == 2 || tc.bidi && got != 3 {
				t.Fatalf("%d queues authenticated, the first qid %d", got, (*trs)[0].QID)
			}
			for _, tr := range *trs {
				want := 4
				if tc.bidi {
					want = 5
				}
				if len(tr.Messages) != want {
					t.Fatalf("queue %d: %d messages", tr.QID, len(tr.Messages))
				}
			}
			j, _ := json.Marshal((*trs)[0])
			t.Logf("TRANSCRIPT %s", j)
		})
	}

	failures := []struct {
		name             string
		hostKey, ctrlKey string // on the target
		a                *nvmeof.AuthConfig
		remote           bool
		wantInErr        string
	}{
		{"wrong host secret", guestHostSecret, "", nvmeof.StaticSecrets(mustSecret(t, guestOtherSecret), nil), true, "rejected the host"},
		{"wrong controller secret", guestHostSecret, guestCtrlSecret, nvmeof.StaticSecrets(hostKey, mustSecret(t, guestOtherSecret)), false, "wrong controller secret"},
		{"no secret", guestHostSecret, "", nil, false, "requires in-band authentication"},
	}
	for _, f := range failures {
		t.Run(f.name, func(t *testing.T) {
			newNvmetHost(t, tg, testHost.NQN).configure(t, f.hostKey, f.ctrlKey, auth.NVME_AUTH_HASH_SHA256, auth.NVME_AUTH_DHGROUP_2048)
			c, _, err := connect(f.a)
			if err == nil {
				c.Close()
				t.Fatal("connected")
			}
			t.Logf("error: %v", err)
			var d interface{ DoNotRetry() bool }
			if !errors.As(err, &d) || !d.DoNotRetry() {
				t.Fatalf("%v: not a do-not-retry error", err)
			}
			var ae *auth.Error
			if f.a != nil && (!errors.As(err, &ae) || ae.Remote != f.remote) {
				t.Fatalf("%v: want an *auth.Error with Remote %v", err, f.remote)
			}
			if !strings.Contains(err.Error(), f.wantInErr) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("error %q: want one line with %q", err, f.wantInErr)
			}
		})
	}
	// After all that, the right secret still works: the failures left
	// nothing behind on either side.
	newNvmetHost(t, tg, testHost.NQN).configure(t, guestHostSecret, guestCtrlSecret, auth.NVME_AUTH_HASH_SHA256, auth.NVME_AUTH_DHGROUP_NULL)
	c, _, err := connect(nvmeof.StaticSecrets(hostKey, ctrlKey))
	if err != nil {
		t.Fatal(err)
	}
	ioPattern(t, c, 4, 8)
	c.Close()
}

func mustSecret(t *testing.T, s string) *auth.Secret {
	t.Helper()
	k, err := auth.ParseSecret(s)
	if err != nil {
		t.Fatal(err)
	}
	return k
}
