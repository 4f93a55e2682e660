package vm

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/vm/internal/guestproto"
)

// fakeKernel writes a kernel directory as prepare-vm.sh lays it out.
func fakeKernel(t *testing.T, dir, release string) {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(dir, "modules"), 0o755))
	must(os.WriteFile(filepath.Join(dir, "release"), []byte(release+"\n"), 0o644))
	must(os.WriteFile(filepath.Join(dir, "vmlinuz"), []byte("k"), 0o644))
	must(os.WriteFile(filepath.Join(dir, "modules", "00-configfs.ko"), []byte("m"), 0o644))
	must(os.WriteFile(filepath.Join(dir, "modules", "01-brd.ko"), []byte("m"), 0o644))
	must(os.WriteFile(filepath.Join(dir, "modules", "params"), []byte("brd rd_nr=2\n"), 0o644))
}

func names(ks []*Kernel) string {
	var n []string
	for _, k := range ks {
		n = append(n, k.Role+"="+k.Name())
	}
	return strings.Join(n, " ")
}

func TestSelectKernels(t *testing.T) {
	cache := t.TempDir()
	t.Setenv("UBLK_NVMEOF_VM_CACHE", cache)
	fakeKernel(t, filepath.Join(cache, "lts"), "6.12.117+deb12-amd64")
	fakeKernel(t, filepath.Join(cache, "newest"), "7.3.4+deb13-amd64")
	for sel, want := range map[string]string{
		"":                     "lts=6.12",
		"lts":                  "lts=6.12",
		"newest":               "newest=7.3",
		"all":                  "lts=6.12 newest=7.3",
		"7.3":                  "newest=7.3",
		"6.12":                 "lts=6.12",
		"7.3,6.12":             "lts=6.12 newest=7.3",
		"7.3 newest":           "newest=7.3",
		"6.12 all lts":         "lts=6.12 newest=7.3",
		"7.3.4+deb13-amd64":    "newest=7.3",
		"6.12.117+deb12-amd64": "lts=6.12",
	} {
		ks, err := SelectKernels(sel)
		if err != nil {
			t.Errorf("%q: %v", sel, err)
			continue
		}
		if got := names(ks); got != want {
			t.Errorf("%q selects %s, want %s", sel, got, want)
		}
	}
	for _, sel := range []string{"5.10", "7", "7.3.4", "oldest"} {
		if ks, err := SelectKernels(sel); err == nil {
			t.Errorf("%q selects %s, want an error", sel, names(ks))
		} else if !errors.Is(err, ErrNoKernel) {
			t.Errorf("%q: %v does not wrap ErrNoKernel", sel, err)
		}
	}
	k, err := FindKernel(KernelLTS)
	if err != nil {
		t.Fatal(err)
	}
	if len(k.Modules) != 2 || k.Modules[0].Name != "configfs" || k.Modules[1].Params != "rd_nr=2" {
		t.Errorf("modules %+v", k.Modules)
	}
}

// TestSelectKernelsMissing: a selected kernel that is not cached is an error
// (so E2E_REQUIRE_VM=1 fails instead of running fewer kernels), and the old
// layout's current/ still serves as the LTS kernel.
func TestSelectKernelsMissing(t *testing.T) {
	cache := t.TempDir()
	t.Setenv("UBLK_NVMEOF_VM_CACHE", cache)
	if _, err := SelectKernels(""); !errors.Is(err, ErrNoKernel) {
		t.Errorf("empty cache: %v, want ErrNoKernel", err)
	}
	fakeKernel(t, filepath.Join(cache, "current"), "6.12.117+deb12-amd64")
	ks, err := SelectKernels("")
	if err != nil || names(ks) != "lts=6.12" {
		t.Fatalf("current/ as lts: %s, %v", names(ks), err)
	}
	if ks, err := SelectKernels("all"); !errors.Is(err, ErrNoKernel) {
		t.Errorf("all without newest: %s, %v; want ErrNoKernel", names(ks), err)
	}
	if _, err := exec.LookPath(qemuBinary); err == nil {
		t.Setenv(EnvKernel, "newest")
		if err := Available(); !errors.Is(err, ErrNoKernel) {
			t.Errorf("Available with %s=newest uncached: %v, want ErrNoKernel", EnvKernel, err)
		}
	}
}

func TestKernelName(t *testing.T) {
	for rel, want := range map[string]string{
		"6.12.117+deb12-amd64": "6.12",
		"7.3.4+deb13-amd64":    "7.3",
		"7.0+deb13-amd64":      "7.0",
		"6.19-rc2":             "6.19",
		"10.1.0":               "10.1",
		"weird":                "weird",
	} {
		if got := releaseName(rel); got != want {
			t.Errorf("%q: %q, want %q", rel, got, want)
		}
	}
}

// TestRunKernelsNamesEachKernel: one run per kernel, each in a subtest named
// after its kernel and given that kernel.
func TestRunKernelsNamesEachKernel(t *testing.T) {
	ks := []*Kernel{
		{Role: KernelLTS, Release: "6.12.117+deb12-amd64"},
		{Role: KernelNewest, Release: "7.3.4+deb13-amd64"},
	}
	var got []string
	runKernels(t, Config{}, ks, func(st *testing.T, cfg Config) {
		got = append(got, st.Name()+" "+cfg.Kernel.Release)
	})
	want := []string{
		t.Name() + "/6.12 6.12.117+deb12-amd64",
		t.Name() + "/7.3 7.3.4+deb13-amd64",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("runs:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// TestHarnessBootsSelectedKernels boots every kernel E2E_KERNEL selects
// (make e2e: all) and checks, from inside the guest, that the kernel running
// there is the one the harness said it booted.
func TestHarnessBootsSelectedKernels(t *testing.T) {
	Require(t)
	ks, err := SelectKernels(os.Getenv(EnvKernel))
	if err != nil {
		t.Fatal(err)
	}
	runKernels(t, Config{Packages: []string{selftestPkg}, Run: "^TestGuestKernelRelease$", Timeout: 5 * time.Minute}, ks,
		func(t *testing.T, cfg Config) {
			res, err := Run(t.Context(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			if !res.Done {
				t.Fatalf("VM did not finish: timed out=%v\n%s", res.TimedOut, res.ConsoleTail(40))
			}
			if !strings.Contains(res.Boot, "kernel "+cfg.Kernel.Release) {
				t.Errorf("boot report %q, want kernel %s", res.Boot, cfg.Kernel.Release)
			}
			if strings.Contains(res.Boot, "setup errors") {
				t.Errorf("guest setup on %s: %s", cfg.Kernel.Release, res.Boot)
			}
			tr := byName(res)["TestGuestKernelRelease"]
			if tr.Status != guestproto.StatusPass {
				t.Errorf("TestGuestKernelRelease on %s: %s\n%s", cfg.Kernel.Release, tr.Status, tr.Output)
			}
		})
}
