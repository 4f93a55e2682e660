package auth

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
)

// linuxTranscript is one queue's DH-HMAC-CHAP exchange between this host
// and Linux nvmet, recorded in the e2e VM by
// nvmeof/auth_guest_test.go (TRANSCRIPT lines): the secrets, the bytes
// the host drew from its random source, and every message.
type linuxTranscript struct {
	Kernel     string   `json:"kernel"`
	HostNQN    string   `json:"hostnqn"`
	SubsysNQN  string   `json:"subnqn"`
	HostSecret string   `json:"host_secret"`
	CtrlSecret string   `json:"ctrl_secret"`
	Hash       string   `json:"hash"`
	DHGroup    string   `json:"dhgroup"`
	Rand       string   `json:"rand"`
	Messages   []string `json:"messages"`
}

func loadLinuxTranscripts(t *testing.T) []linuxTranscript {
	f, err := os.Open("testdata/linux-nvmet-transcripts.jsonl")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []linuxTranscript
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var tr linuxTranscript
		if err := json.Unmarshal(sc.Bytes(), &tr); err != nil {
			t.Fatal(err)
		}
		out = append(out, tr)
	}
	return out
}

// replay plays the controller's recorded messages and checks that every
// message the host sends is the recorded one.
type replay struct {
	msgs []string
	err  error
}

func (r *replay) next(dir string) []byte {
	if len(r.msgs) == 0 {
		r.err = errors.Join(r.err, fmt.Errorf("host wants to %s past the transcript", dir))
		return nil
	}
	d, h, _ := strings.Cut(r.msgs[0], " ")
	r.msgs = r.msgs[1:]
	if d != dir {
		r.err = errors.Join(r.err, fmt.Errorf("host wants to %s, transcript has %s", dir, d))
	}
	b, _ := hex.DecodeString(h)
	return b
}

func (r *replay) Send(_ context.Context, msg []byte) error {
	want := r.next("send")
	if got := bytes.TrimRight(msg, "\x00"); !bytes.Equal(got, want) {
		r.err = errors.Join(r.err, fmt.Errorf("host sent\n%x\nLinux saw\n%x", got, want))
	}
	return nil
}

func (r *replay) Receive(_ context.Context, al int) ([]byte, error) {
	b := r.next("recv")
	if len(b) > al {
		return nil, fmt.Errorf("recorded message of %d bytes over al %d", len(b), al)
	}
	return append(b, make([]byte, al-len(b))...), nil
}

// TestLinuxNvmetKnownAnswers replays exchanges with Linux nvmet (6.12 and
// 7.3):
// with the same random bytes the host must send exactly the reply Linux
// accepted (so the key transformation, the DH shared secret, the
// augmented challenge and the host response agree with Linux), and must
// accept Linux's controller response in the bidirectional ones.
func TestLinuxNvmetKnownAnswers(t *testing.T) {
	trs := loadLinuxTranscripts(t)
	seen := map[string]bool{}
	kernels := map[string]bool{}
	for _, tr := range trs {
		name := fmt.Sprintf("%s/%s/%s/bidi=%v", tr.Kernel, tr.Hash, tr.DHGroup, tr.CtrlSecret != "")
		seen[tr.Hash] = true
		seen[tr.DHGroup] = true
		kernels[tr.Kernel[:strings.IndexByte(tr.Kernel+".", '.')]] = true
		t.Run(name, func(t *testing.T) {
			res, r, err := replayTranscript(t, tr, nil)
			if err != nil || r.err != nil || len(r.msgs) != 0 {
				t.Fatalf("%v; replay: %v; %d messages left", err, r.err, len(r.msgs))
			}
			if res.Hash.String() != tr.Hash || res.DHGroup.String() != tr.DHGroup || res.Bidirectional != (tr.CtrlSecret != "") {
				t.Fatalf("result %+v", res)
			}
			// The same transcript with another host secret must not
			// reproduce Linux's accepted reply.
			_, r, _ = replayTranscript(t, tr, func(hc *HostConfig) { hc.Secret = mustSecret(t, otherKey) })
			if r.err == nil {
				t.Fatal("a different host secret reproduced the reply")
			}
			if tr.CtrlSecret != "" {
				// A corrupted controller response must be refused.
				_, _, err = replayTranscript(t, tr, func(hc *HostConfig) { hc.CtrlSecret = mustSecret(t, otherKey) })
				var ae *Error
				if !errors.As(err, &ae) || ae.Remote {
					t.Fatalf("wrong controller secret: %v", err)
				}
			}
		})
	}
	if !kernels["6"] || !kernels["7"] {
		t.Errorf("transcripts from kernels %v, want 6.x and 7.x", kernels)
	}
	for _, want := range []string{"hmac(sha256)", "hmac(sha384)", "hmac(sha512)", "null", "ffdhe2048", "ffdhe3072", "ffdhe4096", "ffdhe6144", "ffdhe8192"} {
		if !seen[want] {
			t.Errorf("no transcript with %s", want)
		}
	}
}

func replayTranscript(t *testing.T, tr linuxTranscript, edit func(*HostConfig)) (*Result, *replay, error) {
	rnd, err := hex.DecodeString(tr.Rand)
	if err != nil {
		t.Fatal(err)
	}
	hc := &HostConfig{HostNQN: tr.HostNQN, SubsysNQN: tr.SubsysNQN, Secret: mustSecret(t, tr.HostSecret), Rand: bytes.NewReader(rnd)}
	if tr.CtrlSecret != "" {
		hc.CtrlSecret = mustSecret(t, tr.CtrlSecret)
	}
	if edit != nil {
		edit(hc)
	}
	r := &replay{msgs: tr.Messages}
	h, _ := hex.DecodeString(strings.TrimPrefix(tr.Messages[0], "send "))
	tid, _ := ParseHeader(h)
	res, err := Authenticate(context.Background(), r, hc, tid.TID)
	return res, r, err
}
