// Command ublk-nvmeof exposes a namespace of a remote NVMe/TCP controller
// as a Linux block device through the kernel's ublk driver.
//
//	ublk-nvmeof attach -a 192.0.2.10 -n nqn.2014-08.org.example:disk1
//
// Options follow nvme-cli's connect; each has an UBLK_NVMEOF_* environment
// variable (systemd/example.env). Exit statuses: see exitCode.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"
	"go.uber.org/goleak"

	"github.com/ublk-nvmeof/ublk-nvmeof/attach"
	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/ublk"
)

// Exit statuses, one per kind of failure a script may want to tell apart.
const (
	exitOK          = 0
	exitFailure     = 1 // anything else
	exitUsage       = 2 // bad flags or options
	exitPermission  = 3 // not root / no CAP_SYS_ADMIN
	exitNoKernel    = 4 // ublk_drv not loaded, or a kernel feature missing
	exitUnreachable = 5 // no TCP connection to the target
	exitRejected    = 6 // the target refused: unknown NQN, host not allowed
	exitNoNamespace = 7 // the namespace does not exist (--recover: the device served another)
	exitLost        = 8 // the controller was lost (ctrl_loss_tmo expired)
	exitNoDevice    = 9 // detach/status: no daemon serves that device
	// A second SIGTERM/SIGINT made the detach immediate: the device is
	// gone as after a graceful detach, but I/O in flight or held was
	// failed with EIO. Not 0, because applications may have seen errors;
	// the unit lists it in SuccessExitStatus (a requested stop).
	exitImmediate = 10
	exitServed    = 11 // detach --force: a live daemon serves that device
	// SIGUSR2 (the unit's RestartKillSignal: systemctl restart) handed
	// the device over to the next daemon instead of deleting it.
	exitHandedOver = attach.ExitHandedOver
)

func exitCode(err error) int {
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, attach.ErrInvalidOptions), errors.Is(err, nvmeof.ErrInvalidNQN):
		return exitUsage
	case errors.Is(err, os.ErrPermission), errors.Is(err, syscall.EPERM), errors.Is(err, syscall.EACCES):
		return exitPermission
	case errors.Is(err, ublk.ErrNotLoaded), errors.Is(err, ublk.ErrNotSupported):
		return exitNoKernel
	case errors.Is(err, attach.ErrUnreachable):
		return exitUnreachable
	case errors.Is(err, attach.ErrRejected):
		return exitRejected
	case errors.Is(err, attach.ErrNoNamespace):
		return exitNoNamespace
	case errors.Is(err, attach.ErrControllerLost):
		return exitLost
	case errors.Is(err, attach.ErrNoSuchDevice):
		return exitNoDevice
	case errors.Is(err, attach.ErrDetachedImmediately):
		return exitImmediate
	case errors.Is(err, attach.ErrServed):
		return exitServed
	case errors.Is(err, attach.ErrHandedOver):
		return exitHandedOver
	}
	return exitFailure
}

// envCheckGoroutines, set to 1 (the e2e VM sets it for every test), makes
// the command check before it exits that no goroutine outlived it, and
// exit with exitLeak if one did: the process would end them silently.
const envCheckGoroutines = "UBLK_NVMEOF_CHECK_GOROUTINES"

// exitLeak is the exit status when a goroutine outlived the command.
const exitLeak = 97

// envTestWedgeTeardown names a file; while it exists, a recovery teardown
// blocks for good before shutting the sockets, as a teardown bug would
// wedge it, while the rest of the daemon runs on. Only for the VM test
// that proves systemd's watchdog restarts such a daemon
// (systemd/unit_guest_test.go); nothing else sets it.
const envTestWedgeTeardown = "UBLK_NVMEOF_TEST_WEDGE_TEARDOWN"

func testWedgeTeardownHook() func(lifecycle.Step, bool) {
	path := os.Getenv(envTestWedgeTeardown)
	if path == "" {
		return nil
	}
	return func(s lifecycle.Step, done bool) {
		if s != lifecycle.StepShutdownSockets || done {
			return
		}
		if _, err := os.Stat(path); err != nil {
			return
		}
		slog.Error("test hook: wedging the teardown for good", "env", envTestWedgeTeardown, "step", s)
		select {} // until the process is killed
	}
}

