package auth

import (
	"errors"
	"fmt"
	"io"
	"math/big"
	"sync"
)

// DHGroupID identifies a Diffie-Hellman group (NVMe Base 2.0, Figure
// "DH-HMAC-CHAP Diffie-Hellman group identifiers"; include/linux/nvme.h
// NVME_AUTH_DHGROUP_*).
type DHGroupID uint8

const (
	NVME_AUTH_DHGROUP_NULL DHGroupID = 0x00
	NVME_AUTH_DHGROUP_2048 DHGroupID = 0x01
	NVME_AUTH_DHGROUP_3072 DHGroupID = 0x02
	NVME_AUTH_DHGROUP_4096 DHGroupID = 0x03
	NVME_AUTH_DHGROUP_6144 DHGroupID = 0x04
	NVME_AUTH_DHGROUP_8192 DHGroupID = 0x05
)

// ffdhe describes one RFC 7919 group. The prime is
//
//	p = 2^b - 2^{b-64} + {[2^{b-130} e] + X} * 2^64 - 1
//
// (RFC 7919, Appendix A), computed once from b and X rather than pasted
// as a constant; dh_test.go checks that each is a safe prime. The private
// exponent has expBits bits, at least twice the group's security strength
// (RFC 7919, section 5.2).
type ffdhe struct {
	bits    uint
	x       int64
	expBits int
	once    sync.Once
	p       *big.Int
}

var ffdheGroups = map[DHGroupID]*ffdhe{
	NVME_AUTH_DHGROUP_2048: {bits: 2048, x: 560316, expBits: 256},
	NVME_AUTH_DHGROUP_3072: {bits: 3072, x: 2625351, expBits: 320},
	NVME_AUTH_DHGROUP_4096: {bits: 4096, x: 5736041, expBits: 384},
	NVME_AUTH_DHGROUP_6144: {bits: 6144, x: 15705020, expBits: 448},
	NVME_AUTH_DHGROUP_8192: {bits: 8192, x: 10965728, expBits: 512},
}

// String is the name Linux nvmet's dhchap_dhgroup attribute uses.
func (g DHGroupID) String() string {
	if g == NVME_AUTH_DHGROUP_NULL {
		return "null"
	}
	if f := ffdheGroups[g]; f != nil {
		return fmt.Sprintf("ffdhe%d", f.bits)
	}
	return fmt.Sprintf("dhgroup(%#x)", uint8(g))
}

// Valid reports whether g names a group (null included).
func (g DHGroupID) Valid() bool { return g == NVME_AUTH_DHGROUP_NULL || ffdheGroups[g] != nil }

// ValueSize is the length of a public value or shared secret in the group:
// the prime's length in bytes, 0 for the null group.
func (g DHGroupID) ValueSize() int {
	if f := ffdheGroups[g]; f != nil {
		return int(f.bits / 8)
	}
	return 0
}

// ParseDHGroup accepts "null" and "ffdhe2048" ... "ffdhe8192".
func ParseDHGroup(s string) (DHGroupID, error) {
	for _, g := range []DHGroupID{NVME_AUTH_DHGROUP_NULL, NVME_AUTH_DHGROUP_2048, NVME_AUTH_DHGROUP_3072, NVME_AUTH_DHGROUP_4096, NVME_AUTH_DHGROUP_6144, NVME_AUTH_DHGROUP_8192} {
		if s == g.String() {
			return g, nil
		}
	}
	return 0, fmt.Errorf("unknown DH-HMAC-CHAP DH group %q (null, ffdhe2048, ffdhe3072, ffdhe4096, ffdhe6144, ffdhe8192)", s)
}

func (f *ffdhe) prime() *big.Int {
	f.once.Do(func() {
		b := f.bits
		p := new(big.Int).Lsh(big.NewInt(1), b)
		p.Sub(p, new(big.Int).Lsh(big.NewInt(1), b-64))
		m := floorEScaled(b - 130)
		m.Add(m, big.NewInt(f.x))
		p.Add(p, m.Lsh(m, 64))
		f.p = p.Sub(p, big.NewInt(1))
	})
	return f.p
}

// floorEScaled is floor(2^shift * e), e = sum 1/k!, each term truncated
// with 64 guard bits (the truncation error, under one unit per term and
// fewer than 2^11 terms, stays far below the guard).
func floorEScaled(shift uint) *big.Int {
	const guard = 64
	sum := new(big.Int)
	term := new(big.Int).Lsh(big.NewInt(1), shift+guard)
	for k := int64(1); term.Sign() > 0; k++ {
		sum.Add(sum, term)
		term.Quo(term, big.NewInt(k))
	}
	return sum.Rsh(sum, guard)
}

// dhKey is one side's ephemeral key in an ffdhe group.
type dhKey struct {
	group DHGroupID
	x     *big.Int
}

// errDHValue is returned for a peer's public value outside (1, p-1).
var errDHValue = errors.New("DH value out of range")

// generateDHKey draws a private exponent from random and returns it with
// the public value g^x mod p (g = 2), big-endian, padded to the prime's
// length as Linux's kpp "dh" writes it.
func generateDHKey(random io.Reader, g DHGroupID) (*dhKey, []byte, error) {
	f := ffdheGroups[g]
	if f == nil {
		return nil, nil, fmt.Errorf("no DH key in group %v", g)
	}
	buf := make([]byte, f.expBits/8)
	if _, err := io.ReadFull(random, buf); err != nil {
		return nil, nil, fmt.Errorf("DH private key: %w", err)
	}
	x := new(big.Int).SetBytes(buf)
	x.SetBit(x, f.expBits-1, 1) // full length, never 0 or 1
	pub := new(big.Int).Exp(big.NewInt(2), x, f.prime())
	return &dhKey{group: g, x: x}, pub.FillBytes(make([]byte, g.ValueSize())), nil
}

// sharedSecret is peer^x mod p, padded to the prime's length. The peer's
// value must be exactly the group's length and lie in (1, p-1) (SP 800-56A
// rev. 3, 5.6.2.3.1, as Linux's dh_is_pubkey_valid checks).
func (k *dhKey) sharedSecret(peer []byte) ([]byte, error) {
	f := ffdheGroups[k.group]
	if len(peer) != k.group.ValueSize() {
		return nil, fmt.Errorf("%w: %d bytes, %v needs %d", errDHValue, len(peer), k.group, k.group.ValueSize())
	}
	p := f.prime()
	y := new(big.Int).SetBytes(peer)
	pm1 := new(big.Int).Sub(p, big.NewInt(1))
	if y.Cmp(big.NewInt(1)) <= 0 || y.Cmp(pm1) >= 0 {
		return nil, errDHValue
	}
	z := new(big.Int).Exp(y, k.x, p)
	return z.FillBytes(make([]byte, k.group.ValueSize())), nil
}
