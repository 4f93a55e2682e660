package vm

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Kernel is Debian's 6.12 kernel as prepare-vm.sh caches it.
type Kernel struct {
	Release string
	Vmlinuz string
	Modules []Module // in load order
}

// Module is a decompressed kernel module file.
type Module struct {
	Name   string
	Path   string
	Params string
}

// ErrNoKernel means the kernel cache is not prepared.
var ErrNoKernel = errors.New("no VM kernel cached (run e2e/vm/prepare-vm.sh, or make e2e)")

// CacheDir is where prepare-vm.sh keeps the kernel: $UBLK_NVMEOF_VM_CACHE,
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

// FindKernel returns the cached kernel, or an error wrapping ErrNoKernel.
func FindKernel() (*Kernel, error) {
	dir := filepath.Join(CacheDir(), "current")
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