func main() {
	code := run(os.Args)
	if os.Getenv(envCheckGoroutines) == "1" {
		code = checkGoroutines(code)
	}
	os.Exit(code)
}

// checkGoroutines returns code, or exitLeak if a goroutine other than the
// caller's is still running (goleak), and then says which.
func checkGoroutines(code int) int {
	if err := goleak.Find(); err != nil {
		fmt.Fprintf(os.Stderr, "ublk-nvmeof: goroutines left at exit (status was %d): %v\n", code, err)
		return exitLeak
	}
	return code
}

// run runs the command line and returns the exit status: main without the
// exit, so that a test can look at the process before it ends.
func run(args []string) int {
	app := newApp(os.Stdout, os.Stderr)
	err := app.Run(args)
	if err != nil {
		fmt.Fprintf(os.Stderr, "ublk-nvmeof: %s\n", oneLine(err))
	}
	return exitCode(err)
}

// setGOMAXPROCS gives the Go scheduler a P for each ublk queue thread on
// top of its default, unless GOMAXPROCS is set. A queue thread (one per
// hardware queue, locked to its OS thread) sleeps in io_uring_enter and
// needs a P each time it wakes; with one P a CPU it can wait behind the
// NVMe/TCP readers for a scheduler time slice (10-20 ms, seen in the VM's
// execution trace). With a P to spare the kernel's scheduler shares the
// CPUs instead (docs/perf: the 2-job rows gained 9 to 15 %).
func setGOMAXPROCS(queueThreads int) {
	if os.Getenv("GOMAXPROCS") != "" {
		return
	}
	runtime.GOMAXPROCS(runtime.GOMAXPROCS(0) + queueThreads)
}

// oneLine keeps an error message on one line, whatever it wraps.
func oneLine(err error) string {
	return strings.Join(strings.Fields(err.Error()), " ")
}

const envPrefix = "UBLK_NVMEOF_"

func env(name string) []string { return []string{envPrefix + name} }

// usageError makes a flag parsing error an ErrInvalidOptions, printed on
// one line instead of with the whole help text.
func usageError(_ *cli.Context, err error, _ bool) error {
	return fmt.Errorf("%w: %v", attach.ErrInvalidOptions, err)
}

func newApp(stdout, stderr io.Writer) *cli.App {
	app := &cli.App{
		Name:      "ublk-nvmeof",
		Usage:     "expose an NVMe/TCP namespace as a ublk block device",
		Writer:    stdout,
		ErrWriter: stderr,
		// Errors are printed once, by main, on one line.
		ExitErrHandler: func(*cli.Context, error) {},
		OnUsageError:   usageError,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "log-format", Value: "text", Usage: "text or json", EnvVars: env("LOG_FORMAT")},
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error", EnvVars: env("LOG_LEVEL")},
		},
		Before: func(c *cli.Context) error { return setupLogging(c, stderr) },
		Commands: []*cli.Command{
			attachCommand(stdout),
			recoverCommand(stdout),
			detachCommand(),
			listCommand(stdout),
			statusCommand(stdout),
			discoverCommand(stdout),
			serveCommand(stdout),
			versionCommand(stdout),
		},
	}
	for _, c := range app.Commands {
		c.OnUsageError = usageError
	}
	return app
}

func setupLogging(c *cli.Context, w io.Writer) error {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		return fmt.Errorf("%w: --log-level %q", attach.ErrInvalidOptions, c.String("log-level"))
	}
	opts := &slog.HandlerOptions{Level: level}
	switch c.String("log-format") {
	case "text":
		slog.SetDefault(slog.New(slog.NewTextHandler(w, opts)))
	case "json":
		slog.SetDefault(slog.New(slog.NewJSONHandler(w, opts)))
	default:
		return fmt.Errorf("%w: --log-format %q: text or json", attach.ErrInvalidOptions, c.String("log-format"))
	}
	return nil
}

func connectFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "traddr", Aliases: []string{"a"}, Usage: "target address", EnvVars: env("TRADDR")},
		&cli.StringFlag{Name: "trsvcid", Aliases: []string{"s"}, Value: attach.DefaultTrSvcID, Usage: "target port", EnvVars: env("TRSVCID")},
		&cli.StringFlag{Name: "hostnqn", Aliases: []string{"q"}, Usage: "host NQN (default /etc/nvme/hostnqn)", EnvVars: env("HOSTNQN")},
		&cli.StringFlag{Name: "hostid", Aliases: []string{"I"}, Usage: "host ID, a UUID (default /etc/nvme/hostid)", EnvVars: env("HOSTID")},
	}
}

