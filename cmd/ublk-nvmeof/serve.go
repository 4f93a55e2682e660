package main

import (
	"fmt"
	"io"
	"math/bits"
	"strconv"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/ublk-nvmeof/ublk-nvmeof/attach"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
)

// serveCommand runs the in-process NVMe/TCP target (package nvmeof/target)
// exporting a file, a block device or memory as one namespace.
func serveCommand(stdout io.Writer) *cli.Command {
	return &cli.Command{
		Name:  "serve",
		Usage: "export a file, block device or memory as an NVMe/TCP subsystem (the in-process target; for tests and demos)",
		Description: "Any host may connect unless --allow-host names the admitted host NQNs.\n\n" +
			"Limits a host cannot get past: until a queue's Fabrics Connect has admitted the host (and, with\n" +
			"--dhchap-secret-file, it has authenticated) nothing is allocated for its commands; a connection\n" +
			"holds at most SQSIZE commands (MAXCMD on I/O queues) and at most 4 MiB of write data waiting\n" +
			"for its H2CData (one command at most 1 MiB, MDTS 8): further writes wait for their R2T with\n" +
			"nothing allocated. A host that sends a command before Connect, more commands than SQSIZE, or\n" +
			"data beyond what ICResp and Identify announced is disconnected (C2HTermReq). At most\n" +
			"--max-connections connections are served at once: with the default 64, write buffers\n" +
			"stay under 64 x 4 MiB however many clients connect.",
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "listen", Value: "127.0.0.1:4420", Usage: "address to listen on (port 0: any free port)", EnvVars: env("SERVE_LISTEN")},
			&cli.StringFlag{Name: "nqn", Aliases: []string{"n"}, Usage: "subsystem NQN", EnvVars: env("SERVE_NQN")},
			&cli.StringFlag{Name: "file", Usage: "file or block device to export (created if missing)", EnvVars: env("SERVE_FILE")},
			&cli.StringFlag{Name: "size", Usage: "size: memory to export, or to grow --file to (e.g. 64M, 1G)", EnvVars: env("SERVE_SIZE")},
			&cli.IntFlag{Name: "block-size", Value: 512, Usage: "logical block size, a power of two from 512 to 65536", EnvVars: env("SERVE_BLOCK_SIZE")},
			&cli.IntFlag{Name: "max-connections", Value: 64, Usage: "connections (queues) served at once, 1 to 65535; one more is closed when accepted", EnvVars: env("SERVE_MAX_CONNECTIONS")},
			&cli.StringSliceFlag{Name: "allow-host", Usage: "host NQN admitted to the subsystem (repeatable); without it any host may connect", EnvVars: env("SERVE_ALLOW_HOST")},
		}, serveAuthFlags()...),
		Action: func(c *cli.Context) error {
			nqn := c.String("nqn")
			if err := nvmeof.ValidateNQN(nqn); err != nil {
				return fmt.Errorf("%w: --nqn: %w", attach.ErrInvalidOptions, err)
			}
			bs := c.Int("block-size")
			if bs < 512 || bs > 65536 || bs&(bs-1) != 0 {
				return fmt.Errorf("%w: --block-size %d: a power of two from 512 to 65536", attach.ErrInvalidOptions, bs)
			}
			var size int64
			if s := c.String("size"); s != "" {
				var err error
				if size, err = parseSize(s); err != nil {
					return fmt.Errorf("%w: --size: %w", attach.ErrInvalidOptions, err)
				}
			}
			var backend target.Backend
			switch file := c.String("file"); {
			case file != "":
				fb, err := target.OpenFileBackend(file, size)
				if err != nil {
					return fmt.Errorf("--file: %w", err)
				}
				defer fb.Close()
				backend = fb
			case size > 0:
				backend = target.NewMemoryBackend(size)
			default:
				return fmt.Errorf("%w: --file or --size is required", attach.ErrInvalidOptions)
			}
			if backend.Size() < int64(bs) {
				return fmt.Errorf("%w: the namespace is smaller than one %d-byte block", attach.ErrInvalidOptions, bs)
			}
			maxConns := c.Int("max-connections")
			if maxConns < 1 || maxConns > 65535 {
				return fmt.Errorf("%w: --max-connections %d: must be 1 to 65535", attach.ErrInvalidOptions, maxConns)
			}
			for _, h := range c.StringSlice("allow-host") {
				if err := nvmeof.ValidateNQN(h); err != nil {
					return fmt.Errorf("%w: --allow-host: %w", attach.ErrInvalidOptions, err)
				}
			}

			authCfg, err := serveAuth(c)
			if err != nil {
				return err
			}
			t := target.New(target.Config{AllowedHosts: c.StringSlice("allow-host"), Auth: authCfg, MaxConnections: maxConns})
			defer t.Close()
			sub, err := t.AddSubsystem(nqn)
			if err != nil {
				return err
			}
			if err := sub.AddNamespace(target.NamespaceConfig{NSID: 1, Backend: backend, BlockShift: uint8(bits.TrailingZeros(uint(bs)))}); err != nil {
				return err
			}
			addr, err := t.Listen(c.String("listen"))
			if err != nil {
				return fmt.Errorf("--listen: %w", err)
			}
			fmt.Fprintf(stdout, "serving %s namespace 1 (%d bytes) on %s\n", nqn, backend.Size(), addr)
			ctx, _, stop := signalContext()
			defer stop()
			<-ctx.Done()
			return nil
		},
	}
}

// parseSize reads a byte count with an optional K, M, G or T suffix
// (powers of 1024).
func parseSize(s string) (int64, error) {
	mult := int64(1)
	t := strings.TrimSuffix(strings.ToUpper(strings.TrimSpace(s)), "B")
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'K':
			mult = 1 << 10
		case 'M':
			mult = 1 << 20
		case 'G':
			mult = 1 << 30
		case 'T':
			mult = 1 << 40
		}
		if mult > 1 {
			t = t[:n-1]
		}
	}
	v, err := strconv.ParseInt(t, 10, 64)
	if err != nil || v <= 0 || v > (1<<62)/mult {
		return 0, fmt.Errorf("%q is not a size", s)
	}
	return v * mult, nil
}
