package auth

import (
	"crypto/hmac"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"strings"
)

// Secret is a DH-HMAC-CHAP secret (NVMe Base 2.0, section 8.13.5.8
// "Secret representation"): the key and the hash function its
// transformation uses (0: none).
type Secret struct {
	Transform HashID
	Key       []byte
}

// ErrSecret is wrapped by every error parsing a secret. Errors never
// include the secret itself.
var ErrSecret = errors.New("invalid DH-HMAC-CHAP secret")

const secretPrefix = "DHHC-1:"

// ParseSecret decodes the DHHC-1 representation nvme-cli's gen-dhchap-key
// writes and Linux's nvme_auth_parse_key reads:
//
//	DHHC-1:<hh>:<base64 of key || CRC-32 of key, little endian>:
//
// hh is 00 (no transformation), 01 (SHA-256), 02 (SHA-384) or 03
// (SHA-512). The key is 32, 48 or 64 bytes; with a transformation it must
// be the hash's length (as nvme-cli requires: the transformed key keys the
// HMAC with the key's length). The CRC is checked. Surrounding white space
// (a file's newline) is ignored, and so is a missing final colon, as in
// Linux.
func ParseSecret(s string) (*Secret, error) {
	s = strings.TrimSpace(s)
	if !strings.HasPrefix(s, secretPrefix) {
		return nil, fmt.Errorf("%w: does not start with %q", ErrSecret, secretPrefix)
	}
	rest := s[len(secretPrefix):]
	if len(rest) < 3 || rest[2] != ':' {
		return nil, fmt.Errorf("%w: no two-digit hash identifier after %q", ErrSecret, secretPrefix)
	}
	var h HashID
	switch rest[:2] {
	case "00":
	case "01":
		h = NVME_AUTH_HASH_SHA256
	case "02":
		h = NVME_AUTH_HASH_SHA384
	case "03":
		h = NVME_AUTH_HASH_SHA512
	default:
		return nil, fmt.Errorf("%w: hash identifier %q is not 00, 01, 02 or 03", ErrSecret, rest[:2])
	}
	b64 := strings.TrimSuffix(rest[3:], ":")
	if len(b64) > base64.StdEncoding.EncodedLen(64+4) {
		return nil, fmt.Errorf("%w: %d base64 characters, at most %d", ErrSecret, len(b64), base64.StdEncoding.EncodedLen(64+4))
	}
	raw, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return nil, fmt.Errorf("%w: the key is not valid base64", ErrSecret)
	}
	n := len(raw) - 4
	if n != 32 && n != 48 && n != 64 {
		return nil, fmt.Errorf("%w: key of %d bytes, not 32, 48 or 64", ErrSecret, max(n, 0))
	}
	if h != 0 && n != h.Size() {
		return nil, fmt.Errorf("%w: key of %d bytes with hash %s, which needs %d", ErrSecret, n, h, h.Size())
	}
	if crc32.ChecksumIEEE(raw[:n]) != binary.LittleEndian.Uint32(raw[n:]) {
		return nil, fmt.Errorf("%w: CRC mismatch (mistyped or truncated?)", ErrSecret)
	}
	return &Secret{Transform: h, Key: raw[:n:n]}, nil
}

// ReadSecretFile reads a DHHC-1 secret from a file (the preferred form: a
// secret on a command line is visible in ps, and one in a unit's
// environment in systemctl show).
func ReadSecretFile(path string) (*Secret, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if len(b) > 256 {
		return nil, fmt.Errorf("%w: %s is %d bytes, a DHHC-1 secret is under 100", ErrSecret, path, len(b))
	}
	s, err := ParseSecret(string(b))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return s, nil
}

// String returns the DHHC-1 representation (it is the secret: do not log
// it).
func (s *Secret) String() string {
	raw := binary.LittleEndian.AppendUint32(append([]byte(nil), s.Key...), crc32.ChecksumIEEE(s.Key))
	return fmt.Sprintf("%s%02x:%s:", secretPrefix, uint8(s.Transform), base64.StdEncoding.EncodeToString(raw))
}

// TransformKey is the key transformation (NVMe Base 2.0, section 8.13.5.7;
// Linux nvme_auth_transform_key): HMAC-H(key, NQN || "NVMe-over-Fabrics")
// with H the secret's hash, or the key itself when there is none. The
// host's secret is transformed with the host NQN, the controller's with
// the subsystem NQN.
func (s *Secret) TransformKey(nqn string) []byte {
	if s.Transform == 0 {
		return append([]byte(nil), s.Key...)
	}
	m := hmac.New(s.Transform.newFunc(), s.Key)
	m.Write([]byte(nqn))
	m.Write([]byte("NVMe-over-Fabrics"))
	return m.Sum(nil)
}
