package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/perf"
	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/vm"
)

// resultsFile is the name of kernel name's report, in -out and in the
// baseline's directory alike.
func resultsFile(name string) string { return "results-" + name + ".json" }

// render writes ratio-<k>.svg for each results-<k>.json in out and
// results.md with all of them, each beside its baseline's ratios.
func render(out, baselineDir, command string) error {
	reps, err := loadReports(out)
	if err != nil {
		return err
	}
	if len(reps) == 0 {
		return fmt.Errorf("no %s in %s", resultsFile("*"), out)
	}
	var pages []perf.KernelPage
	for _, rep := range reps {
		page, err := kernelPage(out, baselineDir, rep)
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(out, page.SVG), []byte(rep.SVG(page.Baseline)), 0o644); err != nil {
			return err
		}
		pages = append(pages, page)
	}
	md := perf.Page(pages, command)
	if err := os.WriteFile(filepath.Join(out, "results.md"), []byte(md), 0o644); err != nil {
		return err
	}
	fmt.Printf("written to %s: results.md", out)
	for _, p := range pages {
		fmt.Printf(", %s, %s", resultsFile(p.Report.Name()), p.SVG)
	}
	fmt.Println()
	return nil
}

// kernelPage gathers one kernel's report, its baseline and its profile's
// texts.
func kernelPage(out, baselineDir string, rep perf.Report) (perf.KernelPage, error) {
	name := rep.Name()
	page := perf.KernelPage{Report: rep, SVG: "ratio-" + name + ".svg", ProfileDir: "profile/" + name}
	if baselineDir != "" {
		base, err := readReport(filepath.Join(baselineDir, resultsFile(name)))
		switch {
		case errors.Is(err, os.ErrNotExist):
		case err != nil:
			return page, err
		default:
			page.Baseline = &base
		}
	}
	dir := filepath.Join(out, filepath.FromSlash(page.ProfileDir))
	page.CPUByThread = readOptional(filepath.Join(dir, "cpu-by-thread.txt"))
	if rep.Profiled != "" {
		page.PprofTop = readOptional(filepath.Join(dir, rep.Profiled+".cpu.top.txt"))
	}
	return page, nil
}

// loadReports reads every results-<k>.json in dir, the LTS kernel's
// first, then the newest's, then any other by name.
func loadReports(dir string) ([]perf.Report, error) {
	files, err := filepath.Glob(filepath.Join(dir, resultsFile("*")))
	if err != nil {
		return nil, err
	}
	var reps []perf.Report
	for _, f := range files {
		rep, err := readReport(f)
		if err != nil {
			return nil, err
		}
		if want := resultsFile(rep.Name()); want != filepath.Base(f) {
			return nil, fmt.Errorf("%s holds the report of kernel %s (want it in %s)", f, rep.Name(), want)
		}
		reps = append(reps, rep)
	}
	sort.SliceStable(reps, func(i, j int) bool {
		ri, rj := roleOrder(reps[i]), roleOrder(reps[j])
		if ri != rj {
			return ri < rj
		}
		return reps[i].Name() < reps[j].Name()
	})
	return reps, nil
}

func roleOrder(r perf.Report) int {
	if r.Host == nil {
		return len(vm.KernelRoles)
	}
	if i := slices.Index(vm.KernelRoles, r.Host.KernelRole); i >= 0 {
		return i
	}
	return len(vm.KernelRoles)
}

func readReport(path string) (perf.Report, error) {
	var rep perf.Report
	b, err := os.ReadFile(path)
	if err != nil {
		return rep, err
	}
	if err := json.Unmarshal(b, &rep); err != nil {
		return rep, fmt.Errorf("%s: %w", path, err)
	}
	if len(rep.Rows) == 0 {
		return rep, fmt.Errorf("%s: no rows", path)
	}
	return rep, nil
}

// readOptional is a file's text, "" if it cannot be read.
func readOptional(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	return strings.TrimRight(string(b), "\n") + "\n"
}
