package auth

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
)

// Transport carries one queue's authentication messages: Send in an
// Authentication Send command, Receive in an Authentication Receive with
// allocation length al (NVMe over Fabrics, Fabrics command types 05h and
// 06h). An NVMe status is returned as an error.
type Transport interface {
	Send(ctx context.Context, msg []byte) error
	Receive(ctx context.Context, al int) ([]byte, error)
}

// HostConfig is what the host authenticates with.
type HostConfig struct {
	HostNQN, SubsysNQN string
	// Secret is the host's secret (nvme connect --dhchap-secret).
	Secret *Secret
	// CtrlSecret, when set, makes the authentication bidirectional: the
	// controller must prove it holds this secret (--dhchap-ctrl-secret).
	CtrlSecret *Secret
	// Hashes and DHGroups offered in AUTH_Negotiate; nil offers all, in
	// the Linux host's order.
	Hashes   []HashID
	DHGroups []DHGroupID
	// Rand is the source of challenges and DH keys; nil is crypto/rand.
	Rand io.Reader
	// Trace, when set, sees every message sent and received (tests record
	// transcripts with it). The messages hold no secret, but the session
	// key follows from them and Rand's output.
	Trace func(sent bool, msg []byte)
}

// AllHashes and AllDHGroups are what the Linux host offers.
var (
	AllHashes   = []HashID{NVME_AUTH_HASH_SHA256, NVME_AUTH_HASH_SHA384, NVME_AUTH_HASH_SHA512}
	AllDHGroups = []DHGroupID{NVME_AUTH_DHGROUP_NULL, NVME_AUTH_DHGROUP_2048, NVME_AUTH_DHGROUP_3072, NVME_AUTH_DHGROUP_4096, NVME_AUTH_DHGROUP_6144, NVME_AUTH_DHGROUP_8192}
)

// Result says what a successful transaction used.
type Result struct {
	Hash          HashID
	DHGroup       DHGroupID
	Bidirectional bool
}

// Error is a failed authentication: the controller rejected the host
// (Remote) or the host rejected the controller or its messages. Retrying
// with the same secrets cannot succeed, so DoNotRetry is true (lifecycle
// stops reconnecting on it).
type Error struct {
	Remote bool   // the controller sent AUTH_Failure1
	Reason Reason // rescode_exp
	Detail string
}

func (e *Error) Error() string {
	who := "host"
	if e.Remote {
		who = "controller"
	}
	if e.Detail != "" {
		return fmt.Sprintf("DH-HMAC-CHAP: %s: %s (%s)", who, e.Reason, e.Detail)
	}
	return fmt.Sprintf("DH-HMAC-CHAP: %s: %s", who, e.Reason)
}

// DoNotRetry reports true: an authentication failure is final.
func (e *Error) DoNotRetry() bool { return true }

// challengeAL is the allocation length for the challenge, as the Linux
// host's CHAP_BUF_SIZE: enough for SHA-512 with ffdhe8192 (16+64+1024).
const challengeAL = 4096

// success1AL covers DH-HMAC-CHAP_Success1 with the longest response.
const success1AL = success1Fixed + NVME_AUTH_MAX_DIGEST_SIZE

// Authenticate runs one DH-HMAC-CHAP transaction with identifier tid over
// t (Linux nvme_queue_auth_work): negotiate, challenge, reply, success1
// and, when bidirectional, success2. On a failure detected by the host
// after the challenge it sends AUTH_Failure2, as Linux does. The returned
// error is an *Error for an authentication failure, or the transport's
// error.
func Authenticate(ctx context.Context, t Transport, cfg *HostConfig, tid uint16) (*Result, error) {
	if cfg.Secret == nil {
		return nil, errors.New("DH-HMAC-CHAP: no host secret")
	}
	if cfg.Trace != nil {
		t = &tracer{t: t, trace: cfg.Trace}
	}
	x := &hostTransaction{cfg: cfg, t: t, tid: tid, rand: cfg.Rand}
	if x.rand == nil {
		x.rand = rand.Reader
	}
	return x.run(ctx)
}

type hostTransaction struct {
	cfg  *HostConfig
	t    Transport
	tid  uint16
	rand io.Reader

	ch      *Challenge
	sessKey []byte
	c2      []byte
	s2      uint32
}

