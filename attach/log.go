package attach

import (
	"context"
	"log/slog"
	"sync/atomic"
)

// runLoggers are the loggers of one attach. Every line names the
// controller (subsys: the NQN, addr: traddr:trsvcid) and, once the ublk
// device exists, the device (/dev/ublkbN); per-queue lines add their queue
// (qid for an NVMe/TCP queue, queue for a ublk queue) where they are
// logged. The device is added by the handler at each line rather than with
// With, because lifecycle, keep-alive and the NVMe/TCP controller get their
// loggers before the kernel has picked the device number.
type runLoggers struct {
	// ctrl is for attach itself, lifecycle (and keep-alive under it), the
	// link watch and the ublk device: base with subsys and addr.
	ctrl *slog.Logger
	// nvme is for the NVMe/TCP controller, which adds subsys and addr
	// itself (and qid on its queues' lines).
	nvme   *slog.Logger
	device *atomic.Pointer[string]
}

func newRunLoggers(base *slog.Logger, o Options) runLoggers {
	dev := new(atomic.Pointer[string])
	l := slog.New(&deviceHandler{h: base.Handler(), device: dev})
	return runLoggers{
		ctrl:   l.With("subsys", o.NQN, "addr", o.Addr()),
		nvme:   l,
		device: dev,
	}
}

// setDevice adds device=path to every line from now on.
func (l runLoggers) setDevice(path string) { l.device.Store(&path) }

// deviceHandler adds the device attribute, once known, to every record.
type deviceHandler struct {
	h      slog.Handler
	device *atomic.Pointer[string]
}

func (d *deviceHandler) Enabled(ctx context.Context, level slog.Level) bool {
	return d.h.Enabled(ctx, level)
}

func (d *deviceHandler) Handle(ctx context.Context, r slog.Record) error {
	if p := d.device.Load(); p != nil {
		r = r.Clone() // the record's attributes may be shared with the caller
		r.AddAttrs(slog.String("device", *p))
	}
	return d.h.Handle(ctx, r)
}

func (d *deviceHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &deviceHandler{h: d.h.WithAttrs(attrs), device: d.device}
}

func (d *deviceHandler) WithGroup(name string) slog.Handler {
	return &deviceHandler{h: d.h.WithGroup(name), device: d.device}
}
