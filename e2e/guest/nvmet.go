package guest

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// nvmetRoot is the Linux NVMe target's configfs tree
// (drivers/nvme/target/configfs.c).
const nvmetRoot = "/sys/kernel/config/nvmet"

// TargetOptions describe a Linux nvmet-tcp target: one subsystem with one
// namespace on a block device, exported on one TCP port.
type TargetOptions struct {
	NQN    string // default "nqn.2026-11.io.ublk-nvmeof:e2e"
	Device string // namespace backing device, default /dev/ram0
	NSID   int    // default 1
	Addr   string // default 127.0.0.1
	Port   int    // TCP port, default 4420
	PortID int    // configfs port id, default 1

	// Optional namespace attributes, set before it is enabled (see
	// nvmet_ns.go): its UUID and NGUID (device_uuid, device_nguid; nvmet
	// makes up a UUID otherwise), and buffered_io for a file namespace
	// (nvmet opens the file with O_DIRECT otherwise).
	UUID, NGUID string
	BufferedIO  bool
}

// Target is a Linux nvmet-tcp target configured through configfs.
type Target struct {
	Opts TargetOptions
}

func (o *TargetOptions) defaults() {
	if o.NQN == "" {
		o.NQN = "nqn.2026-11.io.ublk-nvmeof:e2e"
	}
	if o.Device == "" {
		o.Device = "/dev/ram0"
	}
	if o.NSID == 0 {
		o.NSID = 1
	}
	if o.Addr == "" {
		o.Addr = "127.0.0.1"
	}
	if o.Port == 0 {
		o.Port = 4420
	}
	if o.PortID == 0 {
		o.PortID = 1
	}
}

func (tg *Target) subsys() string { return filepath.Join(nvmetRoot, "subsystems", tg.Opts.NQN) }
func (tg *Target) ns() string {
	return filepath.Join(tg.subsys(), "namespaces", strconv.Itoa(tg.Opts.NSID))
}
func (tg *Target) port() string {
	return filepath.Join(nvmetRoot, "ports", strconv.Itoa(tg.Opts.PortID))
}
func (tg *Target) link() string { return filepath.Join(tg.port(), "subsystems", tg.Opts.NQN) }

func write(path, value string) error {
	if err := os.WriteFile(path, []byte(value), 0); err != nil {
		return fmt.Errorf("nvmet: write %q to %s: %w", value, path, err)
	}
	return nil
}

// CreateTarget configures the target and returns it; Remove undoes it.
func CreateTarget(opts TargetOptions) (*Target, error) {
	opts.defaults()
	tg := &Target{Opts: opts}
	if _, err := os.Stat(nvmetRoot); err != nil {
		return nil, fmt.Errorf("nvmet: configfs tree missing (nvmet loaded, configfs mounted?): %w", err)
	}
	steps := []func() error{
		func() error { return os.Mkdir(tg.subsys(), 0o755) },
		func() error { return write(filepath.Join(tg.subsys(), "attr_allow_any_host"), "1") },
		func() error { return os.Mkdir(tg.ns(), 0o755) },
		func() error { return write(filepath.Join(tg.ns(), "device_path"), tg.Opts.Device) },
		tg.setNamespaceAttrs,
		func() error { return write(filepath.Join(tg.ns(), "enable"), "1") },
		func() error { return os.Mkdir(tg.port(), 0o755) },
		func() error { return write(filepath.Join(tg.port(), "addr_trtype"), "tcp") },
		func() error { return write(filepath.Join(tg.port(), "addr_adrfam"), adrfam(tg.Opts.Addr)) },
		func() error { return write(filepath.Join(tg.port(), "addr_traddr"), tg.Opts.Addr) },
		func() error { return write(filepath.Join(tg.port(), "addr_trsvcid"), strconv.Itoa(tg.Opts.Port)) },
		tg.LinkPort,
	}
	for _, step := range steps {
		if err := step(); err != nil {
			return nil, errors.Join(err, tg.Remove())
		}
	}
	return tg, nil
}

func adrfam(addr string) string {
	if strings.Contains(addr, ":") {
		return "ipv6"
	}
	return "ipv4"
}

// NewTarget is CreateTarget for tests: it fails t on error and removes the
// target when t ends.
func NewTarget(t testing.TB, opts TargetOptions) *Target {
	t.Helper()
	tg, err := CreateTarget(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := tg.Remove(); err != nil {
			t.Errorf("remove target: %v", err)
		}
	})
	return tg
}