func attachCommand(stdout io.Writer) *cli.Command {
	return connectCommand(stdout, "attach", "connect to an NVMe/TCP controller and expose a namespace as /dev/ublkbN (runs until signalled: SIGTERM detaches and deletes the device, SIGUSR2 hands it over to the next `attach --recover`)", false)
}

// recoverCommand is attach that must take over a device a crashed daemon
// left for the target (ublk user recovery).
func recoverCommand(stdout io.Writer) *cli.Command {
	return connectCommand(stdout, "recover", "take over the device a crashed daemon left for this target and serve it (runs until signalled)", true)
}

func connectCommand(stdout io.Writer, name, usage string, mustRecover bool) *cli.Command {
	d := attach.DefaultOptions()
	maxKATO := int(attach.MaxKeepAliveTmo / time.Second)
	maxTmo := int(attach.MaxTimeout / time.Second)
	cpus := runtime.NumCPU()
	flags := append(connectFlags(),
		&cli.StringFlag{Name: "nqn", Aliases: []string{"n"}, Usage: "subsystem NQN", EnvVars: env("NQN")},
		&cli.IntFlag{Name: "nr-io-queues", Aliases: []string{"i"}, Value: d.NrIOQueues,
			Usage:  fmt.Sprintf("I/O queues (and ublk hardware queues), 1-%d (the CPUs)", cpus),
			Action: inRange[int]("nr-io-queues", 1, cpus), EnvVars: env("NR_IO_QUEUES")},
		&cli.IntFlag{Name: "queue-size", Aliases: []string{"Q"}, Value: d.QueueSize,
			Usage:  fmt.Sprintf("I/O queue size, %d-%d (the controller may lower it: CAP.MQES+1, MAXCMD)", attach.MinQueueSize, attach.MaxQueueSize),
			Action: inRange[int]("queue-size", attach.MinQueueSize, attach.MaxQueueSize), EnvVars: env("QUEUE_SIZE")},
		&cli.IntFlag{Name: "keep-alive-tmo", Aliases: []string{"k"}, Value: int(d.KeepAliveTmo / time.Second),
			Usage:  fmt.Sprintf("keep-alive timeout, seconds, 0-%d (0: off; Connect carries milliseconds in 32 bits)", maxKATO),
			Action: inRange[int]("keep-alive-tmo", 0, maxKATO), EnvVars: env("KEEP_ALIVE_TMO")},
		&cli.IntFlag{Name: "reconnect-delay", Aliases: []string{"c"}, Value: int(d.ReconnectDelay / time.Second),
			Usage:  fmt.Sprintf("seconds between reconnect attempts, 1-%d", maxTmo),
			Action: inRange[int]("reconnect-delay", 1, maxTmo), EnvVars: env("RECONNECT_DELAY")},
		&cli.IntFlag{Name: "ctrl-loss-tmo", Aliases: []string{"l"}, Value: int(d.CtrlLossTmo / time.Second),
			Usage:  fmt.Sprintf("seconds to keep reconnecting, -1 (forever) to %d", maxTmo),
			Action: inRange[int]("ctrl-loss-tmo", -1, maxTmo), EnvVars: env("CTRL_LOSS_TMO")},
		&cli.IntFlag{Name: "fast-io-fail-tmo", Aliases: []string{"F"}, Value: -1,
			Usage:  fmt.Sprintf("seconds after which held I/O fails while reconnecting, -1 (off) to %d", maxTmo),
			Action: inRange[int]("fast-io-fail-tmo", -1, maxTmo), EnvVars: env("FAST_IO_FAIL_TMO")},
		&cli.BoolFlag{Name: "hdr-digest", Aliases: []string{"g"}, Usage: "NVMe/TCP header digest", EnvVars: env("HDR_DIGEST")},
		&cli.BoolFlag{Name: "data-digest", Aliases: []string{"G"}, Usage: "NVMe/TCP data digest", EnvVars: env("DATA_DIGEST")},
		&cli.StringFlag{Name: "zero-copy", Value: string(attach.UseAuto), EnvVars: env("ZERO_COPY"),
			Usage: "move data between the request's pages and the socket, not through the daemon's buffers (ublk AUTO_BUF_REG, Linux 6.16): " +
				"auto (where the kernel has it, without --data-digest), on (refused on older kernels and with --data-digest) or off"},
		&cli.StringFlag{Name: "batch-io", Value: string(attach.UseAuto), EnvVars: env("BATCH_IO"),
			Usage: "hand requests over and commit them in batches (ublk BATCH_IO, Linux 7.0): " +
				"auto (where the kernel has it), on (refused on older kernels) or off"},
		&cli.UintFlag{Name: "nsid", Value: uint(d.NSID),
			Usage:  fmt.Sprintf("namespace ID, %d-%d", attach.MinNSID, uint(attach.MaxNSID)),
			Action: inRange[uint]("nsid", attach.MinNSID, attach.MaxNSID), EnvVars: env("NSID")},
		&cli.IntFlag{Name: "dev-id", Value: -1,
			Usage:  fmt.Sprintf("ublk device number N of /dev/ublkbN, -1 (the kernel picks) or 0-%d", attach.MaxDevID),
			Action: inRange[int]("dev-id", -1, attach.MaxDevID), EnvVars: env("DEV_ID")},
		&cli.BoolFlag{Name: "recovery", Value: true, Usage: "ublk user recovery: the device survives a daemon crash", EnvVars: env("RECOVERY")},
		&cli.BoolFlag{Name: "recovery-fail-io", EnvVars: env("RECOVERY_FAIL_IO"),
			Usage: "while no daemon serves the device (crashed, restarting), fail its I/O with EIO instead of holding it (ublk USER_RECOVERY_FAIL_IO, Linux 6.13)"},
		&cli.StringFlag{Name: "metrics-addr", EnvVars: env("METRICS_ADDR"),
			Usage: "serve Prometheus metrics on host:port (e.g. :9782): only /metrics, nothing else"},
		&cli.StringFlag{Name: "pprof-addr", EnvVars: env("PPROF_ADDR"),
			Usage: "serve the Go runtime's profiles (/debug/pprof/: goroutine stacks, heap, CPU profile, execution trace, the command line) " +
				"on [host:]port, loopback only (a bare port or :port is 127.0.0.1); off unless given",
			Action: func(_ *cli.Context, v string) error { _, err := attach.PprofListenAddr(v); return err }},
		&cli.BoolFlag{Name: "link-watch", Usage: "watch the link and route to the target: recover at once when it goes down", EnvVars: env("LINK_WATCH")},
		&cli.BoolFlag{Name: "recover", Usage: "take over the device a crashed daemon left for this target, if any, and only if it served the same namespace (another one behind the NSID: exit 7, the device left alone)", EnvVars: env("RECOVER")},
		&cli.StringFlag{Name: "dhchap-secret-file", EnvVars: env("DHCHAP_SECRET_FILE"),
			Usage: "file holding the host's DH-HMAC-CHAP secret (DHHC-1:..., nvme gen-dhchap-key), read again at every reconnect; the safe form: prefer it to --dhchap-secret"},
		&cli.StringFlag{Name: "dhchap-ctrl-secret-file", EnvVars: env("DHCHAP_CTRL_SECRET_FILE"),
			Usage: "file holding the controller's DH-HMAC-CHAP secret: the controller must authenticate too (bidirectional)"},
		&cli.StringFlag{Name: "dhchap-secret", Aliases: []string{"S"}, EnvVars: env("DHCHAP_SECRET"),
			Usage: "the host's DH-HMAC-CHAP secret itself; LEAKS: visible in ps (and in the unit's environment): use --dhchap-secret-file"},
		&cli.StringFlag{Name: "dhchap-ctrl-secret", Aliases: []string{"C"}, EnvVars: env("DHCHAP_CTRL_SECRET"),
			Usage: "the controller's DH-HMAC-CHAP secret itself; LEAKS as --dhchap-secret: use --dhchap-ctrl-secret-file"},
	)
	return &cli.Command{
		Name:  name,
		Usage: usage,
		Flags: flags,
		Action: func(c *cli.Context) error {
			if c.NArg() > 0 {
				return fmt.Errorf("%w: unexpected argument %q", attach.ErrInvalidOptions, c.Args().First())
			}
			o := attach.Options{
				TrAddr: c.String("traddr"), TrSvcID: c.String("trsvcid"), NQN: c.String("nqn"),
				HostNQN: c.String("hostnqn"), HostID: c.String("hostid"),
				NrIOQueues: c.Int("nr-io-queues"), QueueSize: c.Int("queue-size"),
				KeepAliveTmo:   seconds(c.Int("keep-alive-tmo")),
				ReconnectDelay: seconds(c.Int("reconnect-delay")),
				CtrlLossTmo:    seconds(c.Int("ctrl-loss-tmo")),
				FastIOFailTmo:  seconds(c.Int("fast-io-fail-tmo")),
				HdrDigest:      c.Bool("hdr-digest"), DataDigest: c.Bool("data-digest"), ZeroCopy: attach.FeatureUse(c.String("zero-copy")),
				BatchIO: attach.FeatureUse(c.String("batch-io")),
				NSID:    uint32(c.Uint("nsid")), DevID: c.Int("dev-id"), Recovery: c.Bool("recovery"),
				RecoveryFailIO: c.Bool("recovery-fail-io"),
				Recover:        c.Bool("recover"), MustRecover: mustRecover, LinkWatch: c.Bool("link-watch"),
				AuthOptions: attach.AuthOptions{
					DHChapSecret: c.String("dhchap-secret"), DHChapSecretFile: c.String("dhchap-secret-file"),
					DHChapCtrlSecret: c.String("dhchap-ctrl-secret"), DHChapCtrlSecretFile: c.String("dhchap-ctrl-secret-file"),
				},
			}
			if err := o.Validate(); err != nil {
				return err
			}
			setGOMAXPROCS(o.NrIOQueues)
			ctx, hurry, stop := signalContext()
			defer stop()
			handoff, stopHandoff := handoffSignal()
			defer stopHandoff()
			return attach.Run(ctx, o, attach.RunConfig{
				Hurry:        hurry,
				Handoff:      handoff,
				MetricsAddr:  c.String("metrics-addr"),
				PprofAddr:    c.String("pprof-addr"),
				TeardownHook: testWedgeTeardownHook(),
				Notifier:     &attach.ServiceNotifier{},
				Ready:        func(dev string) { fmt.Fprintln(stdout, dev) },
			})
		},
	}
}

