package attach

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle"
	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle/nvmeofconn"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
)

type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

type logLine struct {
	raw   string
	attrs map[string]any
}

func (b *logBuffer) lines(t *testing.T) []logLine {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []logLine
	for _, l := range strings.Split(strings.TrimSpace(b.buf.String()), "\n") {
		m := map[string]any{}
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("log line %q: %v", l, err)
		}
		out = append(out, logLine{raw: l, attrs: m})
	}
	return out
}

// TestLogAttributes: the loggers Run wires name the controller on every
// line of lifecycle, keep-alive and the NVMe/TCP controller and queues,
// the device on every line once it exists, and the queue on per-queue
// lines. The controller and lifecycle are real, against the in-process
// target over loopback, which drops every connection once: the queues'
// failures, recovery and reconnect all log.
func TestLogAttributes(t *testing.T) {
	const nqn = "nqn.2026-11.io.ublk-nvmeof:logs"
	tg, _, o := startMemoryTarget(t, nqn)

	var buf logBuffer
	logs := newRunLoggers(slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug})), o)
	connector := &nvmeofconn.Connector{
		Config: nvmeof.ControllerConfig{
			Addr: o.Addr(), SubsysNQN: nqn,
			Host:     nvmeof.HostIdentity{NQN: "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001"},
			IOQueues: 2, QueueSize: 32, KATO: 5 * time.Second,
			Logger: logs.nvme,
		},
		NSID: 1,
	}
	lc := startLifecycle(t, connector, rigLifecycleOptions(logs.ctrl))
	defer lc.Delete()
	before := len(buf.lines(t))
	const device = "/dev/ublkb7"
	logs.setDevice(device)

	// Every connection dropped: the queues fail, the controller recovers
	// and reconnects.
	live := make(chan struct{}, 1)
	lc.States().Observe(func(tr lifecycle.Transition) {
		if tr.To == lifecycle.StateLive {
			select {
			case live <- struct{}{}:
			default:
			}
		}
	})
	tg.DropConnections()
	select {
	case <-live:
	case <-time.After(30 * time.Second):
		t.Fatalf("not LIVE again after the connections dropped: %v", lc.State())
	}
	lc.Delete()

	lines := buf.lines(t)
	queueLines, stateLines := 0, 0
	for i, line := range lines {
		l := line.attrs
		if l["subsys"] != nqn || l["addr"] != o.Addr() {
			t.Errorf("line without the controller (subsys %q, addr %q): %v", nqn, o.Addr(), l)
		}
		if i >= before && l["device"] != device {
			t.Errorf("line after the device was set without device=%s: %v", device, l)
		}
		if i < before && l["device"] != nil {
			t.Errorf("line before the device existed has a device: %v", l)
		}
		switch l["msg"] {
		case "nvme-tcp queue failed":
			queueLines++
			if _, ok := l["qid"]; !ok {
				t.Errorf("queue line without qid: %v", l)
			}
		case "controller state":
			if i >= before {
				stateLines++
			}
		}
		// The device and the controller are named once a line, not by
		// two layers each adding them.
		for _, key := range []string{`"device":`, `"subsys":`, `"addr":`} {
			if strings.Count(line.raw, key) > 1 {
				t.Errorf("%s more than once: %s", key, line.raw)
			}
		}
	}
	if queueLines == 0 || stateLines < 3 {
		t.Fatalf("%d queue failure lines and %d state lines after the drop; want the queues' failures and RESETTING, CONNECTING, LIVE, ...", queueLines, stateLines)
	}
}