// LinkPort exports the subsystem on the port (the target appears).
func (tg *Target) LinkPort() error {
	if err := os.Symlink(tg.subsys(), tg.link()); err != nil {
		return fmt.Errorf("nvmet: link %s to port %d: %w", tg.Opts.NQN, tg.Opts.PortID, err)
	}
	return nil
}

// UnlinkPort removes the subsystem from the port: the target disappears for
// hosts, and nvmet drops their connections (hot remove).
func (tg *Target) UnlinkPort() error {
	if err := os.Remove(tg.link()); err != nil {
		return fmt.Errorf("nvmet: unlink %s from port %d: %w", tg.Opts.NQN, tg.Opts.PortID, err)
	}
	return nil
}

// SetNamespaceEnabled enables or disables the namespace.
func (tg *Target) SetNamespaceEnabled(on bool) error {
	v := "0"
	if on {
		v = "1"
	}
	return write(filepath.Join(tg.ns(), "enable"), v)
}

// DeleteControllers makes the target delete every controller of the
// subsystem, as its fatal-error handler does: writing attr_qid_max (here the
// value it already has) runs ctrl->ops->delete_ctrl on each of them ("Force
// reconnect", nvmet_subsys_attr_qid_max_store in
// drivers/nvme/target/configfs.c), which for nvmet-tcp shuts every queue's
// socket down. The subsystem stays exported, so hosts can reconnect at once.
func (tg *Target) DeleteControllers() error {
	p := filepath.Join(tg.subsys(), "attr_qid_max")
	v, err := os.ReadFile(p)
	if err != nil {
		return fmt.Errorf("nvmet: %w", err)
	}
	return write(p, strings.TrimSpace(string(v)))
}

// Remove tears the whole target down; what is already gone is skipped.
func (tg *Target) Remove() error {
	var errs []error
	rm := func(p string) {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("nvmet: remove %s: %w", p, err))
		}
	}
	rm(tg.link())
	rm(tg.port())
	if _, err := os.Stat(tg.ns()); err == nil {
		_ = write(filepath.Join(tg.ns(), "enable"), "0")
	}
	rm(tg.ns())
	rm(tg.subsys())
	return errors.Join(errs...)
}

// KernelController is a controller of the Linux nvme-tcp initiator, the
// reference implementation and data oracle.
type KernelController struct {
	Instance int    // N of /dev/nvmeN
	Name     string // "nvmeN"
}

// ConnectKernel connects the kernel's nvme-tcp initiator to tg (as nvme-cli
// connect does, through /dev/nvme-fabrics) and waits for the controller's
// first namespace block device.
func ConnectKernel(tg *Target, extraOpts ...string) (*KernelController, error) {
	f, err := os.OpenFile("/dev/nvme-fabrics", os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("nvme-fabrics (nvme-tcp loaded?): %w", err)
	}
	defer f.Close()
	opts := append([]string{"transport=tcp", "traddr=" + tg.Opts.Addr,
		"trsvcid=" + strconv.Itoa(tg.Opts.Port), "nqn=" + tg.Opts.NQN}, extraOpts...)
	if _, err := f.WriteString(strings.Join(opts, ",")); err != nil {
		return nil, fmt.Errorf("nvme-tcp connect %s: %w", strings.Join(opts, ","), err)
	}
	buf := make([]byte, 256)
	n, err := f.Read(buf) // "instance=N,cntlid=M"
	if err != nil {
		return nil, fmt.Errorf("nvme-tcp connect: reading the instance: %w", err)
	}
	var kc KernelController
	for _, kv := range strings.Split(strings.TrimSpace(string(buf[:n])), ",") {
		if v, ok := strings.CutPrefix(kv, "instance="); ok {
			kc.Instance, err = strconv.Atoi(v)
			if err != nil {
				return nil, fmt.Errorf("nvme-tcp connect: bad reply %q", buf[:n])
			}
		}
	}
	kc.Name = "nvme" + strconv.Itoa(kc.Instance)
	if err := WaitFor(kc.NamespaceDevice(tg.Opts.NSID), 10*time.Second); err != nil {
		return nil, errors.Join(err, kc.Disconnect())
	}
	return &kc, nil
}

// NamespaceDevice is the block device of namespace nsid, /dev/nvmeNnID.
func (kc *KernelController) NamespaceDevice(nsid int) string {
	return fmt.Sprintf("/dev/%sn%d", kc.Name, nsid)
}

// Disconnect deletes the kernel controller.
func (kc *KernelController) Disconnect() error {
	return write(filepath.Join("/sys/class/nvme", kc.Name, "delete_controller"), "1")
}

// WaitFor polls until path exists: device nodes appear asynchronously.
func WaitFor(path string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		_, err := os.Stat(path)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not appear within %v: %w", path, timeout, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