// seconds converts a flag in seconds; negative stays negative (off/forever).
// The flag's inRange action has bounded n, so the product cannot overflow.
func seconds(n int) time.Duration { return time.Duration(n) * time.Second }

// inRange is a numeric flag's Action: urfave/cli runs it right after
// parsing, for a value from the command line or the environment, so a value
// outside lo..hi is refused, naming the flag, before it is converted (a
// uint32 NSID, a duration in nanoseconds) or used.
func inRange[T int | uint](flag string, lo, hi T) func(*cli.Context, T) error {
	return func(_ *cli.Context, v T) error {
		if v < lo || v > hi {
			return fmt.Errorf("%w: --%s %d: must be %d-%d", attach.ErrInvalidOptions, flag, v, lo, hi)
		}
		return nil
	}
}

// positiveDuration is a duration flag's Action: more than zero, at most
// attach.MaxTimeout.
func positiveDuration(flag string) func(*cli.Context, time.Duration) error {
	return func(_ *cli.Context, v time.Duration) error {
		if v <= 0 || v > attach.MaxTimeout {
			return fmt.Errorf("%w: --%s %v: must be positive and at most %v", attach.ErrInvalidOptions, flag, v, attach.MaxTimeout)
		}
		return nil
	}
}

// handoffSignal closes handoff at SIGUSR2, which the unit sends at
// `systemctl restart` (RestartKillSignal): attach hands the device to the
// next daemon instead of deleting it (attach.RunConfig.Handoff). stop ends
// the signal handling and joins its goroutine.
func handoffSignal() (handoff <-chan struct{}, stop func()) {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGUSR2)
	handoffCh := make(chan struct{})
	quit := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		select {
		case <-ch:
			slog.Info("handing the device over to the next daemon", "signal", "SIGUSR2")
			close(handoffCh)
		case <-quit:
		}
	}()
	return handoffCh, func() {
		signal.Stop(ch)
		close(quit)
		<-done
	}
}

