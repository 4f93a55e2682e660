package attach

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
)

func testNamespace() *nvmeof.Namespace {
	return &nvmeof.Namespace{NSID: 1, Blocks: 2048, BlockShift: 12,
		NGUID: [16]byte{0xa1, 2, 3}, EUI64: [8]byte{0xe1}, UUID: [16]byte{0x55, 1}}
}

// The run record keeps the namespace's identity across a JSON round trip,
// and attach --recover takes a device over only for the same namespace,
// whatever its size now; another one is refused with one line that
// matches ErrNoNamespace (exit status 7).
func TestRecordNamespaceIdentity(t *testing.T) {
	o := Options{TrAddr: "127.0.0.1", TrSvcID: "4420", NQN: "nqn.2026-11.io.ublk-nvmeof:t", NSID: 1}
	b, err := json.Marshal(newRecord(3, o, testNamespace()))
	if err != nil {
		t.Fatal(err)
	}
	var r record
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatal(err)
	}
	if err := r.checkNamespace(testNamespace()); err != nil {
		t.Fatalf("the same namespace refused: %v", err)
	}
	grown := testNamespace()
	grown.Blocks *= 2
	if err := r.checkNamespace(grown); err != nil {
		t.Errorf("the same namespace, grown, refused: %v", err)
	}
	for name, mut := range map[string]func(*nvmeof.Namespace){
		"NGUID":      func(n *nvmeof.Namespace) { n.NGUID[15] = 9 },
		"EUI64":      func(n *nvmeof.Namespace) { n.EUI64[7] = 9 },
		"UUID":       func(n *nvmeof.Namespace) { n.UUID[15] = 9 },
		"block size": func(n *nvmeof.Namespace) { n.BlockShift = 9; n.Blocks <<= 3 },
	} {
		other := testNamespace()
		mut(other)
		err := r.checkNamespace(other)
		if !errors.Is(err, ErrOtherNamespace) || !errors.Is(err, ErrNoNamespace) {
			t.Errorf("%s changed: %v, want ErrOtherNamespace and ErrNoNamespace", name, err)
			continue
		}
		if msg := err.Error(); strings.Contains(msg, "\n") || !strings.Contains(msg, name) || !strings.Contains(msg, "/dev/ublkb3") {
			t.Errorf("%s changed: error %q is not one line naming the device and %s", name, msg, name)
		}
	}
}

// Without identifiers to compare (a record written before they were kept,
// or a namespace reporting none) only the same size is taken over.
func TestRecordWithoutIdentity(t *testing.T) {
	ns := testNamespace()
	old := record{DevID: 0, NSID: 1, Size: ns.Blocks << ns.BlockShift}
	if err := old.checkNamespace(ns); err != nil {
		t.Errorf("an old record of the same size refused: %v", err)
	}
	ns.Blocks++
	if err := old.checkNamespace(ns); !errors.Is(err, ErrOtherNamespace) {
		t.Errorf("an old record of another size: %v, want ErrOtherNamespace", err)
	}
	anon := testNamespace()
	anon.NGUID, anon.EUI64, anon.UUID = [16]byte{}, [8]byte{}, [16]byte{}
	r := newRecord(0, Options{}, anon)
	anon.Blocks++
	if err := r.checkNamespace(anon); !errors.Is(err, ErrOtherNamespace) {
		t.Errorf("a namespace without identifiers, another size: %v, want ErrOtherNamespace", err)
	}
}
