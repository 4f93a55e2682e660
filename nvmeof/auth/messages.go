package auth

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Authentication Send/Receive carry this security protocol, with SPSP0 and
// SPSP1 both 1 (include/linux/nvme.h; NVMe Base 2.0, section 8.13.5).
const (
	NVME_AUTH_DHCHAP_PROTOCOL_IDENTIFIER = 0xe9
	NVME_AUTH_DHCHAP_SPSP0               = 0x01
	NVME_AUTH_DHCHAP_SPSP1               = 0x01
)

// auth_type values.
const (
	NVME_AUTH_COMMON_MESSAGES = 0x00
	NVME_AUTH_DHCHAP_MESSAGES = 0x01
)

// auth_id values.
const (
	NVME_AUTH_DHCHAP_MESSAGE_NEGOTIATE = 0x00
	NVME_AUTH_DHCHAP_MESSAGE_CHALLENGE = 0x01
	NVME_AUTH_DHCHAP_MESSAGE_REPLY     = 0x02
	NVME_AUTH_DHCHAP_MESSAGE_SUCCESS1  = 0x03
	NVME_AUTH_DHCHAP_MESSAGE_SUCCESS2  = 0x04
	NVME_AUTH_DHCHAP_MESSAGE_FAILURE2  = 0xf0
	NVME_AUTH_DHCHAP_MESSAGE_FAILURE1  = 0xf1
)

// NVME_AUTH_DHCHAP_AUTH_ID is the DH-HMAC-CHAP protocol descriptor's
// AUTHID; the descriptor's ID list holds at most 30 hash and 30 group IDs.
const (
	NVME_AUTH_DHCHAP_AUTH_ID      = 0x01
	NVME_AUTH_DHCHAP_MAX_HASH_IDS = 30
	NVME_AUTH_DHCHAP_MAX_DH_IDS   = 30
)

// NVME_AUTH_SECP_NOSC: no secure channel concatenation (SC_C).
const NVME_AUTH_SECP_NOSC = 0x00

// Reason is a failure message's reason code explanation (rescode_exp).
type Reason uint8

// NVME_AUTH_DHCHAP_FAILURE_REASON_FAILED is the only rescode.
const NVME_AUTH_DHCHAP_FAILURE_REASON_FAILED = 0x01

const (
	NVME_AUTH_DHCHAP_FAILURE_FAILED            Reason = 0x01
	NVME_AUTH_DHCHAP_FAILURE_NOT_USABLE        Reason = 0x02
	NVME_AUTH_DHCHAP_FAILURE_CONCAT_MISMATCH   Reason = 0x03
	NVME_AUTH_DHCHAP_FAILURE_HASH_UNUSABLE     Reason = 0x04
	NVME_AUTH_DHCHAP_FAILURE_DHGROUP_UNUSABLE  Reason = 0x05
	NVME_AUTH_DHCHAP_FAILURE_INCORRECT_PAYLOAD Reason = 0x06
	NVME_AUTH_DHCHAP_FAILURE_INCORRECT_MESSAGE Reason = 0x07
)

func (r Reason) String() string {
	switch r {
	case NVME_AUTH_DHCHAP_FAILURE_FAILED:
		return "authentication failed"
	case NVME_AUTH_DHCHAP_FAILURE_NOT_USABLE:
		return "authentication protocol not usable"
	case NVME_AUTH_DHCHAP_FAILURE_CONCAT_MISMATCH:
		return "secure channel concatenation mismatch"
	case NVME_AUTH_DHCHAP_FAILURE_HASH_UNUSABLE:
		return "hash function not usable"
	case NVME_AUTH_DHCHAP_FAILURE_DHGROUP_UNUSABLE:
		return "DH group not usable"
	case NVME_AUTH_DHCHAP_FAILURE_INCORRECT_PAYLOAD:
		return "incorrect payload"
	case NVME_AUTH_DHCHAP_FAILURE_INCORRECT_MESSAGE:
		return "incorrect protocol message"
	}
	return fmt.Sprintf("reason %#x", uint8(r))
}

