package auth

import (
	"bytes"
	"crypto/rand"
	"errors"
	"math/big"
	"testing"
)

// The least significant 64 bits above the final all-ones word of each
// RFC 7919 prime, as printed in the RFC's Appendix A, and the group's
// bits: a wrong X in the formula changes that word.
var rfc7919LowWord = map[DHGroupID]string{
	NVME_AUTH_DHGROUP_2048: "886b423861285c97",
	NVME_AUTH_DHGROUP_3072: "25e41d2b66c62e37",
	NVME_AUTH_DHGROUP_4096: "c68a007e5e655f6a",
	NVME_AUTH_DHGROUP_6144: "a40e329cd0e40e65",
	NVME_AUTH_DHGROUP_8192: "d68c8bb7c5c6424c",
}

func TestFFDHEPrimes(t *testing.T) {
	for g, low := range rfc7919LowWord {
		p := ffdheGroups[g].prime()
		h := p.Text(16)
		if p.BitLen() != int(ffdheGroups[g].bits) || h[:32] != "ffffffffffffffffadf85458a2bb4a9a" || h[len(h)-32:] != low+"ffffffffffffffff" {
			t.Errorf("%v: %d bits, %s...%s", g, p.BitLen(), h[:32], h[len(h)-32:])
		}
		if testing.Short() && g > NVME_AUTH_DHGROUP_3072 {
			continue // the larger primality tests take seconds under -race
		}
		q := new(big.Int).Rsh(p, 1)
		if !p.ProbablyPrime(0) || !q.ProbablyPrime(0) {
			t.Errorf("%v: not a safe prime", g)
		}
	}
}

func TestDHAgreement(t *testing.T) {
	for _, g := range []DHGroupID{NVME_AUTH_DHGROUP_2048, NVME_AUTH_DHGROUP_4096} {
		a, pa, err := generateDHKey(rand.Reader, g)
		if err != nil {
			t.Fatal(err)
		}
		b, pb, err := generateDHKey(rand.Reader, g)
		if err != nil {
			t.Fatal(err)
		}
		if len(pa) != g.ValueSize() || len(pb) != g.ValueSize() {
			t.Fatalf("public values of %d, %d bytes", len(pa), len(pb))
		}
		za, err := a.sharedSecret(pb)
		if err != nil {
			t.Fatal(err)
		}
		zb, err := b.sharedSecret(pa)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(za, zb) || len(za) != g.ValueSize() {
			t.Fatalf("%v: secrets differ", g)
		}
		p := ffdheGroups[g].prime()
		for name, bad := range map[string][]byte{
			"zero":  make([]byte, g.ValueSize()),
			"one":   big.NewInt(1).FillBytes(make([]byte, g.ValueSize())),
			"p-1":   new(big.Int).Sub(p, big.NewInt(1)).FillBytes(make([]byte, g.ValueSize())),
			"p":     p.FillBytes(make([]byte, g.ValueSize())),
			"short": pb[1:],
			"long":  append([]byte{0}, pb...),
		} {
			if _, err := a.sharedSecret(bad); !errors.Is(err, errDHValue) {
				t.Errorf("%v %s: %v", g, name, err)
			}
		}
	}
}

func TestNames(t *testing.T) {
	for _, h := range AllHashes {
		if got, err := ParseHash(h.String()); got != h || err != nil {
			t.Errorf("%v: %v %v", h, got, err)
		}
	}
	for _, g := range AllDHGroups {
		if got, err := ParseDHGroup(g.String()); got != g || err != nil {
			t.Errorf("%v: %v %v", g, got, err)
		}
	}
	if _, err := ParseHash("md5"); err == nil {
		t.Error("md5 accepted")
	}
	if _, err := ParseDHGroup("ffdhe1024"); err == nil {
		t.Error("ffdhe1024 accepted")
	}
}
