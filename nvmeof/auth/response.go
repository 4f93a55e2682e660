package auth

import (
	"crypto/hmac"
	"encoding/binary"
)

// augmentedChallenge is Ca = HMAC(H(Ks), C) (NVMe Base 2.0, section
// 8.13.5.4; Linux nvme_auth_augmented_challenge): with a DH group the
// responses cover the session key Ks through the challenge.
func augmentedChallenge(h HashID, sessionKey, c []byte) []byte {
	m := hmac.New(h.newFunc(), h.digest(sessionKey))
	m.Write(c)
	return m.Sum(nil)
}

// response computes
//
//	HMAC(key, C || le32(seq) || le16(tid) || 00h || role || nqn1 || 00h || nqn2)
//
// the host's (role "HostHost", NQNh then NQNc, key the host's transformed
// secret) and the controller's (role "Controller", NQNc then NQNh, key the
// controller's transformed secret) (NVME Base 2.0, section 8.13.5.4; Linux
// nvme_auth_dhchap_setup_host_response, _setup_ctrl_response and nvmet's
// nvmet_auth_host_hash, nvmet_auth_ctrl_hash). C is the augmented
// challenge when a DH group is in use.
func response(h HashID, key, c []byte, seq uint32, tid uint16, role, nqn1, nqn2 string) []byte {
	m := hmac.New(h.newFunc(), key)
	m.Write(c)
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], seq)
	m.Write(b[:4])
	binary.LittleEndian.PutUint16(b[:], tid)
	m.Write(b[:2])
	m.Write([]byte{0})
	m.Write([]byte(role))
	m.Write([]byte(nqn1))
	m.Write([]byte{0})
	m.Write([]byte(nqn2))
	return m.Sum(nil)
}

// HostResponse is the response R1 the host sends in
// DH-HMAC-CHAP_Reply to challenge c1 (sessionKey nil for the null group).
func HostResponse(h HashID, host *Secret, hostNQN, subsysNQN string, c1, sessionKey []byte, s1 uint32, tid uint16) []byte {
	c := c1
	if sessionKey != nil {
		c = augmentedChallenge(h, sessionKey, c1)
	}
	return response(h, host.TransformKey(hostNQN), c, s1, tid, "HostHost", hostNQN, subsysNQN)
}

// ControllerResponse is the response R2 the controller sends in
// DH-HMAC-CHAP_Success1 to the host's challenge c2.
func ControllerResponse(h HashID, ctrl *Secret, hostNQN, subsysNQN string, c2, sessionKey []byte, s2 uint32, tid uint16) []byte {
	c := c2
	if sessionKey != nil {
		c = augmentedChallenge(h, sessionKey, c2)
	}
	return response(h, ctrl.TransformKey(subsysNQN), c, s2, tid, "Controller", subsysNQN, hostNQN)
}