// ErrMessage is wrapped by every message decoding error.
var ErrMessage = errors.New("malformed authentication message")

// Message sizes (include/linux/nvme.h struct nvmf_auth_dhchap_*).
const (
	headerSize     = 8  // auth_type, auth_id, rsvd, t_id, and two bytes
	descriptorSize = 64 // struct nvmf_auth_dhchap_protocol_descriptor
	NegotiateSize  = headerSize + descriptorSize
	challengeFixed = 16 // struct nvmf_auth_dhchap_challenge_data
	replyFixed     = 16 // struct nvmf_auth_dhchap_reply_data
	success1Fixed  = 16 // struct nvmf_auth_dhchap_success1_data
	Success2Size   = 16 // struct nvmf_auth_dhchap_success2_data
	FailureSize    = 8  // struct nvmf_auth_dhchap_failure_data
)

// Header is the part every message starts with.
type Header struct {
	AuthType uint8
	AuthID   uint8
	TID      uint16
}

// ParseHeader decodes auth_type, auth_id and t_id.
func ParseHeader(b []byte) (Header, error) {
	if len(b) < headerSize {
		return Header{}, fmt.Errorf("%w: %d bytes, a header is %d", ErrMessage, len(b), headerSize)
	}
	return Header{AuthType: b[0], AuthID: b[1], TID: binary.LittleEndian.Uint16(b[4:])}, nil
}

func putHeader(b []byte, authType, authID uint8, tid uint16) {
	b[0], b[1] = authType, authID
	binary.LittleEndian.PutUint16(b[4:], tid)
}

func expect(b []byte, min int, authType, authID uint8, name string) error {
	h, err := ParseHeader(b)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if h.AuthType != authType || h.AuthID != authID {
		return fmt.Errorf("%w: %s expected, got type %#x id %#x", ErrMessage, name, h.AuthType, h.AuthID)
	}
	if len(b) < min {
		return fmt.Errorf("%w: %s of %d bytes, at least %d", ErrMessage, name, len(b), min)
	}
	return nil
}

// Negotiate is AUTH_Negotiate (struct nvmf_auth_dhchap_negotiate_data with
// one DH-HMAC-CHAP protocol descriptor).
type Negotiate struct {
	TID      uint16
	SCC      uint8 // secure channel concatenation; NVME_AUTH_SECP_NOSC
	Hashes   []HashID
	DHGroups []DHGroupID
}

// Marshal encodes n (NegotiateSize bytes).
func (n *Negotiate) Marshal() []byte {
	b := make([]byte, NegotiateSize)
	putHeader(b, NVME_AUTH_COMMON_MESSAGES, NVME_AUTH_DHCHAP_MESSAGE_NEGOTIATE, n.TID)
	b[6] = n.SCC
	b[7] = 1 // napd
	d := b[headerSize:]
	d[0] = NVME_AUTH_DHCHAP_AUTH_ID
	d[2] = uint8(min(len(n.Hashes), NVME_AUTH_DHCHAP_MAX_HASH_IDS))
	d[3] = uint8(min(len(n.DHGroups), NVME_AUTH_DHCHAP_MAX_DH_IDS))
	for i := 0; i < int(d[2]); i++ {
		d[4+i] = uint8(n.Hashes[i])
	}
	for i := 0; i < int(d[3]); i++ {
		d[4+30+i] = uint8(n.DHGroups[i])
	}
	return b
}