// signalContext ends at SIGTERM or SIGINT: a graceful detach (drain the
// I/O in flight, disconnect, delete the device). The second signal closes
// hurry: the detach becomes immediate (attach.RunConfig.Hurry): the daemon
// stops waiting for the target, fails the I/O in flight and held with EIO,
// and still deletes the device in lifecycle's teardown order, so nothing is
// left behind either way; it then exits with exitImmediate. Later signals
// are ignored. stop ends the signal handling and joins its goroutine.
func signalContext() (ctx context.Context, hurry <-chan struct{}, stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	hurryCh := make(chan struct{})
	ch := make(chan os.Signal, 2)
	signal.Notify(ch, syscall.SIGTERM, syscall.SIGINT)
	quit := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for n := 1; ; n++ {
			var s os.Signal
			select {
			case s = <-ch:
			case <-quit:
				return
			}
			switch n {
			case 1:
				slog.Info("stopping; a second signal stops at once", "signal", s.String())
				cancel()
			case 2:
				slog.Warn("stopping at once", "signal", s.String())
				close(hurryCh)
			default:
				slog.Warn("already stopping at once", "signal", s.String())
			}
		}
	}()
	return ctx, hurryCh, func() {
		signal.Stop(ch)
		close(quit)
		<-done
		cancel()
	}
}

