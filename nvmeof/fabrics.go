package nvmeof

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// This file is the fabrics layer (drivers/nvme/host/fabrics.c): host
// identity, NQN validation, Connect and Property Get/Set.

// Host identity files written by nvme-cli (nvme gen-hostnqn).
const (
	HostNQNPath = "/etc/nvme/hostnqn"
	HostIDPath  = "/etc/nvme/hostid"
)

// uuidNQNPrefix is the NQN form for a host without a registered domain
// (NVMe Base 2.0, section 4.5).
const uuidNQNPrefix = "nqn.2014-08.org.nvmexpress:uuid:"

// HostIdentity is who the host says it is in Connect.
type HostIdentity struct {
	NQN string
	ID  [16]byte // Host Identifier, a UUID
}

// LoadHostIdentity reads /etc/nvme/hostnqn and /etc/nvme/hostid when
// present (as the Linux host and nvme-cli do); a missing host ID is taken
// from a UUID NQN, a missing NQN is made from the host ID, and when both
// are missing a new random UUID is used for both.
func LoadHostIdentity() (HostIdentity, error) {
	return loadHostIdentity(HostNQNPath, HostIDPath)
}

func loadHostIdentity(nqnPath, idPath string) (HostIdentity, error) {
	var h HostIdentity
	nqn, err := readTrimmed(nqnPath)
	if err != nil {
		return h, err
	}
	id, err := readTrimmed(idPath)
	if err != nil {
		return h, err
	}
	haveID := false
	if id != "" {
		if h.ID, err = ParseUUID(id); err != nil {
			return h, fmt.Errorf("%s: %w", idPath, err)
		}
		haveID = true
	}
	if nqn != "" {
		if err := ValidateNQN(nqn); err != nil {
			return h, fmt.Errorf("%s: %w", nqnPath, err)
		}
		h.NQN = nqn
		if !haveID && strings.HasPrefix(nqn, uuidNQNPrefix) {
			if h.ID, err = ParseUUID(strings.TrimPrefix(nqn, uuidNQNPrefix)); err == nil {
				haveID = true
			}
		}
	}
	if !haveID {
		if _, err := rand.Read(h.ID[:]); err != nil {
			return h, err
		}
		h.ID[6] = h.ID[6]&0x0f | 0x40 // version 4
		h.ID[8] = h.ID[8]&0x3f | 0x80 // variant RFC 4122
	}
	if h.NQN == "" {
		h.NQN = uuidNQNPrefix + FormatUUID(h.ID)
	}
	return h, nil
}

func readTrimmed(path string) (string, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

// ParseUUID parses the 36-character textual form of a UUID.
func ParseUUID(s string) ([16]byte, error) {
	var u [16]byte
	if len(s) != 36 || s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-' {
		return u, fmt.Errorf("invalid UUID %q", s)
	}
	h := s[0:8] + s[9:13] + s[14:18] + s[19:23] + s[24:36]
	if _, err := hex.Decode(u[:], []byte(h)); err != nil {
		return u, fmt.Errorf("invalid UUID %q", s)
	}
	return u, nil
}

// FormatUUID formats u in the 36-character textual form.
func FormatUUID(u [16]byte) string {
	h := hex.EncodeToString(u[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

// ErrInvalidNQN is wrapped by every NQN validation error.
var ErrInvalidNQN = errors.New("invalid NQN")

// nqnDate is "nqn.yyyy-mm." followed by a reverse domain name, then
// optionally ":" and anything (NVMe Base 2.0, section 4.5).
var nqnDomainForm = regexp.MustCompile(`^nqn\.[0-9]{4}-(0[1-9]|1[0-2])\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*(:.*)?$`)

// ValidateNQN checks an NVMe Qualified Name: at most 223 bytes of UTF-8,
// either the UUID form "nqn.2014-08.org.nvmexpress:uuid:<uuid>" or
// "nqn.yyyy-mm.<reverse domain>[:<anything>]", or the well-known discovery
// NQN.
func ValidateNQN(nqn string) error {
	switch {
	case nqn == "":
		return fmt.Errorf("%w: empty", ErrInvalidNQN)
	case len(nqn) > nvme.NVMF_NQN_SIZE:
		return fmt.Errorf("%w: %d bytes, at most %d allowed", ErrInvalidNQN, len(nqn), nvme.NVMF_NQN_SIZE)
	case strings.ContainsRune(nqn, 0):
		return fmt.Errorf("%w: contains a NUL byte", ErrInvalidNQN)
	case !strings.HasPrefix(nqn, "nqn."):
		return fmt.Errorf("%w: %q does not start with \"nqn.\"", ErrInvalidNQN, nqn)
	case strings.HasPrefix(nqn, uuidNQNPrefix):
		if _, err := ParseUUID(strings.TrimPrefix(nqn, uuidNQNPrefix)); err != nil {
			return fmt.Errorf("%w: UUID form with %v", ErrInvalidNQN, err)
		}
		return nil
	case !nqnDomainForm.MatchString(nqn):
		return fmt.Errorf("%w: %q is not of the form nqn.yyyy-mm.reverse.domain[:name]", ErrInvalidNQN, nqn)
	}
	return nil
}

// connect sends Fabrics Connect on q (nvmf_connect_admin_queue,
// nvmf_connect_io_queue) and returns the controller ID.
// When the controller requires it, the queue is then authenticated with
// a (auth.go).
func connectQueue(ctx context.Context, q *Queue, host HostIdentity, subsysNQN string, cntlid uint16, kato uint32, timeout time.Duration, a *AuthConfig) (uint16, error) {
	data := (&nvme.ConnectData{HostID: host.ID, CNTLID: cntlid, SubsysNQN: subsysNQN, HostNQN: host.NQN}).Marshal()
	req := &Request{Data: data, Write: true, Timeout: timeout}
	req.Cmd.SetConnect(nvme.Connect{QID: q.QID(), SQSize: uint16(q.Size() - 1), KATO: kato})
	if err := q.Do(ctx, req); err != nil {
		var st nvme.Status
		if errors.As(err, &st) {
			return 0, fmt.Errorf("nvmeof: connect queue %d to %s: %w", q.QID(), subsysNQN, err)
		}
		return 0, fmt.Errorf("nvmeof: connect queue %d: %w", q.QID(), err)
	}
	if err := authenticateQueue(ctx, q, a, host, subsysNQN, uint32(req.Result), timeout); err != nil {
		return 0, err
	}
	return uint16(req.Result), nil
}
