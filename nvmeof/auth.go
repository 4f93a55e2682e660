package nvmeof

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/auth"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// This file is in-band authentication on the host's queues
// (drivers/nvme/host/auth.c, fabrics.c): after Fabrics Connect, when the
// controller asks for it, each queue runs a DH-HMAC-CHAP transaction over
// Authentication Send and Receive before any other command.

// AuthConfig holds the DH-HMAC-CHAP secrets of nvme connect's
// --dhchap-secret and --dhchap-ctrl-secret.
type AuthConfig struct {
	// Secrets returns the host's secret and, for bidirectional
	// authentication, the controller's (nil for unidirectional). It is
	// called at every association, reconnects included, so a secret kept
	// in a file can be rotated between them.
	Secrets func() (host, ctrl *auth.Secret, err error)
}

// StaticSecrets is an AuthConfig with fixed secrets.
func StaticSecrets(host, ctrl *auth.Secret) *AuthConfig {
	return &AuthConfig{Secrets: func() (*auth.Secret, *auth.Secret, error) { return host, ctrl, nil }}
}

// authTestHook, set only by tests (export_test.go), sees each queue's
// configuration before its transaction: transcripts are recorded with it.
var authTestHook func(qid uint16, cfg *auth.HostConfig)

// authTransaction numbers transactions (the Linux host's
// ctrl->transaction; any value is allowed, the controller echoes it).
var authTransaction atomic.Uint32

// ErrAuthRequired is wrapped by the error returned when the controller
// requires authentication and no secret was given; it is not retried.
var ErrAuthRequired = errors.New("requires in-band authentication (DH-HMAC-CHAP) and no host secret was given")

type authRequiredError struct{ subsys string }

func (e *authRequiredError) Error() string {
	return fmt.Sprintf("nvmeof: %s %v", e.subsys, ErrAuthRequired)
}
func (e *authRequiredError) Unwrap() error    { return ErrAuthRequired }
func (e *authRequiredError) DoNotRetry() bool { return true }

// authenticateQueue runs after a successful Connect whose response dword 0
// was result. It authenticates q when the controller requires it (ATR), or
// when the caller wants the controller authenticated (a controller secret)
// even though the controller does not ask. An authentication failure is
// returned as an error with DoNotRetry() true.
func authenticateQueue(ctx context.Context, q *Queue, a *AuthConfig, host HostIdentity, subsysNQN string, result uint32, timeout time.Duration) error {
	if result&nvme.NVME_CONNECT_AUTHREQ_ASCR != 0 {
		return &auth.Error{Remote: true, Reason: auth.NVME_AUTH_DHCHAP_FAILURE_CONCAT_MISMATCH, Detail: fmt.Sprintf("queue %d: the controller requires a secure channel (ASCR), which is not supported", q.QID())}
	}
	required := result&nvme.NVME_CONNECT_AUTHREQ_ATR != 0
	if a == nil || a.Secrets == nil {
		if required {
			return &authRequiredError{subsys: subsysNQN}
		}
		return nil
	}
	hs, cs, err := a.Secrets()
	if err != nil {
		return &auth.Error{Reason: auth.NVME_AUTH_DHCHAP_FAILURE_FAILED, Detail: err.Error()}
	}
	if !required && cs == nil {
		return nil
	}
	if hs == nil {
		return &authRequiredError{subsys: subsysNQN}
	}
	cfg := &auth.HostConfig{HostNQN: host.NQN, SubsysNQN: subsysNQN, Secret: hs, CtrlSecret: cs}
	if authTestHook != nil {
		authTestHook(q.QID(), cfg)
	}
	tid := uint16(authTransaction.Add(1))
	res, err := auth.Authenticate(ctx, &queueAuthTransport{q: q, timeout: timeout}, cfg, tid)
	if err != nil {
		if closedAfterReply(err) {
			err = &auth.Error{Remote: true, Reason: auth.NVME_AUTH_DHCHAP_FAILURE_FAILED,
				Detail: "the controller closed the connection instead of answering DH-HMAC-CHAP_Reply, as Linux nvmet does when it rejected the host: wrong host secret, or a host NQN it has no secret for"}
		}
		return fmt.Errorf("nvmeof: authenticate queue %d to %s: %w", q.QID(), subsysNQN, err)
	}
	if q.QID() == 0 {
		// As the Linux host, said once per association.
		q.log.Info("authenticated (DH-HMAC-CHAP)", "hash", res.Hash.String(), "dhgroup", res.DHGroup.String(), "bidirectional", res.Bidirectional)
	}
	return nil
}

// queueAuthTransport carries a transaction's messages in Authentication
// Send and Receive commands on q (nvme_auth_submit).
type queueAuthTransport struct {
	q       *Queue
	timeout time.Duration
}

func (t *queueAuthTransport) Send(ctx context.Context, msg []byte) error {
	req := &Request{Data: msg, Write: true, Timeout: t.timeout}
	req.Cmd.SetAuthSend(nvme.AuthCommand{SECP: auth.NVME_AUTH_DHCHAP_PROTOCOL_IDENTIFIER, SPSP0: auth.NVME_AUTH_DHCHAP_SPSP0, SPSP1: auth.NVME_AUTH_DHCHAP_SPSP1, Length: uint32(len(msg))})
	return t.q.Do(ctx, req)
}

func (t *queueAuthTransport) Receive(ctx context.Context, al int) ([]byte, error) {
	buf := make([]byte, al)
	req := &Request{Data: buf, Timeout: t.timeout}
	req.Cmd.SetAuthReceive(nvme.AuthCommand{SECP: auth.NVME_AUTH_DHCHAP_PROTOCOL_IDENTIFIER, SPSP0: auth.NVME_AUTH_DHCHAP_SPSP0, SPSP1: auth.NVME_AUTH_DHCHAP_SPSP1, Length: uint32(al)})
	if err := t.q.Do(ctx, req); err != nil {
		return nil, err
	}
	return buf, nil
}

// closedAfterReply reports whether the controller closed the connection
// (EOF, reset) while the host waited for its answer to DH-HMAC-CHAP_Reply.
// Linux nvmet 6.12 may do that instead of sending AUTH_Failure1 when it
// rejects the host (nvmet_execute_auth_receive calls
// nvmet_ctrl_fatal_error before completing the Failure1 read), so it is
// taken as the rejection it almost always is: final, not retried. A
// timeout or our own shutdown is not.
func closedAfterReply(err error) bool {
	var ru *auth.ReplyUnansweredError
	var qe *QueueError
	if !errors.As(err, &ru) || !errors.As(ru.Err, &qe) {
		return false
	}
	return errors.Is(qe.Err, io.EOF) || errors.Is(qe.Err, io.ErrUnexpectedEOF) ||
		errors.Is(qe.Err, syscall.ECONNRESET) || errors.Is(qe.Err, syscall.EPIPE)
}
