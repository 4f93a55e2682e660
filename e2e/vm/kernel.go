package vm

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
)

// The kernels prepare-vm.sh caches, by role: each in <cache>/<role>.
const (
	// KernelLTS is Debian's 6.12 LTS kernel of bookworm-security: the
	// oldest kernel the daemon supports (the floor).
	KernelLTS = "lts"
	// KernelNewest is the newest kernel of Debian's trixie-backports
	// (7.3 on 2026-11-30).
	KernelNewest = "newest"
)

// KernelRoles are the roles in the order a matrix runs them.
var KernelRoles = []string{KernelLTS, KernelNewest}

// EnvKernel selects the kernels the VM tests boot: a role (lts, newest), a
// version ("6.12", "7.3"), several of them separated by spaces or commas, or
// "all". Unset: lts. make test and make e2e set it to all.
const EnvKernel = "E2E_KERNEL"

// Kernel is one kernel as prepare-vm.sh caches it.
type Kernel struct {
	Role    string // KernelLTS or KernelNewest
	Release string // uname -r, e.g. 6.12.117+deb12-amd64
	Vmlinuz string
	Modules []Module // in load order
}

// Module is a decompressed kernel module file.
type Module struct {
	Name   string
	Path   string
	Params string
}

var majorMinor = regexp.MustCompile(`^\d+\.\d+`)

// Name is the kernel's version, major.minor ("6.12", "7.3"): the level the
// VM tests report each guest test under (TestVM/6.12/ublk/TestGuestX).
func (k *Kernel) Name() string { return releaseName(k.Release) }

func releaseName(release string) string {
	if v := majorMinor.FindString(release); v != "" {
		return v
	}
	return release
}

// ErrNoKernel means the kernel cache is not prepared.
var ErrNoKernel = errors.New("no VM kernel cached (run e2e/vm/prepare-vm.sh, or make e2e)")

// CacheDir is where prepare-vm.sh keeps the kernels: $UBLK_NVMEOF_VM_CACHE,
// else ~/.cache/ublk-nvmeof/vm.
func CacheDir() string {
	if d := os.Getenv("UBLK_NVMEOF_VM_CACHE"); d != "" {
		return d
	}
	d, err := os.UserCacheDir()
	if err != nil {
		d = filepath.Join(os.TempDir(), "cache")
	}
	return filepath.Join(d, "ublk-nvmeof", "vm")
}

// FindKernel returns the cached kernel of a role ("" is KernelLTS), or an
// error wrapping ErrNoKernel.
func FindKernel(role string) (*Kernel, error) {
	if role == "" {
		role = KernelLTS
	}
	if !slices.Contains(KernelRoles, role) {
		return nil, fmt.Errorf("kernel role %q: want one of %v", role, KernelRoles)
	}
	dir := filepath.Join(CacheDir(), role)
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) && role == KernelLTS {
		// The layout before there were two kernels had only the 6.12
		// kernel, in current/.
		if _, err := os.Stat(filepath.Join(CacheDir(), "current")); err == nil {
			dir = filepath.Join(CacheDir(), "current")
		}
	}
	k, err := loadKernel(dir)
	if err != nil {
		return nil, fmt.Errorf("kernel %s: %w (prepare it: e2e/vm/prepare-vm.sh %s)", role, err, role)
	}
	k.Role = role
	return k, nil
}

func loadKernel(dir string) (*Kernel, error) {
	rel, err := os.ReadFile(filepath.Join(dir, "release"))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoKernel, err)
	}
	k := &Kernel{Release: strings.TrimSpace(string(rel)), Vmlinuz: filepath.Join(dir, "vmlinuz")}
	if _, err := os.Stat(k.Vmlinuz); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoKernel, err)
	}
	params, err := readParams(filepath.Join(dir, "modules", "params"))
	if err != nil {
		return nil, err
	}
	files, err := filepath.Glob(filepath.Join(dir, "modules", "*.ko"))
	if err != nil {
		return nil, err
	}
	sort.Strings(files) // NN- prefixes give the load order
	for _, f := range files {
		base := strings.TrimSuffix(filepath.Base(f), ".ko")
		_, name, ok := strings.Cut(base, "-")
		if !ok {
			name = base
		}
		k.Modules = append(k.Modules, Module{Name: name, Path: f, Params: params[name]})
	}
	if len(k.Modules) == 0 {
		return nil, fmt.Errorf("%w: no modules in %s", ErrNoKernel, dir)
	}
	return k, nil
}

// SelectKernels returns the cached kernels a selection names (EnvKernel's
// syntax; "" is KernelLTS), each once, in KernelRoles order. A kernel it
// names that is not cached is an error wrapping ErrNoKernel.
func SelectKernels(sel string) ([]*Kernel, error) {
	words := strings.FieldsFunc(sel, func(r rune) bool { return r == ',' || r == ' ' })
	if len(words) == 0 {
		words = []string{KernelLTS}
	}
	want := map[string]bool{}
	for _, w := range words {
		switch {
		case w == "all":
			for _, r := range KernelRoles {
				want[r] = true
			}
		case slices.Contains(KernelRoles, w):
			want[w] = true
		default:
			r, err := roleOfVersion(w)
			if err != nil {
				return nil, err
			}
			want[r] = true
		}
	}
	var ks []*Kernel
	for _, r := range KernelRoles {
		if !want[r] {
			continue
		}
		k, err := FindKernel(r)
		if err != nil {
			return nil, err
		}
		ks = append(ks, k)
	}
	return ks, nil
}

// roleOfVersion finds the role whose cached kernel has version v (its Name,
// or its whole release).
func roleOfVersion(v string) (string, error) {
	var cached []string
	for _, r := range KernelRoles {
		k, err := FindKernel(r)
		if err != nil {
			continue
		}
		if k.Name() == v || k.Release == v {
			return r, nil
		}
		cached = append(cached, k.Name())
	}
	return "", fmt.Errorf("%w: %s=%q names no kernel in %s (cached: %v; roles: %v, or all)",
		ErrNoKernel, EnvKernel, v, CacheDir(), cached, KernelRoles)
}

func readParams(p string) (map[string]string, error) {
	m := map[string]string{}
	f, err := os.Open(p)
	if errors.Is(err, os.ErrNotExist) {
		return m, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name, args, _ := strings.Cut(strings.TrimSpace(sc.Text()), " ")
		if name != "" {
			m[name] = args
		}
	}
	return m, sc.Err()
}
