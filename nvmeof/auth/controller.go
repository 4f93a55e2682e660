package auth

import (
	"crypto/hmac"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
	"slices"
)

// ControllerConfig is what a controller authenticates one host with (the
// per-host attributes of Linux nvmet: dhchap_key, dhchap_ctrl_key,
// dhchap_hash, dhchap_dhgroup).
type ControllerConfig struct {
	HostNQN, SubsysNQN string
	// HostSecret is the secret the host must prove it holds.
	HostSecret *Secret
	// CtrlSecret answers a host that asks for bidirectional
	// authentication; without it such a host is refused.
	CtrlSecret *Secret
	// Hash and DHGroup are chosen when the host offers them; otherwise
	// the first hash the host offers and the DH group NVME_AUTH_DHGROUP_NULL
	// if offered (as nvmet falls back).
	Hash    HashID
	DHGroup DHGroupID
	Rand    io.Reader
}

// ControllerTransaction is the controller's side of DH-HMAC-CHAP on one
// queue, driven by the host's Authentication Send and Receive commands
// (Linux nvmet_execute_auth_send, nvmet_execute_auth_receive). Not safe
// for concurrent use: a queue executes its commands in order.
type ControllerTransaction struct {
	cfg  *ControllerConfig
	rand io.Reader

	step   uint8 // the message expected or to be sent next
	reason Reason
	tid    uint16
	hash   HashID
	group  DHGroupID
	key    *dhKey
	pub    []byte
	c1     []byte
	s1     uint32
	sess   []byte
	c2     []byte
	s2     uint32

	authenticated, failed bool
}

// NewControllerTransaction starts expecting AUTH_Negotiate.
func NewControllerTransaction(cfg *ControllerConfig) *ControllerTransaction {
	r := cfg.Rand
	if r == nil {
		r = rand.Reader
	}
	return &ControllerTransaction{cfg: cfg, rand: r, step: NVME_AUTH_DHCHAP_MESSAGE_NEGOTIATE}
}

// Authenticated reports whether the host has authenticated (and, when it
// asked, the controller too).
func (c *ControllerTransaction) Authenticated() bool { return c.authenticated }

// Failed reports whether the transaction ended in failure: the controller
// then drops the host's connection, as nvmet_ctrl_fatal_error does.
func (c *ControllerTransaction) Failed() bool { return c.failed }

// Send consumes the payload of an Authentication Send. A protocol failure
// is not an error here: it is reported to the host in AUTH_Failure1 at its
// next Authentication Receive.
func (c *ControllerTransaction) Send(msg []byte) {
	h, err := ParseHeader(msg)
	if err != nil {
		c.fail(NVME_AUTH_DHCHAP_FAILURE_INCORRECT_PAYLOAD)
		return
	}
	switch {
	case h.AuthType == NVME_AUTH_COMMON_MESSAGES && h.AuthID == NVME_AUTH_DHCHAP_MESSAGE_NEGOTIATE:
		c.negotiate(msg)
	case h.AuthType == NVME_AUTH_COMMON_MESSAGES && h.AuthID == NVME_AUTH_DHCHAP_MESSAGE_FAILURE2:
		c.step, c.failed, c.authenticated = NVME_AUTH_DHCHAP_MESSAGE_FAILURE2, true, false
	case h.AuthType != NVME_AUTH_DHCHAP_MESSAGES || h.AuthID != c.step:
		c.fail(NVME_AUTH_DHCHAP_FAILURE_INCORRECT_MESSAGE)
	case h.TID != c.tid:
		c.fail(NVME_AUTH_DHCHAP_FAILURE_INCORRECT_PAYLOAD)
	case h.AuthID == NVME_AUTH_DHCHAP_MESSAGE_REPLY:
		c.reply(msg)
	case h.AuthID == NVME_AUTH_DHCHAP_MESSAGE_SUCCESS2:
		c.step, c.authenticated = NVME_AUTH_DHCHAP_MESSAGE_SUCCESS2, true
	}
}

// Receive answers an Authentication Receive with allocation length al; an
// error means the command itself is invalid (al too small for the
// message), an NVMe Invalid Field.
func (c *ControllerTransaction) Receive(al int) ([]byte, error) {
	var msg []byte
	switch c.step {
	case NVME_AUTH_DHCHAP_MESSAGE_CHALLENGE:
		msg = c.challenge()
	case NVME_AUTH_DHCHAP_MESSAGE_SUCCESS1:
		msg = c.success1()
	}
	if msg == nil {
		if c.step != NVME_AUTH_DHCHAP_MESSAGE_FAILURE1 {
			c.fail(NVME_AUTH_DHCHAP_FAILURE_INCORRECT_MESSAGE)
		}
		c.failed, c.authenticated = true, false
		msg = (&Failure{AuthID: NVME_AUTH_DHCHAP_MESSAGE_FAILURE1, TID: c.tid, Code: NVME_AUTH_DHCHAP_FAILURE_REASON_FAILED, Reason: c.reason}).Marshal()
	}
	if al < len(msg) {
		return nil, fmt.Errorf("authentication receive: allocation length %d, the message is %d bytes", al, len(msg))
	}
	return append(msg, make([]byte, al-len(msg))...), nil
}