// ParseNegotiate decodes AUTH_Negotiate. Only the first protocol
// descriptor is read, and it must be DH-HMAC-CHAP's.
func ParseNegotiate(b []byte) (*Negotiate, error) {
	if err := expect(b, NegotiateSize, NVME_AUTH_COMMON_MESSAGES, NVME_AUTH_DHCHAP_MESSAGE_NEGOTIATE, "AUTH_Negotiate"); err != nil {
		return nil, err
	}
	n := &Negotiate{TID: binary.LittleEndian.Uint16(b[4:]), SCC: b[6]}
	if b[7] == 0 {
		return nil, fmt.Errorf("%w: AUTH_Negotiate with no protocol descriptor", ErrMessage)
	}
	d := b[headerSize:NegotiateSize]
	if d[0] != NVME_AUTH_DHCHAP_AUTH_ID {
		return nil, fmt.Errorf("%w: AUTH_Negotiate descriptor AUTHID %#x, not DH-HMAC-CHAP", ErrMessage, d[0])
	}
	halen, dhlen := int(d[2]), int(d[3])
	if halen > NVME_AUTH_DHCHAP_MAX_HASH_IDS || dhlen > NVME_AUTH_DHCHAP_MAX_DH_IDS {
		return nil, fmt.Errorf("%w: AUTH_Negotiate HALEN %d DHLEN %d, at most 30 each", ErrMessage, halen, dhlen)
	}
	for i := 0; i < halen; i++ {
		n.Hashes = append(n.Hashes, HashID(d[4+i]))
	}
	for i := 0; i < dhlen; i++ {
		n.DHGroups = append(n.DHGroups, DHGroupID(d[4+30+i]))
	}
	return n, nil
}

// Challenge is DH-HMAC-CHAP_Challenge (struct
// nvmf_auth_dhchap_challenge_data).
type Challenge struct {
	TID     uint16
	Hash    HashID
	DHGroup DHGroupID
	Seq     uint32 // S1
	C       []byte // C1, Hash.Size() bytes
	DHValue []byte // the controller's public value, DHGroup.ValueSize() bytes
}

// Marshal encodes c.
func (c *Challenge) Marshal() []byte {
	b := make([]byte, challengeFixed+len(c.C)+len(c.DHValue))
	putHeader(b, NVME_AUTH_DHCHAP_MESSAGES, NVME_AUTH_DHCHAP_MESSAGE_CHALLENGE, c.TID)
	b[6] = uint8(len(c.C))
	b[8] = uint8(c.Hash)
	b[9] = uint8(c.DHGroup)
	binary.LittleEndian.PutUint16(b[10:], uint16(len(c.DHValue)))
	binary.LittleEndian.PutUint32(b[12:], c.Seq)
	copy(b[challengeFixed:], c.C)
	copy(b[challengeFixed+len(c.C):], c.DHValue)
	return b
}

// ParseChallenge decodes DH-HMAC-CHAP_Challenge: HL must be the hash's
// length and DHVLEN the group's value length (0 for the null group), and
// both must fit in b (which may be longer: Authentication Receive returns
// the whole allocation length).
func ParseChallenge(b []byte) (*Challenge, error) {
	if err := expect(b, challengeFixed, NVME_AUTH_DHCHAP_MESSAGES, NVME_AUTH_DHCHAP_MESSAGE_CHALLENGE, "DH-HMAC-CHAP_Challenge"); err != nil {
		return nil, err
	}
	le := binary.LittleEndian
	c := &Challenge{TID: le.Uint16(b[4:]), Hash: HashID(b[8]), DHGroup: DHGroupID(b[9]), Seq: le.Uint32(b[12:])}
	hl, dhvlen := int(b[6]), int(le.Uint16(b[10:]))
	if !c.Hash.Valid() {
		return nil, fmt.Errorf("%w: DH-HMAC-CHAP_Challenge HASHID %#x unknown", ErrMessage, uint8(c.Hash))
	}
	if hl != c.Hash.Size() {
		return nil, fmt.Errorf("%w: DH-HMAC-CHAP_Challenge HL %d, %v needs %d", ErrMessage, hl, c.Hash, c.Hash.Size())
	}
	if !c.DHGroup.Valid() {
		return nil, fmt.Errorf("%w: DH-HMAC-CHAP_Challenge DHGID %#x unknown", ErrMessage, uint8(c.DHGroup))
	}
	if dhvlen != c.DHGroup.ValueSize() {
		return nil, fmt.Errorf("%w: DH-HMAC-CHAP_Challenge DHVLEN %d, %v needs %d", ErrMessage, dhvlen, c.DHGroup, c.DHGroup.ValueSize())
	}
	if len(b) < challengeFixed+hl+dhvlen {
		return nil, fmt.Errorf("%w: DH-HMAC-CHAP_Challenge of %d bytes, HL %d and DHVLEN %d need %d", ErrMessage, len(b), hl, dhvlen, challengeFixed+hl+dhvlen)
	}
	c.C = append([]byte(nil), b[challengeFixed:challengeFixed+hl]...)
	if dhvlen > 0 {
		c.DHValue = append([]byte(nil), b[challengeFixed+hl:challengeFixed+hl+dhvlen]...)
	}
	return c, nil
}

