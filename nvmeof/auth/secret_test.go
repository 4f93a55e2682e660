package auth

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestSecretNvmeCLI checks parsing and the key transformation against
// nvme-cli's gen-dhchap-key (an independent implementation: libnvme with
// OpenSSL), whose output for a given secret is the transformed key when
// --hmac is not 0.
func TestSecretNvmeCLI(t *testing.T) {
	f, err := os.Open("testdata/nvme-cli-gen-dhchap-key.txt")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n := 0
	for sc := bufio.NewScanner(f); sc.Scan(); {
		line := sc.Text()
		if strings.HasPrefix(line, "#") || line == "" {
			continue
		}
		fs := strings.Fields(line)
		if len(fs) != 5 {
			t.Fatalf("bad line %q", line)
		}
		m, _ := strconv.Atoi(fs[0])
		l, _ := strconv.Atoi(fs[1])
		nqn, out := fs[2], fs[4]
		raw, err := hex.DecodeString(fs[3])
		if err != nil {
			t.Fatal(err)
		}
		s, err := ParseSecret(out)
		if err != nil {
			t.Fatalf("%s: %v", out, err)
		}
		if s.Transform != HashID(m) || len(s.Key) != l {
			t.Errorf("%s: transform %d, %d bytes; want %d, %d", out, s.Transform, len(s.Key), m, l)
		}
		want := (&Secret{Transform: HashID(m), Key: raw}).TransformKey(nqn)
		if !bytes.Equal(s.Key, want) {
			t.Errorf("%s: key %x, want the transformation %x", out, s.Key, want)
		}
		if s.String() != out {
			t.Errorf("String() %q, want %q", s.String(), out)
		}
		n++
	}
	if n < 9 {
		t.Fatalf("only %d vectors", n)
	}
}

func TestParseSecretRejects(t *testing.T) {
	good := "DHHC-1:01:bHuByyp0b3RFSx1xQPMVO1HKmUWfzveoahfydpW4fNgSLMVm:"
	if _, err := ParseSecret(good); err != nil {
		t.Fatal(err)
	}
	if _, err := ParseSecret(" " + strings.TrimSuffix(good, ":") + "\n"); err != nil {
		t.Errorf("no final colon, white space: %v", err)
	}
	for _, s := range []string{
		"",
		"DHHC-2:01:bHuByyp0b3RFSx1xQPMVO1HKmUWfzveoahfydpW4fNgSLMVm:",
		"DHHC-1:04:bHuByyp0b3RFSx1xQPMVO1HKmUWfzveoahfydpW4fNgSLMVm:",
		"DHHC-1:1:bHuByyp0b3RFSx1xQPMVO1HKmUWfzveoahfydpW4fNgSLMVm:",
		"DHHC-1:01:cHuByyp0b3RFSx1xQPMVO1HKmUWfzveoahfydpW4fNgSLMVm:", // CRC
		"DHHC-1:01:bHuByyp0b3RFSx1xQPMVO1HKmUWfzveoahfydpW4fNgSLMV:",  // base64
		"DHHC-1:02:bHuByyp0b3RFSx1xQPMVO1HKmUWfzveoahfydpW4fNgSLMVm:", // 32 bytes for SHA-384
		"DHHC-1:00:AAECAwQ=:",
		"DHHC-1:00:" + strings.Repeat("A", 200) + ":",
	} {
		_, err := ParseSecret(s)
		if !errors.Is(err, ErrSecret) {
			t.Errorf("%q: %v, want ErrSecret", s, err)
			continue
		}
		if b64 := strings.Split(s, ":"); len(b64) > 2 && len(b64[2]) > 8 && strings.Contains(err.Error(), b64[2]) {
			t.Errorf("the error repeats the secret: %v", err)
		}
	}
}

func TestReadSecretFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "key")
	if err := os.WriteFile(p, []byte("DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := ReadSecretFile(p)
	if err != nil || len(s.Key) != 32 || s.Key[31] != 0x1f {
		t.Fatalf("%v %v", s, err)
	}
	if err := os.WriteFile(p, []byte("DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaS:\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadSecretFile(p); !errors.Is(err, ErrSecret) || !strings.Contains(err.Error(), p) {
		t.Fatalf("%v", err)
	}
}
