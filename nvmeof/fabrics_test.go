package nvmeof

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestValidateNQN(t *testing.T) {
	good := []string{
		"nqn.2014-08.org.nvmexpress.discovery",
		"nqn.2014-08.org.nvmexpress:uuid:5f2b8a52-1d6e-4c1b-9a55-3c0e8d7f6a01",
		"nqn.2026-11.io.ublk-nvmeof:test",
		"nqn.2016-06.io.spdk:cnode1",
		"nqn.2024-01.com.example",
		"nqn.2024-01.com.example:" + strings.Repeat("x", 223-len("nqn.2024-01.com.example:")),
	}
	for _, n := range good {
		if err := ValidateNQN(n); err != nil {
			t.Errorf("ValidateNQN(%q) = %v", n, err)
		}
	}
	bad := []string{
		"",
		"iqn.2024-01.com.example:x",
		"nqn.24-01.com.example:x",
		"nqn.2024-13.com.example:x",
		"nqn.2024-01.:x",
		"nqn.2024-01.-bad.com:x",
		"nqn.2014-08.org.nvmexpress:uuid:not-a-uuid",
		"nqn.2024-01.com.example:" + strings.Repeat("x", 224-len("nqn.2024-01.com.example:")),
		"nqn.2024-01.com.example:a\x00b",
	}
	for _, n := range bad {
		err := ValidateNQN(n)
		if !errors.Is(err, ErrInvalidNQN) {
			t.Errorf("ValidateNQN(%q) = %v, want ErrInvalidNQN", n, err)
		}
	}
}

func TestUUIDRoundTrip(t *testing.T) {
	s := "5f2b8a52-1d6e-4c1b-9a55-3c0e8d7f6a01"
	u, err := ParseUUID(s)
	if err != nil || FormatUUID(u) != s {
		t.Fatalf("%v %q", err, FormatUUID(u))
	}
	for _, b := range []string{"", "5f2b8a52-1d6e-4c1b-9a55-3c0e8d7f6a0", "5f2b8a52x1d6e-4c1b-9a55-3c0e8d7f6a01", "zf2b8a52-1d6e-4c1b-9a55-3c0e8d7f6a01"} {
		if _, err := ParseUUID(b); err == nil {
			t.Errorf("ParseUUID(%q) accepted", b)
		}
	}
}

func TestLoadHostIdentity(t *testing.T) {
	dir := t.TempDir()
	nqnPath, idPath := filepath.Join(dir, "hostnqn"), filepath.Join(dir, "hostid")
	const id = "5f2b8a52-1d6e-4c1b-9a55-3c0e8d7f6a01"

	// Neither file: a fresh UUID NQN whose UUID is the host ID.
	h, err := loadHostIdentity(nqnPath, idPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := ValidateNQN(h.NQN); err != nil || h.NQN != uuidNQNPrefix+FormatUUID(h.ID) {
		t.Fatalf("generated %+v: %v", h, err)
	}

	// Only the NQN, in UUID form: the host ID comes from it.
	os.WriteFile(nqnPath, []byte(uuidNQNPrefix+id+"\n"), 0o644)
	h, err = loadHostIdentity(nqnPath, idPath)
	if err != nil || FormatUUID(h.ID) != id {
		t.Fatalf("%+v %v", h, err)
	}

	// Both, as nvme-cli writes them.
	os.WriteFile(nqnPath, []byte("nqn.2026-11.io.example:host1\n"), 0o644)
	os.WriteFile(idPath, []byte(id+"\n"), 0o644)
	h, err = loadHostIdentity(nqnPath, idPath)
	if err != nil || h.NQN != "nqn.2026-11.io.example:host1" || FormatUUID(h.ID) != id {
		t.Fatalf("%+v %v", h, err)
	}

	// Garbage is a clear error naming the file.
	os.WriteFile(nqnPath, []byte("not an nqn\n"), 0o644)
	if _, err := loadHostIdentity(nqnPath, idPath); !errors.Is(err, ErrInvalidNQN) || !strings.Contains(err.Error(), nqnPath) {
		t.Fatalf("bad hostnqn: %v", err)
	}
	os.WriteFile(nqnPath, []byte("nqn.2026-11.io.example:host1\n"), 0o644)
	os.WriteFile(idPath, []byte("xyz\n"), 0o644)
	if _, err := loadHostIdentity(nqnPath, idPath); err == nil || !strings.Contains(err.Error(), idPath) {
		t.Fatalf("bad hostid: %v", err)
	}
}
