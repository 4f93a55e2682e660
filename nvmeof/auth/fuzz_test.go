package auth

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand"
	"testing"
)

// FuzzParseMessages feeds any bytes to every message decoder; what one
// accepts must encode back to the bytes it read.
func FuzzParseMessages(f *testing.F) {
	f.Add((&Negotiate{TID: 1, Hashes: AllHashes, DHGroups: AllDHGroups}).Marshal())
	f.Add((&Challenge{TID: 1, Hash: NVME_AUTH_HASH_SHA256, C: make([]byte, 32)}).Marshal())
	f.Add((&Reply{TID: 1, R: make([]byte, 48), C2: make([]byte, 48), Seq: 9}).Marshal())
	f.Add((&Success1{TID: 1, HL: 32, R: make([]byte, 32)}).Marshal())
	f.Add((&Failure{AuthID: NVME_AUTH_DHCHAP_MESSAGE_FAILURE1, Code: 1, Reason: 1}).Marshal())
	f.Fuzz(func(t *testing.T, b []byte) {
		if n, err := ParseNegotiate(b); err == nil {
			if len(n.Hashes) > 30 || len(n.DHGroups) > 30 {
				t.Fatal("id lists over 30")
			}
			m := n.Marshal()
			n2, err := ParseNegotiate(m)
			if err != nil || !bytes.Equal(m[4:7], b[4:7]) || !bytes.Equal(m[10:12], b[10:12]) ||
				fmt.Sprint(n2) != fmt.Sprint(n) {
				t.Fatal("negotiate does not round-trip")
			}
		}
		if c, err := ParseChallenge(b); err == nil {
			if len(c.C) != c.Hash.Size() || len(c.DHValue) != c.DHGroup.ValueSize() {
				t.Fatal("challenge lengths not bound")
			}
			m := c.Marshal()
			want := append([]byte(nil), b[:len(m)]...)
			want[2], want[3], want[7] = 0, 0, 0 // reserved
			if !bytes.Equal(m, want) {
				t.Fatalf("challenge does not round-trip")
			}
		}
		for _, hl := range []int{32, 48, 64} {
			for _, dh := range []int{0, 256} {
				if r, err := ParseReply(b, hl, dh); err == nil {
					if len(r.R) != hl || len(r.DHValue) != dh || r.C2 != nil && len(r.C2) != hl {
						t.Fatal("reply lengths not bound")
					}
				}
			}
			if s, err := ParseSuccess1(b, hl); err == nil && s.R != nil && len(s.R) != hl {
				t.Fatal("success1 length not bound")
			}
		}
		if fl, err := ParseFailure(b); err == nil && !bytes.Equal(fl.Marshal()[4:], b[4:FailureSize]) {
			t.Fatal("failure does not round-trip")
		}
	})
}

// FuzzParseSecret: any string is parsed or refused with ErrSecret, and an
// accepted one prints back to a string that parses to the same key.
func FuzzParseSecret(f *testing.F) {
	f.Add(hostKey)
	f.Add(ctrlKey)
	f.Add("DHHC-1:00:")
	f.Fuzz(func(t *testing.T, s string) {
		k, err := ParseSecret(s)
		if err != nil {
			if !errors.Is(err, ErrSecret) {
				t.Fatal(err)
			}
			return
		}
		k2, err := ParseSecret(k.String())
		if err != nil || !bytes.Equal(k.Key, k2.Key) || k.Transform != k2.Transform {
			t.Fatalf("%v", err)
		}
	})
}

// FuzzControllerTransaction sends the controller any sequence of messages
// (the input split at 0xff 0xff) interleaved with receives: it must answer
// each receive with a message it can itself decode, and never report both
// authenticated and failed.
func FuzzControllerTransaction(f *testing.F) {
	f.Add(append((&Negotiate{TID: 1, Hashes: AllHashes, DHGroups: AllDHGroups}).Marshal(), 0xff, 0xff, 1, 2, 0, 0, 1, 0, 32), uint8(0))
	f.Add((&Negotiate{TID: 1, Hashes: []HashID{3}, DHGroups: []DHGroupID{0}}).Marshal(), uint8(1))
	f.Fuzz(func(t *testing.T, b []byte, seed uint8) {
		c := NewControllerTransaction(&ControllerConfig{HostNQN: testHostNQN, SubsysNQN: testSubsysNQN, HostSecret: mustSecret(t, hostKey), CtrlSecret: mustSecret(t, ctrlKey), Hash: NVME_AUTH_HASH_SHA256, Rand: rand.New(rand.NewSource(int64(seed)))})
		for i, msg := range bytes.Split(b, []byte{0xff, 0xff}) {
			c.Send(msg)
			if i%2 == 0 {
				r, err := c.Receive(challengeAL)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := ParseHeader(r); err != nil {
					t.Fatal(err)
				}
			}
			if c.Authenticated() && c.Failed() {
				t.Fatal("authenticated and failed")
			}
		}
	})
}

// script answers the host's receives with fuzzed bytes.
type script struct{ replies [][]byte }

func (s *script) Send(context.Context, []byte) error { return nil }
func (s *script) Receive(_ context.Context, al int) ([]byte, error) {
	if len(s.replies) == 0 {
		return nil, errors.New("end of script")
	}
	b := s.replies[0]
	s.replies = s.replies[1:]
	if len(b) > al {
		b = b[:al]
	}
	return b, nil
}

// FuzzHostTransaction gives the host any controller messages: it returns
// an error or a result, never panics, and never succeeds bidirectionally
// (the fuzzer cannot know the controller's response).
func FuzzHostTransaction(f *testing.F) {
	ch := (&Challenge{TID: 5, Hash: NVME_AUTH_HASH_SHA256, C: make([]byte, 32), Seq: 1}).Marshal()
	f.Add(append(append(ch, 0xff, 0xff), (&Success1{TID: 5, HL: 32}).Marshal()...))
	f.Fuzz(func(t *testing.T, b []byte) {
		s := &script{replies: bytes.Split(b, []byte{0xff, 0xff})}
		res, err := Authenticate(context.Background(), s, &HostConfig{HostNQN: testHostNQN, SubsysNQN: testSubsysNQN, Secret: mustSecret(t, hostKey), CtrlSecret: mustSecret(t, ctrlKey), Rand: rand.New(rand.NewSource(1))}, 5)
		if err == nil {
			t.Fatalf("authenticated against a script: %+v", res)
		}
	})
}