func (x *hostTransaction) run(ctx context.Context) (*Result, error) {
	hashes, groups := x.cfg.Hashes, x.cfg.DHGroups
	if hashes == nil {
		hashes = AllHashes
	}
	if groups == nil {
		groups = AllDHGroups
	}
	neg := &Negotiate{TID: x.tid, SCC: NVME_AUTH_SECP_NOSC, Hashes: hashes, DHGroups: groups}
	if err := x.t.Send(ctx, neg.Marshal()); err != nil {
		return nil, fmt.Errorf("DH-HMAC-CHAP: send AUTH_Negotiate: %w", err)
	}
	b, err := x.receive(ctx, challengeAL, "DH-HMAC-CHAP_Challenge")
	if err != nil {
		return nil, err
	}
	reply, aerr := x.challenge(b, hashes, groups)
	if aerr != nil {
		return nil, x.fail2(ctx, aerr)
	}
	if err := x.t.Send(ctx, reply); err != nil {
		return nil, fmt.Errorf("DH-HMAC-CHAP: send DH-HMAC-CHAP_Reply: %w", err)
	}
	if b, err = x.receive(ctx, success1AL, "DH-HMAC-CHAP_Success1"); err != nil {
		var ae *Error
		if !errors.As(err, &ae) {
			err = &ReplyUnansweredError{Err: err}
		}
		return nil, err
	}
	if aerr := x.success1(b); aerr != nil {
		return nil, x.fail2(ctx, aerr)
	}
	if x.c2 != nil {
		if err := x.t.Send(ctx, MarshalSuccess2(x.tid)); err != nil {
			return nil, fmt.Errorf("DH-HMAC-CHAP: send DH-HMAC-CHAP_Success2: %w", err)
		}
	}
	return &Result{Hash: x.ch.Hash, DHGroup: x.ch.DHGroup, Bidirectional: x.c2 != nil}, nil
}

// ReplyUnansweredError: the Authentication Receive that was to bring
// DH-HMAC-CHAP_Success1 (or AUTH_Failure1) after the host's
// DH-HMAC-CHAP_Reply failed in the transport. Linux nvmet (6.12) declares
// the controller fatal as it rejects the host's response on the admin
// queue, which may close the connection before its AUTH_Failure1 goes out;
// the caller, which knows its transport, tells that apart from a timeout.
type ReplyUnansweredError struct{ Err error }

func (e *ReplyUnansweredError) Error() string {
	return fmt.Sprintf("DH-HMAC-CHAP: receive DH-HMAC-CHAP_Success1: %v", e.Err)
}
func (e *ReplyUnansweredError) Unwrap() error { return e.Err }

// receive issues Authentication Receive and turns AUTH_Failure1 into an
// *Error.
func (x *hostTransaction) receive(ctx context.Context, al int, want string) ([]byte, error) {
	b, err := x.t.Receive(ctx, al)
	if err != nil {
		return nil, fmt.Errorf("DH-HMAC-CHAP: receive %s: %w", want, err)
	}
	if h, err := ParseHeader(b); err == nil && h.AuthType == NVME_AUTH_COMMON_MESSAGES && h.AuthID == NVME_AUTH_DHCHAP_MESSAGE_FAILURE1 {
		f, _ := ParseFailure(b)
		e := &Error{Remote: true, Reason: f.Reason}
		if f.Reason == NVME_AUTH_DHCHAP_FAILURE_FAILED {
			e.Detail = "the controller rejected the host: wrong host secret, or a host NQN it has no secret for"
			if x.c2 != nil {
				e.Detail += ", or it has no controller secret for bidirectional authentication"
			}
		}
		return nil, e
	}
	return b, nil
}

