package auth

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
)

const (
	testHostNQN   = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001"
	testSubsysNQN = "nqn.2026-11.io.example:subsys-c"
)

func mustSecret(t testing.TB, s string) *Secret {
	t.Helper()
	k, err := ParseSecret(s)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// loopback carries the host's commands straight to a
// ControllerTransaction, as a queue would, and records the messages.
type loopback struct {
	c      *ControllerTransaction
	msgs   []string
	tamper func(step int, b []byte) []byte
}

func (l *loopback) Send(_ context.Context, msg []byte) error {
	l.msgs = append(l.msgs, fmt.Sprintf("send %#x/%#x", msg[0], msg[1]))
	l.c.Send(msg)
	return nil
}

func (l *loopback) Receive(_ context.Context, al int) ([]byte, error) {
	b, err := l.c.Receive(al)
	if err != nil {
		return nil, err
	}
	if l.tamper != nil {
		b = l.tamper(len(l.msgs), b)
	}
	l.msgs = append(l.msgs, fmt.Sprintf("recv %#x/%#x", b[0], b[1]))
	return b, nil
}

var (
	hostKey  = "DHHC-1:01:bHuByyp0b3RFSx1xQPMVO1HKmUWfzveoahfydpW4fNgSLMVm:"
	ctrlKey  = "DHHC-1:03:6Sk/KoEx2yBxvZz2+MVzAw15dsEOjogC/Dcj/9iyvG4qXaA0fd0gfgsqx9dEplu9B2192fQw9dYGrvAEY/4u+zR22jo=:"
	otherKey = "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:"
)

func TestHostControllerLoopback(t *testing.T) {
	groups := []DHGroupID{NVME_AUTH_DHGROUP_NULL, NVME_AUTH_DHGROUP_2048}
	if !testing.Short() {
		groups = AllDHGroups
	}
	for _, h := range AllHashes {
		for _, g := range groups {
			for _, bidi := range []bool{false, true} {
				t.Run(fmt.Sprintf("%v/%v/bidi=%v", h, g, bidi), func(t *testing.T) {
					cc := &ControllerConfig{HostNQN: testHostNQN, SubsysNQN: testSubsysNQN, HostSecret: mustSecret(t, hostKey), CtrlSecret: mustSecret(t, ctrlKey), Hash: h, DHGroup: g}
					hc := &HostConfig{HostNQN: testHostNQN, SubsysNQN: testSubsysNQN, Secret: mustSecret(t, hostKey)}
					if bidi {
						hc.CtrlSecret = mustSecret(t, ctrlKey)
					}
					l := &loopback{c: NewControllerTransaction(cc)}
					res, err := Authenticate(context.Background(), l, hc, 7)
					if err != nil {
						t.Fatalf("%v (%v)", err, l.msgs)
					}
					if res.Hash != h || res.DHGroup != g || res.Bidirectional != bidi || !l.c.Authenticated() || l.c.Failed() {
						t.Fatalf("%+v, controller authenticated %v failed %v", res, l.c.Authenticated(), l.c.Failed())
					}
					want := 4
					if bidi {
						want = 5
					}
					if len(l.msgs) != want {
						t.Fatalf("messages %v", l.msgs)
					}
				})
			}
		}
	}
}

func TestHostWrongSecrets(t *testing.T) {
	cc := func() *ControllerConfig {
		return &ControllerConfig{HostNQN: testHostNQN, SubsysNQN: testSubsysNQN, HostSecret: mustSecret(t, hostKey), CtrlSecret: mustSecret(t, ctrlKey), Hash: NVME_AUTH_HASH_SHA256, DHGroup: NVME_AUTH_DHGROUP_2048}
	}
	cases := []struct {
		name       string
		hc         *HostConfig
		ctrl       *ControllerConfig
		remote     bool
		ctrlFailed bool
	}{
		{"wrong host secret", &HostConfig{HostNQN: testHostNQN, SubsysNQN: testSubsysNQN, Secret: mustSecret(t, otherKey)}, cc(), true, true},
		{"host NQN differs", &HostConfig{HostNQN: testHostNQN + "x", SubsysNQN: testSubsysNQN, Secret: mustSecret(t, hostKey)}, cc(), true, true},
		{"wrong controller secret", &HostConfig{HostNQN: testHostNQN, SubsysNQN: testSubsysNQN, Secret: mustSecret(t, hostKey), CtrlSecret: mustSecret(t, otherKey)}, cc(), false, true},
		{"controller has no controller secret", &HostConfig{HostNQN: testHostNQN, SubsysNQN: testSubsysNQN, Secret: mustSecret(t, hostKey), CtrlSecret: mustSecret(t, ctrlKey)}, func() *ControllerConfig { c := cc(); c.CtrlSecret = nil; return c }(), true, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			l := &loopback{c: NewControllerTransaction(tc.ctrl)}
			_, err := Authenticate(context.Background(), l, tc.hc, 1)
			var ae *Error
			if !errors.As(err, &ae) || ae.Remote != tc.remote || !ae.DoNotRetry() {
				t.Fatalf("%v (%#v), want an *Error with Remote %v", err, ae, tc.remote)
			}
			if ae.Reason != NVME_AUTH_DHCHAP_FAILURE_FAILED || strings.Contains(err.Error(), "\n") {
				t.Errorf("error %q", err)
			}
			if l.c.Authenticated() || l.c.Failed() != tc.ctrlFailed {
				t.Errorf("controller authenticated %v failed %v", l.c.Authenticated(), l.c.Failed())
			}
		})
	}
}

