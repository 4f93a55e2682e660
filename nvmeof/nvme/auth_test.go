package nvme

import (
	"encoding/hex"
	"testing"
)

// TestAuthCommands checks the Authentication Send/Receive layout against
// struct nvmf_auth_send_command / nvmf_auth_receive_command: opcode 7fh,
// fctype at 4, spsp0 41, spsp1 42, secp 43, tl/al 44 (little endian).
func TestAuthCommands(t *testing.T) {
	var c Command
	c.SetAuthSend(AuthCommand{SECP: 0xe9, SPSP0: 1, SPSP1: 1, Length: 0x448})
	want := "7f00000005" + zeros(35) + "000101e948040000" + zeros(16)
	if got := hex.EncodeToString(c[:]); got != want {
		t.Fatalf("auth send\n%s\nwant\n%s", got, want)
	}
	if a := c.AuthCommand(); a != (AuthCommand{SECP: 0xe9, SPSP0: 1, SPSP1: 1, Length: 0x448}) || c.FabricsType() != NVME_FABRICS_TYPE_AUTH_SEND {
		t.Fatalf("decoded %+v", a)
	}
	c.SetAuthReceive(AuthCommand{SECP: 0xe9, SPSP0: 1, SPSP1: 1, Length: 4096})
	if c[4] != NVME_FABRICS_TYPE_AUTH_RECEIVE || c.AuthCommand().Length != 4096 {
		t.Fatalf("auth receive %x", c[:])
	}
}

func zeros(n int) string {
	b := make([]byte, n)
	return hex.EncodeToString(b)
}