func detachCommand() *cli.Command {
	return &cli.Command{
		Name:      "detach",
		Usage:     "detach a device: drain its I/O, disconnect, delete it",
		ArgsUsage: "DEVICE (N, ublkbN or /dev/ublkbN)",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "force", Usage: "delete a device no live daemon serves (ORPHANED in list: its daemon died and was not restarted): " +
				"ublk STOP_DEV and DEL_DEV, I/O held for a recovery fails with EIO, its run record is removed; refused (exit 11) while a daemon serves it"},
			&cli.DurationFlag{Name: "timeout", Value: 2 * time.Minute, Usage: "how long to wait for the daemon to finish",
				Action: positiveDuration("timeout")},
		},
		Action: func(c *cli.Context) error {
			id, err := deviceArg(c)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(context.Background(), c.Duration("timeout"))
			defer cancel()
			if c.Bool("force") {
				return attach.ForceDetach(ctx, id)
			}
			return attach.Detach(ctx, id)
		},
	}
}

func deviceArg(c *cli.Context) (int, error) {
	if c.NArg() != 1 {
		return 0, fmt.Errorf("%w: %s needs one DEVICE argument", attach.ErrInvalidOptions, c.Command.Name)
	}
	return attach.ParseDevice(c.Args().First())
}

func jsonFlag() cli.Flag {
	return &cli.BoolFlag{Name: "json", Aliases: []string{"o"}, Usage: "JSON output"}
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func listCommand(stdout io.Writer) *cli.Command {
	return &cli.Command{
		Name:  "list",
		Usage: "list the devices this tool serves, and those it made that no live daemon serves (ORPHANED)",
		Flags: []cli.Flag{jsonFlag()},
		Action: func(c *cli.Context) error {
			all, err := attach.List(c.Context)
			if err != nil {
				return err
			}
			if c.Bool("json") {
				if all == nil {
					all = []attach.Status{}
				}
				return writeJSON(stdout, all)
			}
			tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "DEVICE\tTARGET\tNQN\tNSID\tSTATE\tQUEUES\tPID")
			for _, s := range all {
				state, pid := s.State, fmt.Sprint(s.PID)
				if state == attach.StateOrphaned {
					// No daemon: what the driver holds it as, and
					// how to remove it.
					state, pid = fmt.Sprintf("%s (ublk %s; detach --force)", state, s.UblkState), "-"
				}
				fmt.Fprintf(tw, "%s\t%s:%s\t%s\t%d\t%s\t%dx%d\t%s\n", s.Device, s.TrAddr, s.TrSvcID, s.NQN, s.NSID, state, s.Queues, s.QueueSize, pid)
			}
			return tw.Flush()
		},
	}
}

