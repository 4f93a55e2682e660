package e2e

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"sync"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
)

// attached is a `ublk-nvmeof attach` running in the background, with its
// device ready.
type attached struct {
	Device string
	cmd    *exec.Cmd
	exited chan error // Wait's result, once
	mu     sync.Mutex
	logs   bytes.Buffer
}

// Logs returns the daemon's stderr so far.
func (a *attached) Logs() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.logs.String()
}

func (a *attached) Write(p []byte) (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.logs.Write(p)
}

// startAttached runs DaemonPath with args (global flags, then "attach"
// and its flags) and waits until it prints its device and the node exists.
// When t ends a daemon still running is killed and reaped.
func startAttached(t *testing.T, args ...string) *attached {
	t.Helper()
	a := &attached{cmd: exec.Command(DaemonPath, args...), exited: make(chan error, 1)}
	stdout, err := a.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	a.cmd.Stderr = a
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	devCh := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		if sc.Scan() {
			devCh <- sc.Text()
		}
		close(devCh)
		for sc.Scan() {
		}
		a.exited <- a.cmd.Wait()
	}()
	t.Cleanup(func() {
		if a.cmd.ProcessState == nil {
			_ = a.cmd.Process.Kill()
			<-a.exited
		}
	})
	select {
	case a.Device = <-devCh:
	case <-time.After(time.Minute):
	}
	if a.Device == "" {
		t.Fatalf("attach did not report a device\n%s", a.Logs())
	}
	if err := guest.WaitFor(a.Device, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	return a
}

// wait returns the daemon's exit error, or fails t if it does not exit
// within a minute.
func (a *attached) wait(t *testing.T) error {
	t.Helper()
	select {
	case err := <-a.exited:
		a.exited <- err
		return err
	case <-time.After(time.Minute):
		t.Fatalf("daemon did not exit\n%s", a.Logs())
	}
	return nil
}

// stop sends SIGINT (a graceful detach) and checks the daemon exits 0.
func (a *attached) stop(t *testing.T) {
	t.Helper()
	_ = a.cmd.Process.Signal(os.Interrupt)
	if err := a.wait(t); err != nil {
		t.Errorf("daemon: %v\n%s", err, a.Logs())
	}
}
