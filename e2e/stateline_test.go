package e2e

import "testing"

// The daemon's state lines, as the scenarios parse them: the old form and
// the one with the controller's and the device's attributes.
func TestStateLine(t *testing.T) {
	for _, tc := range []struct{ line, from, to, reason string }{
		{`time=2026-11-25T07:00:00.000Z level=INFO msg="controller state" from=LIVE to=RESETTING reason="nvmeof: queue 2: unexpected EOF"`,
			"LIVE", "RESETTING", `"nvmeof: queue 2: unexpected EOF"`},
		{`time=2026-11-25T07:00:00.000Z level=INFO msg="controller state" subsys=nqn.2026-11.io.ublk-nvmeof:scenario-a addr=127.0.0.1:4470 from=CONNECTING to=LIVE reason=reconnected device=/dev/ublkb0`,
			"CONNECTING", "LIVE", "reconnected"},
		{`time=2026-11-25T07:00:00.000Z level=INFO msg="controller state" subsys=nqn.x addr="[::1]:4420" from=LIVE to=DELETING reason="a \"quoted\" cause" device=/dev/ublkb1`,
			"LIVE", "DELETING", `"a \"quoted\" cause"`},
	} {
		m := stateLine.FindStringSubmatch(tc.line)
		if m == nil || m[1] != tc.from || m[2] != tc.to || m[3] != tc.reason {
			t.Errorf("%s\nparsed %q, want from %s to %s reason %s", tc.line, m, tc.from, tc.to, tc.reason)
		}
	}
	if stateLine.MatchString(`level=WARN msg="controller error, recovering" from=x to=y`) {
		t.Error("matched a line that is not a state change")
	}
}