// TestHostRejectsBadChallenges tampers with the controller's messages: the
// host must refuse each with an *Error and send AUTH_Failure2.
func TestHostRejectsBadChallenges(t *testing.T) {
	for name, tamper := range map[string]func([]byte) []byte{
		"transaction":  func(b []byte) []byte { b[4]++; return b },
		"hash length":  func(b []byte) []byte { b[6] = 64; return b },
		"unknown hash": func(b []byte) []byte { b[8] = 9; return b },
		"dhvlen":       func(b []byte) []byte { b[10]++; return b },
		"dh value 0":   func(b []byte) []byte { clear(b[16+32 : 16+32+256]); return b },
		"truncated":    func(b []byte) []byte { return b[:16+32+255] },
	} {
		t.Run(name, func(t *testing.T) {
			cc := &ControllerConfig{HostNQN: testHostNQN, SubsysNQN: testSubsysNQN, HostSecret: mustSecret(t, hostKey), Hash: NVME_AUTH_HASH_SHA256, DHGroup: NVME_AUTH_DHGROUP_2048}
			l := &loopback{c: NewControllerTransaction(cc), tamper: func(step int, b []byte) []byte {
				if step == 1 {
					return tamper(b)
				}
				return b
			}}
			_, err := Authenticate(context.Background(), l, &HostConfig{HostNQN: testHostNQN, SubsysNQN: testSubsysNQN, Secret: mustSecret(t, hostKey)}, 3)
			var ae *Error
			if !errors.As(err, &ae) || ae.Remote {
				t.Fatalf("%v", err)
			}
			if last := l.msgs[len(l.msgs)-1]; last != "send 0x0/0xf0" || !l.c.Failed() {
				t.Fatalf("messages %v, controller failed %v", l.msgs, l.c.Failed())
			}
		})
	}
}

// dropAfterReply is a transport whose connection breaks while the host
// waits for the answer to its DH-HMAC-CHAP_Reply, as Linux nvmet 6.12's
// may when it rejects the host.
type dropAfterReply struct {
	loopback
	err error
}

func (d *dropAfterReply) Receive(ctx context.Context, al int) ([]byte, error) {
	if len(d.msgs) >= 3 { // negotiate sent, challenge received, reply sent
		return nil, d.err
	}
	return d.loopback.Receive(ctx, al)
}

// TestHostSuccess1TransportError: a transport error after the Reply is a
// *ReplyUnansweredError (wrapping the transport's error) for the caller to
// judge; before the Reply it is passed on as it is.
func TestHostSuccess1TransportError(t *testing.T) {
	cc := &ControllerConfig{HostNQN: testHostNQN, SubsysNQN: testSubsysNQN, HostSecret: mustSecret(t, hostKey), Hash: NVME_AUTH_HASH_SHA256, DHGroup: NVME_AUTH_DHGROUP_NULL}
	hc := &HostConfig{HostNQN: testHostNQN, SubsysNQN: testSubsysNQN, Secret: mustSecret(t, otherKey)}
	broken := errors.New("connection reset")
	d := &dropAfterReply{loopback: loopback{c: NewControllerTransaction(cc)}, err: broken}
	_, err := Authenticate(context.Background(), d, hc, 1)
	var ru *ReplyUnansweredError
	if !errors.As(err, &ru) || !errors.Is(err, broken) {
		t.Fatalf("%v: want a *ReplyUnansweredError wrapping the transport's error", err)
	}
	var ae *Error
	if errors.As(err, &ae) {
		t.Fatalf("%v: the host alone cannot tell a rejection from a broken link", err)
	}
}