// Reply is DH-HMAC-CHAP_Reply (struct nvmf_auth_dhchap_reply_data). C2 is
// nil for unidirectional authentication (CVALID 0; the C2 field is then
// zeros, as the Linux host sends it).
type Reply struct {
	TID     uint16
	Seq     uint32 // S2; 0 without C2
	R       []byte // the host's response, HL bytes
	C2      []byte // nil, or HL bytes
	DHValue []byte // the host's public value
}

// Marshal encodes r; HL is len(r.R).
func (r *Reply) Marshal() []byte {
	hl := len(r.R)
	b := make([]byte, replyFixed+2*hl+len(r.DHValue))
	putHeader(b, NVME_AUTH_DHCHAP_MESSAGES, NVME_AUTH_DHCHAP_MESSAGE_REPLY, r.TID)
	b[6] = uint8(hl)
	if r.C2 != nil {
		b[8] = 1
		copy(b[replyFixed+hl:replyFixed+2*hl], r.C2)
	}
	binary.LittleEndian.PutUint16(b[10:], uint16(len(r.DHValue)))
	binary.LittleEndian.PutUint32(b[12:], r.Seq)
	copy(b[replyFixed:], r.R)
	copy(b[replyFixed+2*hl:], r.DHValue)
	return b
}

// ParseReply decodes DH-HMAC-CHAP_Reply; hl and dhvlen are the lengths the
// transaction negotiated, and the message must carry exactly those.
func ParseReply(b []byte, hl, dhvlen int) (*Reply, error) {
	if err := expect(b, replyFixed, NVME_AUTH_DHCHAP_MESSAGES, NVME_AUTH_DHCHAP_MESSAGE_REPLY, "DH-HMAC-CHAP_Reply"); err != nil {
		return nil, err
	}
	le := binary.LittleEndian
	if int(b[6]) != hl {
		return nil, fmt.Errorf("%w: DH-HMAC-CHAP_Reply HL %d, the challenge's is %d", ErrMessage, b[6], hl)
	}
	if got := int(le.Uint16(b[10:])); got != dhvlen {
		return nil, fmt.Errorf("%w: DH-HMAC-CHAP_Reply DHVLEN %d, the group needs %d", ErrMessage, got, dhvlen)
	}
	if len(b) < replyFixed+2*hl+dhvlen {
		return nil, fmt.Errorf("%w: DH-HMAC-CHAP_Reply of %d bytes, needs %d", ErrMessage, len(b), replyFixed+2*hl+dhvlen)
	}
	r := &Reply{TID: le.Uint16(b[4:]), Seq: le.Uint32(b[12:])}
	r.R = append([]byte(nil), b[replyFixed:replyFixed+hl]...)
	if b[8]&1 != 0 {
		r.C2 = append([]byte(nil), b[replyFixed+hl:replyFixed+2*hl]...)
	}
	if dhvlen > 0 {
		r.DHValue = append([]byte(nil), b[replyFixed+2*hl:replyFixed+2*hl+dhvlen]...)
	}
	return r, nil
}

