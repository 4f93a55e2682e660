package main

import (
	"fmt"

	"github.com/urfave/cli/v2"

	"github.com/ublk-nvmeof/ublk-nvmeof/attach"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/auth"
)

// serveAuthFlags are serve's DH-HMAC-CHAP settings, as Linux nvmet's
// per-host dhchap_key, dhchap_ctrl_key, dhchap_hash and dhchap_dhgroup,
// here the same for every host allowed to connect.
func serveAuthFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "dhchap-secret-file", EnvVars: env("SERVE_DHCHAP_SECRET_FILE"),
			Usage: "require DH-HMAC-CHAP: hosts must prove they hold the secret in this file (DHHC-1:..., nvme gen-dhchap-key)"},
		&cli.StringFlag{Name: "dhchap-ctrl-secret-file", EnvVars: env("SERVE_DHCHAP_CTRL_SECRET_FILE"),
			Usage: "the controller's secret, for hosts that ask for bidirectional authentication"},
		&cli.StringFlag{Name: "dhchap-hash", Value: "sha256", EnvVars: env("SERVE_DHCHAP_HASH"),
			Usage: "hash to choose when the host offers it: sha256, sha384 or sha512"},
		&cli.StringFlag{Name: "dhchap-dhgroup", Value: "null", EnvVars: env("SERVE_DHCHAP_DHGROUP"),
			Usage: "DH group to choose when the host offers it: null, ffdhe2048, ffdhe3072, ffdhe4096, ffdhe6144 or ffdhe8192"},
	}
}

// serveAuth turns the flags into target.Config.Auth; nil without
// --dhchap-secret-file.
func serveAuth(c *cli.Context) (func(hostNQN, subsysNQN string) *auth.ControllerConfig, error) {
	file, ctrlFile := c.String("dhchap-secret-file"), c.String("dhchap-ctrl-secret-file")
	if file == "" {
		if ctrlFile != "" {
			return nil, fmt.Errorf("%w: --dhchap-ctrl-secret-file needs --dhchap-secret-file", attach.ErrInvalidOptions)
		}
		return nil, nil
	}
	cfg := auth.ControllerConfig{}
	var err error
	if cfg.HostSecret, err = auth.ReadSecretFile(file); err != nil {
		return nil, fmt.Errorf("%w: --dhchap-secret-file: %w", attach.ErrInvalidOptions, err)
	}
	if ctrlFile != "" {
		if cfg.CtrlSecret, err = auth.ReadSecretFile(ctrlFile); err != nil {
			return nil, fmt.Errorf("%w: --dhchap-ctrl-secret-file: %w", attach.ErrInvalidOptions, err)
		}
	}
	if cfg.Hash, err = auth.ParseHash(c.String("dhchap-hash")); err != nil {
		return nil, fmt.Errorf("%w: --dhchap-hash: %w", attach.ErrInvalidOptions, err)
	}
	if cfg.DHGroup, err = auth.ParseDHGroup(c.String("dhchap-dhgroup")); err != nil {
		return nil, fmt.Errorf("%w: --dhchap-dhgroup: %w", attach.ErrInvalidOptions, err)
	}
	return func(string, string) *auth.ControllerConfig { cc := cfg; return &cc }, nil
}