func (c *ControllerTransaction) fail(r Reason) {
	c.step, c.reason = NVME_AUTH_DHCHAP_MESSAGE_FAILURE1, r
}

// negotiate picks the hash and DH group (nvmet_auth_negotiate).
func (c *ControllerTransaction) negotiate(msg []byte) {
	n, err := ParseNegotiate(msg)
	if err != nil {
		c.fail(NVME_AUTH_DHCHAP_FAILURE_INCORRECT_PAYLOAD)
		return
	}
	*c = ControllerTransaction{cfg: c.cfg, rand: c.rand, tid: n.TID}
	if n.SCC != NVME_AUTH_SECP_NOSC {
		c.fail(NVME_AUTH_DHCHAP_FAILURE_CONCAT_MISMATCH)
		return
	}
	c.hash = c.cfg.Hash
	if !c.hash.Valid() || !slices.Contains(n.Hashes, c.hash) {
		i := slices.IndexFunc(n.Hashes, HashID.Valid)
		if i < 0 {
			c.fail(NVME_AUTH_DHCHAP_FAILURE_HASH_UNUSABLE)
			return
		}
		c.hash = n.Hashes[i]
	}
	c.group = c.cfg.DHGroup
	if !slices.Contains(n.DHGroups, c.group) {
		if !slices.Contains(n.DHGroups, NVME_AUTH_DHGROUP_NULL) {
			c.fail(NVME_AUTH_DHCHAP_FAILURE_DHGROUP_UNUSABLE)
			return
		}
		c.group = NVME_AUTH_DHGROUP_NULL
	}
	c.step = NVME_AUTH_DHCHAP_MESSAGE_CHALLENGE
}

// challenge builds DH-HMAC-CHAP_Challenge (nvmet_auth_challenge).
func (c *ControllerTransaction) challenge() []byte {
	c.c1 = make([]byte, c.hash.Size())
	var s [4]byte
	if _, err := io.ReadFull(c.rand, c.c1); err != nil {
		c.fail(NVME_AUTH_DHCHAP_FAILURE_FAILED)
		return nil
	}
	if _, err := io.ReadFull(c.rand, s[:]); err != nil {
		c.fail(NVME_AUTH_DHCHAP_FAILURE_FAILED)
		return nil
	}
	c.s1 = max(binary.LittleEndian.Uint32(s[:]), 1)
	if c.group != NVME_AUTH_DHGROUP_NULL {
		var err error
		if c.key, c.pub, err = generateDHKey(c.rand, c.group); err != nil {
			c.fail(NVME_AUTH_DHCHAP_FAILURE_FAILED)
			return nil
		}
	}
	c.step = NVME_AUTH_DHCHAP_MESSAGE_REPLY
	return (&Challenge{TID: c.tid, Hash: c.hash, DHGroup: c.group, Seq: c.s1, C: c.c1, DHValue: c.pub}).Marshal()
}

// reply checks the host's response (nvmet_auth_reply).
func (c *ControllerTransaction) reply(msg []byte) {
	r, err := ParseReply(msg, c.hash.Size(), c.group.ValueSize())
	if err != nil {
		c.fail(NVME_AUTH_DHCHAP_FAILURE_INCORRECT_PAYLOAD)
		return
	}
	if c.key != nil {
		if c.sess, err = c.key.sharedSecret(r.DHValue); err != nil {
			c.fail(NVME_AUTH_DHCHAP_FAILURE_DHGROUP_UNUSABLE)
			return
		}
	}
	if c.cfg.HostSecret == nil {
		c.fail(NVME_AUTH_DHCHAP_FAILURE_FAILED)
		return
	}
	want := HostResponse(c.hash, c.cfg.HostSecret, c.cfg.HostNQN, c.cfg.SubsysNQN, c.c1, c.sess, c.s1, c.tid)
	if !hmac.Equal(want, r.R) {
		c.fail(NVME_AUTH_DHCHAP_FAILURE_FAILED)
		return
	}
	if r.C2 != nil && r.Seq != 0 {
		c.c2, c.s2 = r.C2, r.Seq
	}
	c.step = NVME_AUTH_DHCHAP_MESSAGE_SUCCESS1
}

// success1 builds DH-HMAC-CHAP_Success1 (nvmet_auth_success1).
func (c *ControllerTransaction) success1() []byte {
	s := &Success1{TID: c.tid, HL: uint8(c.hash.Size())}
	if c.c2 != nil {
		if c.cfg.CtrlSecret == nil {
			c.fail(NVME_AUTH_DHCHAP_FAILURE_FAILED)
			return nil
		}
		s.R = ControllerResponse(c.hash, c.cfg.CtrlSecret, c.cfg.HostNQN, c.cfg.SubsysNQN, c.c2, c.sess, c.s2, c.tid)
		c.step = NVME_AUTH_DHCHAP_MESSAGE_SUCCESS2
	} else {
		c.step, c.authenticated = NVME_AUTH_DHCHAP_MESSAGE_SUCCESS2, true
	}
	return s.Marshal()
}
