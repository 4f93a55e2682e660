package attach

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const (
	testSecretA = "DHHC-1:01:bHuByyp0b3RFSx1xQPMVO1HKmUWfzveoahfydpW4fNgSLMVm:"
	testSecretB = "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:"
	testSecretC = "DHHC-1:03:6Sk/KoEx2yBxvZz2+MVzAw15dsEOjogC/Dcj/9iyvG4qXaA0fd0gfgsqx9dEplu9B2192fQw9dYGrvAEY/4u+zR22jo=:"
)

func TestAuthOptionsValidate(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good")
	bad := filepath.Join(dir, "bad")
	if err := os.WriteFile(good, []byte(testSecretA+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bad, []byte(strings.Replace(testSecretA, "bHu", "cHu", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	corrupt := strings.Replace(testSecretC, "6Sk", "7Sk", 1)
	for _, tc := range []struct {
		a       AuthOptions
		wantErr string
	}{
		{AuthOptions{}, ""},
		{AuthOptions{DHChapSecret: testSecretA}, ""},
		{AuthOptions{DHChapSecretFile: good, DHChapCtrlSecret: testSecretC}, ""},
		{AuthOptions{DHChapSecret: testSecretA, DHChapSecretFile: good}, "give one"},
		{AuthOptions{DHChapSecret: testSecretA, DHChapCtrlSecret: testSecretC, DHChapCtrlSecretFile: good}, "give one"},
		{AuthOptions{DHChapCtrlSecret: testSecretC}, "needs --dhchap-secret"},
		{AuthOptions{DHChapSecret: "DHHC-1:01:xyz:"}, "--dhchap-secret: "},
		{AuthOptions{DHChapSecret: testSecretA, DHChapCtrlSecret: corrupt}, "--dhchap-ctrl-secret: invalid DH-HMAC-CHAP secret: CRC mismatch"},
		{AuthOptions{DHChapSecretFile: bad}, "--dhchap-secret-file: " + bad},
		{AuthOptions{DHChapSecretFile: filepath.Join(dir, "missing")}, "no such file"},
	} {
		err := tc.a.validateAuth()
		if tc.wantErr == "" {
			if err != nil {
				t.Errorf("%+v: %v", tc.a, err)
			}
			continue
		}
		if !errors.Is(err, ErrInvalidOptions) || !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("%+v: %v, want ErrInvalidOptions with %q", tc.a, err, tc.wantErr)
			continue
		}
		for _, s := range []string{testSecretA, corrupt, "bHuByyp0b3RF", "cHuByyp0b3RF", "7Sk/KoEx"} {
			if strings.Contains(err.Error(), s) {
				t.Errorf("error repeats the secret: %v", err)
			}
		}
	}
}

// TestAuthConfigRereadsFiles: the connector's secrets come from the file
// at every connect, so a rotated secret is used by the next association.
func TestAuthConfigRereadsFiles(t *testing.T) {
	p := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(p, []byte(testSecretA), 0o600); err != nil {
		t.Fatal(err)
	}
	a := AuthOptions{DHChapSecretFile: p}
	if (&AuthOptions{}).authConfig() != nil {
		t.Fatal("an AuthConfig without secrets")
	}
	cfg := a.authConfig()
	h, c, err := cfg.Secrets()
	if err != nil || c != nil || h.String() != testSecretA {
		t.Fatalf("%v %v %v", h, c, err)
	}
	if err := os.WriteFile(p+".new", []byte(testSecretB), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(p+".new", p); err != nil {
		t.Fatal(err)
	}
	if h, _, err = cfg.Secrets(); err != nil || h.String() != testSecretB {
		t.Fatalf("after rotation: %v %v", h, err)
	}
	if err := os.WriteFile(p, []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err = cfg.Secrets(); !errors.Is(err, ErrInvalidOptions) {
		t.Fatalf("a bad rotated file: %v", err)
	}
}