func statusCommand(stdout io.Writer) *cli.Command {
	return &cli.Command{
		Name:      "status",
		Usage:     "show one device: controller state, keep-alive, reconnects, I/O in flight, the ublk features the kernel offers and those in use",
		ArgsUsage: "DEVICE",
		Flags:     []cli.Flag{jsonFlag()},
		Action: func(c *cli.Context) error {
			id, err := deviceArg(c)
			if err != nil {
				return err
			}
			s, err := attach.GetStatus(c.Context, id)
			if err != nil {
				return err
			}
			if c.Bool("json") {
				return writeJSON(stdout, s)
			}
			tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
			for _, row := range [][2]string{
				{"device", s.Device},
				{"target", s.TrAddr + ":" + s.TrSvcID},
				{"nqn", s.NQN},
				{"hostnqn", s.HostNQN},
				{"nsid", fmt.Sprint(s.NSID)},
				{"state", fmt.Sprintf("%s since %s", s.State, s.StateSince.Format(time.RFC3339))},
				{"queues", fmt.Sprintf("%d x %d", s.Queues, s.QueueSize)},
				{"keep-alive rtt", s.KeepAliveRTT.String()},
				{"reconnects", fmt.Sprint(s.Reconnects)},
				{"in flight", fmt.Sprintf("%d (%d held)", s.InFlight, s.Held)},
				{"pid", fmt.Sprint(s.PID)},
				{"up since", s.Started.Format(time.RFC3339)},
				{"ublk features", strings.Join(s.UblkFeatures, " ")},
				{"ublk flags in use", strings.Join(s.UblkFlags, " ")},
				{"ublk data path", s.UblkDataPath},
			} {
				fmt.Fprintf(tw, "%s:\t%s\n", row[0], row[1])
			}
			return tw.Flush()
		},
	}
}

func discoverCommand(stdout io.Writer) *cli.Command {
	return &cli.Command{
		Name:  "discover",
		Usage: "print the discovery log of a discovery controller",
		Flags: append(connectFlags(), jsonFlag(),
			&cli.DurationFlag{Name: "timeout", Value: 30 * time.Second, Usage: "give up after",
				Action: positiveDuration("timeout")}),
		Action: func(c *cli.Context) error {
			o := attach.Options{TrAddr: c.String("traddr"), TrSvcID: c.String("trsvcid")}
			if err := o.ValidateTarget(); err != nil {
				return err
			}
			host, err := nvmeof.LoadHostIdentity()
			if err != nil {
				return err
			}
			if q := c.String("hostnqn"); q != "" {
				host.NQN = q
			}
			if id := c.String("hostid"); id != "" {
				if host.ID, err = nvmeof.ParseUUID(id); err != nil {
					return fmt.Errorf("%w: --hostid: %w", attach.ErrInvalidOptions, err)
				}
			}
			ctx, cancel := context.WithTimeout(c.Context, c.Duration("timeout"))
			defer cancel()
			entries, err := nvmeof.Discover(ctx, o.Addr(), host)
			if err != nil {
				return fmt.Errorf("discover %s: %w", o.Addr(), err)
			}
			if c.Bool("json") {
				return writeJSON(stdout, entries)
			}
			fmt.Fprintf(stdout, "Discovery Log Number of Records %d\n", len(entries))
			for i, e := range entries {
				fmt.Fprintf(stdout, "=====Discovery Log Entry %d======\n", i)
				tw := tabwriter.NewWriter(stdout, 0, 4, 1, ' ', 0)
				fmt.Fprintf(tw, "trtype:\t%d\nadrfam:\t%d\nsubtype:\t%d\ntreq:\t%s\nportid:\t%d\ntrsvcid:\t%s\nsubnqn:\t%s\ntraddr:\t%s\nsectype:\t%s\n",
					e.TrType, e.AdrFam, e.SubType, treqString(e.TReq), e.PortID, e.TrSvcID, e.SubNQN, e.TrAddr, sectypeString(e.TrType, e.SecType))
				if err := tw.Flush(); err != nil {
					return err
				}
			}
			return nil
		},
	}
}

func versionCommand(stdout io.Writer) *cli.Command {
	return &cli.Command{
		Name:  "version",
		Usage: "print the version",
		Action: func(*cli.Context) error {
			v := "(devel)"
			if bi, ok := debug.ReadBuildInfo(); ok {
				v = bi.Main.Version
				for _, s := range bi.Settings {
					if s.Key == "vcs.revision" {
						v += " " + s.Value
					}
				}
			}
			fmt.Fprintf(stdout, "ublk-nvmeof %s\n", v)
			return nil
		},
	}
}
