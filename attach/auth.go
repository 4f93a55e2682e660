package attach

import (
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/auth"
)

// DH-HMAC-CHAP secrets (nvme connect --dhchap-secret/-S and
// --dhchap-ctrl-secret/-C), each given as the DHHC-1 string itself or as
// a file holding it. The file is the form to use: a secret on the command
// line is visible to every user in ps, and one in a unit's environment
// file in systemctl show. A file is read again at every reconnect, so a
// secret rotated on the target and in the file is used by the next
// association.
type AuthOptions struct {
	DHChapSecret         string // the host's secret
	DHChapSecretFile     string
	DHChapCtrlSecret     string // the controller's: bidirectional authentication
	DHChapCtrlSecretFile string
}

// validateAuth checks the secrets (reading the files once) without ever
// repeating one in an error.
func (a *AuthOptions) validateAuth() error {
	if a.DHChapSecret != "" && a.DHChapSecretFile != "" {
		return invalid("--dhchap-secret and --dhchap-secret-file: give one")
	}
	if a.DHChapCtrlSecret != "" && a.DHChapCtrlSecretFile != "" {
		return invalid("--dhchap-ctrl-secret and --dhchap-ctrl-secret-file: give one")
	}
	hostSet := a.DHChapSecret != "" || a.DHChapSecretFile != ""
	ctrlSet := a.DHChapCtrlSecret != "" || a.DHChapCtrlSecretFile != ""
	if ctrlSet && !hostSet {
		return invalid("--dhchap-ctrl-secret needs --dhchap-secret: the host authenticates first")
	}
	_, _, err := a.secrets()
	return err
}

// secrets parses the secrets, reading the files now; nil, nil when none
// is set.
func (a *AuthOptions) secrets() (host, ctrl *auth.Secret, err error) {
	if host, err = secretFrom("--dhchap-secret", a.DHChapSecret, a.DHChapSecretFile); err != nil {
		return nil, nil, err
	}
	if ctrl, err = secretFrom("--dhchap-ctrl-secret", a.DHChapCtrlSecret, a.DHChapCtrlSecretFile); err != nil {
		return nil, nil, err
	}
	return host, ctrl, nil
}

func secretFrom(flag, value, file string) (*auth.Secret, error) {
	switch {
	case value != "":
		s, err := auth.ParseSecret(value)
		if err != nil {
			return nil, invalid("%s: %v", flag, err)
		}
		return s, nil
	case file != "":
		s, err := auth.ReadSecretFile(file)
		if err != nil {
			return nil, invalid("%s-file: %v", flag, err)
		}
		return s, nil
	}
	return nil, nil
}

// authConfig is the connector's nvmeof.AuthConfig: nil without a host
// secret, else one that reads the secrets (files again) at every connect.
func (a *AuthOptions) authConfig() *nvmeof.AuthConfig {
	if a.DHChapSecret == "" && a.DHChapSecretFile == "" {
		return nil
	}
	return &nvmeof.AuthConfig{Secrets: a.secrets}
}
