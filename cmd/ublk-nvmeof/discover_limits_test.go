package main

import (
	"net"
	"strings"
	"testing"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/scripted"
)

// TestDiscoverRefusesBadMDTS: `discover` against a discovery controller
// reporting MDTS 51, 52 or 255 (a shift past 63 bits, or a chunk of zero
// bytes, before the bound) exits with a one-line error naming MDTS: no
// panic, no endless log page loop, no goroutine left (the command checks at
// exit).
func TestDiscoverRefusesBadMDTS(t *testing.T) {
	for _, mdts := range []uint8{51, 52, 255} {
		script := &scripted.Script{Reply: func(c *scripted.Command, r scripted.Reply) scripted.Reply {
			if c.Cmd.Opcode() == nvme.NVME_ADMIN_IDENTIFY && uint8(c.Cmd.CDW(10)) == nvme.NVME_ID_CNS_CTRL {
				r.Data[77] = mdts // Identify Controller MDTS
			}
			return r
		}}
		srv, err := scripted.Listen("127.0.0.1:0", script)
		if err != nil {
			t.Fatal(err)
		}
		host, port, _ := net.SplitHostPort(srv.Addr().String())
		out, stderr, code := runCLI(t, "discover", "-a", host, "-s", port)
		srv.Close()
		msg := strings.TrimSpace(stderr)
		if code != exitFailure || !strings.Contains(msg, "MDTS") || strings.Contains(msg, "\n") || strings.Contains(msg, "panic") {
			t.Errorf("MDTS %d: exit %d, stdout %q, stderr %q; want exit %d and one line naming MDTS", mdts, code, out, stderr, exitFailure)
		}
	}
}