// Success1 is DH-HMAC-CHAP_Success1 (struct
// nvmf_auth_dhchap_success1_data). R is the controller's response, present
// (RVALID) only in bidirectional authentication.
type Success1 struct {
	TID uint16
	HL  uint8
	R   []byte
}

// Marshal encodes s.
func (s *Success1) Marshal() []byte {
	b := make([]byte, success1Fixed+len(s.R))
	putHeader(b, NVME_AUTH_DHCHAP_MESSAGES, NVME_AUTH_DHCHAP_MESSAGE_SUCCESS1, s.TID)
	b[6] = s.HL
	if s.R != nil {
		b[8] = 1
		copy(b[success1Fixed:], s.R)
	}
	return b
}

// ParseSuccess1 decodes DH-HMAC-CHAP_Success1; HL must be hl.
func ParseSuccess1(b []byte, hl int) (*Success1, error) {
	if err := expect(b, success1Fixed, NVME_AUTH_DHCHAP_MESSAGES, NVME_AUTH_DHCHAP_MESSAGE_SUCCESS1, "DH-HMAC-CHAP_Success1"); err != nil {
		return nil, err
	}
	if int(b[6]) != hl {
		return nil, fmt.Errorf("%w: DH-HMAC-CHAP_Success1 HL %d, the challenge's is %d", ErrMessage, b[6], hl)
	}
	s := &Success1{TID: binary.LittleEndian.Uint16(b[4:]), HL: b[6]}
	if b[8]&1 != 0 {
		if len(b) < success1Fixed+hl {
			return nil, fmt.Errorf("%w: DH-HMAC-CHAP_Success1 of %d bytes with RVALID, needs %d", ErrMessage, len(b), success1Fixed+hl)
		}
		s.R = append([]byte(nil), b[success1Fixed:success1Fixed+hl]...)
	}
	return s, nil
}

// MarshalSuccess2 encodes DH-HMAC-CHAP_Success2.
func MarshalSuccess2(tid uint16) []byte {
	b := make([]byte, Success2Size)
	putHeader(b, NVME_AUTH_DHCHAP_MESSAGES, NVME_AUTH_DHCHAP_MESSAGE_SUCCESS2, tid)
	return b
}

// Failure is AUTH_Failure1 (controller to host) or AUTH_Failure2 (host to
// controller) (struct nvmf_auth_dhchap_failure_data).
type Failure struct {
	AuthID uint8 // NVME_AUTH_DHCHAP_MESSAGE_FAILURE1 or _FAILURE2
	TID    uint16
	Code   uint8 // rescode
	Reason Reason
}

// Marshal encodes f.
func (f *Failure) Marshal() []byte {
	b := make([]byte, FailureSize)
	putHeader(b, NVME_AUTH_COMMON_MESSAGES, f.AuthID, f.TID)
	b[6], b[7] = f.Code, uint8(f.Reason)
	return b
}

// ParseFailure decodes AUTH_Failure1 or AUTH_Failure2.
func ParseFailure(b []byte) (*Failure, error) {
	h, err := ParseHeader(b)
	if err != nil {
		return nil, fmt.Errorf("AUTH_Failure: %w", err)
	}
	if h.AuthType != NVME_AUTH_COMMON_MESSAGES || (h.AuthID != NVME_AUTH_DHCHAP_MESSAGE_FAILURE1 && h.AuthID != NVME_AUTH_DHCHAP_MESSAGE_FAILURE2) {
		return nil, fmt.Errorf("%w: AUTH_Failure expected, got type %#x id %#x", ErrMessage, h.AuthType, h.AuthID)
	}
	return &Failure{AuthID: h.AuthID, TID: h.TID, Code: b[6], Reason: Reason(b[7])}, nil
}