// challenge checks the controller's challenge and builds the reply.
func (x *hostTransaction) challenge(b []byte, hashes []HashID, groups []DHGroupID) ([]byte, *Error) {
	ch, err := ParseChallenge(b)
	if err != nil {
		return nil, &Error{Reason: NVME_AUTH_DHCHAP_FAILURE_INCORRECT_PAYLOAD, Detail: err.Error()}
	}
	if ch.TID != x.tid {
		return nil, &Error{Reason: NVME_AUTH_DHCHAP_FAILURE_INCORRECT_MESSAGE, Detail: fmt.Sprintf("challenge for transaction %d, not %d", ch.TID, x.tid)}
	}
	if !slices.Contains(hashes, ch.Hash) {
		return nil, &Error{Reason: NVME_AUTH_DHCHAP_FAILURE_HASH_UNUSABLE, Detail: fmt.Sprintf("%v was not offered", ch.Hash)}
	}
	if !slices.Contains(groups, ch.DHGroup) {
		return nil, &Error{Reason: NVME_AUTH_DHCHAP_FAILURE_DHGROUP_UNUSABLE, Detail: fmt.Sprintf("%v was not offered", ch.DHGroup)}
	}
	x.ch = ch
	var pub []byte
	if ch.DHGroup != NVME_AUTH_DHGROUP_NULL {
		key, p, err := generateDHKey(x.rand, ch.DHGroup)
		if err != nil {
			return nil, &Error{Reason: NVME_AUTH_DHCHAP_FAILURE_FAILED, Detail: err.Error()}
		}
		if x.sessKey, err = key.sharedSecret(ch.DHValue); err != nil {
			return nil, &Error{Reason: NVME_AUTH_DHCHAP_FAILURE_DHGROUP_UNUSABLE, Detail: "controller's " + err.Error()}
		}
		pub = p
	}
	r := &Reply{TID: x.tid, DHValue: pub}
	r.R = HostResponse(ch.Hash, x.cfg.Secret, x.cfg.HostNQN, x.cfg.SubsysNQN, ch.C, x.sessKey, ch.Seq, x.tid)
	if x.cfg.CtrlSecret != nil {
		x.c2 = make([]byte, ch.Hash.Size())
		var s [4]byte
		if _, err := io.ReadFull(x.rand, x.c2); err != nil {
			return nil, &Error{Reason: NVME_AUTH_DHCHAP_FAILURE_FAILED, Detail: err.Error()}
		}
		if _, err := io.ReadFull(x.rand, s[:]); err != nil {
			return nil, &Error{Reason: NVME_AUTH_DHCHAP_FAILURE_FAILED, Detail: err.Error()}
		}
		// S2 0 means "no bidirectional authentication" (NVMe Base 2.2,
		// 8.3.4.5.4), so it is never 0 here.
		x.s2 = max(binary.LittleEndian.Uint32(s[:]), 1)
		r.C2, r.Seq = x.c2, x.s2
	}
	return r.Marshal(), nil
}

// success1 checks DH-HMAC-CHAP_Success1 and, when bidirectional, the
// controller's response.
func (x *hostTransaction) success1(b []byte) *Error {
	s, err := ParseSuccess1(b, x.ch.Hash.Size())
	if err != nil {
		return &Error{Reason: NVME_AUTH_DHCHAP_FAILURE_INCORRECT_PAYLOAD, Detail: err.Error()}
	}
	if s.TID != x.tid {
		return &Error{Reason: NVME_AUTH_DHCHAP_FAILURE_INCORRECT_MESSAGE, Detail: fmt.Sprintf("success1 for transaction %d, not %d", s.TID, x.tid)}
	}
	if x.c2 == nil {
		return nil
	}
	if s.R == nil {
		return &Error{Reason: NVME_AUTH_DHCHAP_FAILURE_FAILED, Detail: "controller sent no response to the host's challenge"}
	}
	want := ControllerResponse(x.ch.Hash, x.cfg.CtrlSecret, x.cfg.HostNQN, x.cfg.SubsysNQN, x.c2, x.sessKey, x.s2, x.tid)
	if !hmac.Equal(want, s.R) {
		return &Error{Reason: NVME_AUTH_DHCHAP_FAILURE_FAILED, Detail: "controller failed bidirectional authentication (wrong controller secret?)"}
	}
	return nil
}

// fail2 tells the controller why the host gave up (AUTH_Failure2) and
// returns aerr; a transport error on the way is secondary.
func (x *hostTransaction) fail2(ctx context.Context, aerr *Error) error {
	f := &Failure{AuthID: NVME_AUTH_DHCHAP_MESSAGE_FAILURE2, TID: x.tid, Code: NVME_AUTH_DHCHAP_FAILURE_REASON_FAILED, Reason: aerr.Reason}
	_ = x.t.Send(ctx, f.Marshal())
	return aerr
}

type tracer struct {
	t     Transport
	trace func(bool, []byte)
}

func (t *tracer) Send(ctx context.Context, msg []byte) error {
	t.trace(true, msg)
	return t.t.Send(ctx, msg)
}

func (t *tracer) Receive(ctx context.Context, al int) ([]byte, error) {
	b, err := t.t.Receive(ctx, al)
	if err == nil {
		t.trace(false, b)
	}
	return b, err
}
