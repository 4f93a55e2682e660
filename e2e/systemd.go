package e2e

import "os/exec"

// systemdPrograms are systemd's service manager and systemctl, when the host
// has them, so that the unit's guest test (systemd.TestGuestSystemdUnit)
// can run the unit under a real manager; without them that test skips and
// says why.
func systemdPrograms() []string {
	var progs []string
	for _, p := range []string{"/lib/systemd/systemd", "systemctl"} {
		if _, err := exec.LookPath(p); err == nil {
			progs = append(progs, p)
		}
	}
	return progs
}
