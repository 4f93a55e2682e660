package auth

import (
	"crypto/sha256"
	"crypto/sha512"
	"fmt"
	"hash"
)

// HashID identifies a hash function (NVMe Base 2.0, Figure "DH-HMAC-CHAP
// Hash Function Identifiers"; include/linux/nvme.h NVME_AUTH_HASH_*). In a
// DHHC-1 secret, 0 means "no transformation".
type HashID uint8

const (
	NVME_AUTH_HASH_SHA256 HashID = 0x01
	NVME_AUTH_HASH_SHA384 HashID = 0x02
	NVME_AUTH_HASH_SHA512 HashID = 0x03
)

// NVME_AUTH_MAX_DIGEST_SIZE is the longest digest of any HashID.
const NVME_AUTH_MAX_DIGEST_SIZE = 64

// Size is the digest length in bytes, 0 for an unknown ID.
func (h HashID) Size() int {
	switch h {
	case NVME_AUTH_HASH_SHA256:
		return sha256.Size
	case NVME_AUTH_HASH_SHA384:
		return sha512.Size384
	case NVME_AUTH_HASH_SHA512:
		return sha512.Size
	}
	return 0
}

// Valid reports whether h names a hash function.
func (h HashID) Valid() bool { return h.Size() != 0 }

func (h HashID) newFunc() func() hash.Hash {
	switch h {
	case NVME_AUTH_HASH_SHA256:
		return sha256.New
	case NVME_AUTH_HASH_SHA384:
		return sha512.New384
	case NVME_AUTH_HASH_SHA512:
		return sha512.New
	}
	return nil
}

// String is the name Linux nvmet's dhchap_hash attribute uses.
func (h HashID) String() string {
	switch h {
	case NVME_AUTH_HASH_SHA256:
		return "hmac(sha256)"
	case NVME_AUTH_HASH_SHA384:
		return "hmac(sha384)"
	case NVME_AUTH_HASH_SHA512:
		return "hmac(sha512)"
	}
	return fmt.Sprintf("hash(%#x)", uint8(h))
}

// ParseHash accepts "sha256", "sha384", "sha512" and the hmac(...) forms.
func ParseHash(s string) (HashID, error) {
	for _, h := range []HashID{NVME_AUTH_HASH_SHA256, NVME_AUTH_HASH_SHA384, NVME_AUTH_HASH_SHA512} {
		if s == h.String() || "hmac("+s+")" == h.String() {
			return h, nil
		}
	}
	return 0, fmt.Errorf("unknown DH-HMAC-CHAP hash %q (sha256, sha384 or sha512)", s)
}

// digest is H(data).
func (h HashID) digest(data []byte) []byte {
	d := h.newFunc()()
	d.Write(data)
	return d.Sum(nil)
}
