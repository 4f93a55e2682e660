package nvmeof

import (
	"context"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
)

// TestCompletionInsideSubmit is docs/design.md rule 1 forced: the command
// completes, and the queue is shut down, while Submit is still running.
// Wait must not return (the queue must not be freed) until Submit has made
// its last touch and returned.
func TestCompletionInsideSubmit(t *testing.T) {
	tg := target.New(target.Config{})
	defer tg.Close()
	sub, _ := tg.AddSubsystem("nqn.2026-11.io.ublk-nvmeof:rule1")
	sub.AddNamespace(target.NamespaceConfig{NSID: 1, Backend: target.NewMemoryBackend(1 << 20)})
	addr, err := tg.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := Connect(ctx, ControllerConfig{Addr: addr.String(), SubsysNQN: "nqn.2026-11.io.ublk-nvmeof:rule1",
		Host: HostIdentity{NQN: "nqn.2026-11.io.example:rule1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	q := c.IOQueues()[0].Queue

	completed := make(chan struct{})
	insideSubmit := make(chan struct{})
	release := make(chan struct{})
	testHookSubmitted = func(hq *Queue) {
		if hq != q {
			return
		}
		close(insideSubmit)
		<-release
	}
	defer func() { testHookSubmitted = nil }()

	submitted := make(chan error, 1)
	go func() {
		req := &Request{}
		req.Cmd.SetOpcode(nvme.NVME_CMD_FLUSH)
		req.Cmd.SetNSID(1)
		submitted <- q.Submit(req, func(error) { close(completed) })
	}()
	<-insideSubmit
	<-completed // the command completed while Submit is still inside
	q.Shutdown()
	select {
	case <-q.Idle():
		t.Fatal("queue idle while Submit still touches it")
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	if err := <-submitted; err != nil {
		t.Fatal(err)
	}
	select {
	case <-q.Idle():
	case <-time.After(time.Minute):
		t.Fatal("queue never idle")
	}
}
