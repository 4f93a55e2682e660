package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestDHChapOptions: a bad secret, from the command line, the environment
// or a file, is a usage error on one line that does not repeat it; so are
// serve's bad settings.
func TestDHChapOptions(t *testing.T) {
	const bad = "DHHC-1:01:cHuByyp0b3RFSx1xQPMVO1HKmUWfzveoahfydpW4fNgSLMVm:" // CRC mismatch
	file := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(file, []byte(bad), 0o600); err != nil {
		t.Fatal(err)
	}
	base := []string{"attach", "-a", "127.0.0.1", "-n", "nqn.2014-08.org.example:x"}
	for _, tc := range []struct {
		args []string
		env  string
		want string
	}{
		{[]string{"-S", bad}, "", "--dhchap-secret: invalid DH-HMAC-CHAP secret: CRC mismatch"},
		{[]string{"--dhchap-secret-file", file}, "", "--dhchap-secret-file: " + file},
		{[]string{"-C", bad}, "", "--dhchap-ctrl-secret needs --dhchap-secret"},
		{nil, "UBLK_NVMEOF_DHCHAP_SECRET=" + bad, "--dhchap-secret: invalid DH-HMAC-CHAP secret"},
	} {
		if tc.env != "" {
			k, v, _ := strings.Cut(tc.env, "=")
			t.Setenv(k, v)
		}
		_, stderr, code := runCLI(t, append(base, tc.args...)...)
		if code != exitUsage || !strings.Contains(stderr, tc.want) || strings.Count(stderr, "\n") != 1 || strings.Contains(stderr, "cHuByyp0") {
			t.Errorf("%v %s: exit %d, stderr %q; want %d with %q", tc.args, tc.env, code, stderr, exitUsage, tc.want)
		}
		if tc.env != "" {
			os.Unsetenv(strings.SplitN(tc.env, "=", 2)[0])
		}
	}
	good := filepath.Join(t.TempDir(), "good")
	if err := os.WriteFile(good, []byte("DHHC-1:01:bHuByyp0b3RFSx1xQPMVO1HKmUWfzveoahfydpW4fNgSLMVm:\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	serve := []string{"serve", "--listen", "127.0.0.1:0", "--nqn", "nqn.2014-08.org.example:x", "--size", "1M"}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--dhchap-secret-file", file}, "--dhchap-secret-file: " + file},
		{[]string{"--dhchap-ctrl-secret-file", good}, "--dhchap-ctrl-secret-file needs --dhchap-secret-file"},
		{[]string{"--dhchap-secret-file", good, "--dhchap-hash", "md5"}, "--dhchap-hash: unknown DH-HMAC-CHAP hash"},
		{[]string{"--dhchap-secret-file", good, "--dhchap-dhgroup", "ffdhe1024"}, "--dhchap-dhgroup: unknown DH-HMAC-CHAP DH group"},
	} {
		_, stderr, code := runCLI(t, append(serve, tc.args...)...)
		if code != exitUsage || !strings.Contains(stderr, tc.want) || strings.Count(stderr, "\n") != 1 {
			t.Errorf("serve %v: exit %d, stderr %q; want %d with %q", tc.args, code, stderr, exitUsage, tc.want)
		}
	}
	out, _, _ := runCLI(t, "attach", "--help")
	for _, want := range []string{"--dhchap-secret-file", "--dhchap-ctrl-secret-file", "-S", "-C", "LEAKS", "UBLK_NVMEOF_DHCHAP_SECRET_FILE"} {
		if !strings.Contains(out, want) {
			t.Errorf("attach --help lacks %q", want)
		}
	}
}

// TestDiscoverSecurityFields: discover prints TREQ and the TCP security
// type as nvme-cli does.
func TestDiscoverSecurityFields(t *testing.T) {
	for treq, want := range map[uint8]string{0: "not specified", 1: "required", 2: "not required", 3: "reserved (3)", 4: "not specified, sq flow control disable supported", 5: "required, sq flow control disable supported"} {
		if got := treqString(treq); got != want {
			t.Errorf("treq %d: %q, want %q", treq, got, want)
		}
	}
	for st, want := range map[uint8]string{0: "none", 1: "tls1.2", 2: "tls1.3", 9: "reserved (9)"} {
		if got := sectypeString(3, st); got != want {
			t.Errorf("sectype %d: %q, want %q", st, got, want)
		}
	}
}
