package nvmeof_test

import (
	"errors"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/auth"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
)

// authTarget is the in-process target requiring DH-HMAC-CHAP from
// testHost with the guest test's secrets.
func authTarget(t *testing.T, hash auth.HashID, group auth.DHGroupID) *testTarget {
	host, ctrl := mustSecret(t, guestHostSecret), mustSecret(t, guestCtrlSecret)
	return startTarget(t, target.Config{Auth: func(hostNQN, subsysNQN string) *auth.ControllerConfig {
		if hostNQN != testHost.NQN {
			return nil
		}
		return &auth.ControllerConfig{HostSecret: host, CtrlSecret: ctrl, Hash: hash, DHGroup: group}
	}}, 12, 4<<20)
}

// TestAuthInProcess: the host authenticates every queue with the
// in-process target's controller side, uni- and bidirectionally, at every
// connect, reading the secrets each time.
func TestAuthInProcess(t *testing.T) {
	for _, tc := range []struct {
		hash  auth.HashID
		group auth.DHGroupID
		bidi  bool
	}{
		{auth.NVME_AUTH_HASH_SHA256, auth.NVME_AUTH_DHGROUP_NULL, false},
		{auth.NVME_AUTH_HASH_SHA384, auth.NVME_AUTH_DHGROUP_2048, true},
		{auth.NVME_AUTH_HASH_SHA512, auth.NVME_AUTH_DHGROUP_NULL, true},
	} {
		t.Run(tc.hash.String()+"/"+tc.group.String(), func(t *testing.T) {
			tt := authTarget(t, tc.hash, tc.group)
			var calls atomic.Int32
			host, ctrl := mustSecret(t, guestHostSecret), mustSecret(t, guestCtrlSecret)
			if !tc.bidi {
				ctrl = nil
			}
			a := &nvmeof.AuthConfig{Secrets: func() (*auth.Secret, *auth.Secret, error) {
				calls.Add(1)
				return host, ctrl, nil
			}}
			for range 2 {
				c := connect(t, tt, nvmeof.ControllerConfig{IOQueues: 2, QueueSize: 32, Auth: a})
				ioPattern(t, c, 8, 16)
				c.Close()
			}
			if got := calls.Load(); got != 6 {
				t.Fatalf("secrets read %d times, want once per queue of each connect (6)", got)
			}
		})
	}
}

func TestAuthInProcessFailures(t *testing.T) {
	tt := authTarget(t, auth.NVME_AUTH_HASH_SHA256, auth.NVME_AUTH_DHGROUP_2048)
	other := mustSecret(t, guestOtherSecret)
	host, ctrl := mustSecret(t, guestHostSecret), mustSecret(t, guestCtrlSecret)
	for _, tc := range []struct {
		name   string
		a      *nvmeof.AuthConfig
		remote bool
		want   string
	}{
		{"wrong host secret", nvmeof.StaticSecrets(other, nil), true, "rejected the host"},
		{"wrong controller secret", nvmeof.StaticSecrets(host, other), false, "wrong controller secret"},
		{"no secret", nil, false, "requires in-band authentication"},
		{"unreadable secret", &nvmeof.AuthConfig{Secrets: func() (*auth.Secret, *auth.Secret, error) { return nil, nil, errors.New("key file gone") }}, false, "key file gone"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := testCtx(t)
			c, err := nvmeof.Connect(ctx, nvmeof.ControllerConfig{Addr: tt.addr, SubsysNQN: testNQN, Host: testHost, Auth: tc.a})
			if err == nil {
				c.Close()
				t.Fatal("connected")
			}
			var d interface{ DoNotRetry() bool }
			if !errors.As(err, &d) || !d.DoNotRetry() || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("%v: want a do-not-retry error with %q", err, tc.want)
			}
			var ae *auth.Error
			if tc.a != nil && tc.a.Secrets != nil && errors.As(err, &ae) && ae.Remote != tc.remote {
				t.Fatalf("%v: remote %v", err, ae.Remote)
			}
			if tc.a == nil && !errors.Is(err, nvmeof.ErrAuthRequired) {
				t.Fatalf("%v: not ErrAuthRequired", err)
			}
		})
	}
	// The same target still serves the right secrets.
	c := connect(t, tt, nvmeof.ControllerConfig{IOQueues: 1, Auth: nvmeof.StaticSecrets(host, ctrl)})
	ioPattern(t, c, 4, 8)
}

// TestAuthRequiredBeforeCommands: a queue that has not authenticated gets
// Authentication Required for anything but the transaction, as nvmet's
// nvmet_check_auth_status.
func TestAuthRequiredBeforeCommands(t *testing.T) {
	tt := authTarget(t, auth.NVME_AUTH_HASH_SHA256, auth.NVME_AUTH_DHGROUP_NULL)
	ctx := testCtx(t)
	q, err := nvmeof.DialQueue(ctx, tt.addr, nvmeof.QueueConfig{QID: 0, Size: 32})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	data := (&nvme.ConnectData{HostID: testHost.ID, CNTLID: nvme.NVME_CNTLID_DYNAMIC, SubsysNQN: testNQN, HostNQN: testHost.NQN}).Marshal()
	req := &nvmeof.Request{Data: data, Write: true}
	req.Cmd.SetConnect(nvme.Connect{QID: 0, SQSize: 31, KATO: 0})
	if err := q.Do(ctx, req); err != nil {
		t.Fatal(err)
	}
	if req.Result&nvme.NVME_CONNECT_AUTHREQ_ATR == 0 {
		t.Fatalf("Connect result %#x without AUTHREQ.ATR", req.Result)
	}
	get := &nvmeof.Request{}
	get.Cmd.SetPropertyGet(nvme.NVME_REG_CAP, true)
	err = q.Do(ctx, get)
	var st nvme.Status
	if !errors.As(err, &st) || st.Code() != nvme.NVME_SC_AUTH_REQUIRED {
		t.Fatalf("Property Get before authentication: %v, want Authentication Required", err)
	}
}
