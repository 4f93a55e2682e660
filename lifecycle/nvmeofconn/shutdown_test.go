package nvmeofconn_test

import (
	"sync/atomic"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
)

// isShutdownNotification matches the Property Set of CC with CC.SHN =
// normal: the host's shutdown notification.
func isShutdownNotification(cmd *nvme.Command) bool {
	if cmd.Opcode() != nvme.NVME_FABRICS_COMMAND || cmd.FabricsType() != nvme.NVME_FABRICS_TYPE_PROPERTY_SET {
		return false
	}
	off, _, val := cmd.Property()
	return off == nvme.NVME_REG_CC && uint32(val)&nvme.NVME_CC_SHN_MASK == nvme.NVME_CC_SHN_NORMAL
}

// A delete (detach) tells the controller it is shut down: the target sees
// CC.SHN = normal on the admin queue; a recovery does not.
func TestDeleteSendsShutdownNotification(t *testing.T) {
	r := newRig(t, target.Config{}, time.Second)
	var notified atomic.Int32
	defer r.tg.InjectFault(target.Fault{QID: 0, Match: isShutdownNotification, Before: func() { notified.Add(1) }})()
	c := r.start(nil)
	sc := countStates(c)
	r.tg.DropConnections()
	waitEntered(t, c, lifecycle.StateLive, 2, sc)
	if n := notified.Load(); n != 0 {
		t.Fatalf("recovery sent %d shutdown notifications", n)
	}
	if err := write(c, 0, 2, 22); err != nil {
		t.Fatalf("write: %v", err)
	}
	c.Delete()
	if n := notified.Load(); n != 1 {
		t.Fatalf("the target saw %d shutdown notifications at delete, want 1", n)
	}
	if c.State() != lifecycle.StateDead {
		t.Fatalf("state %v", c.State())
	}
}

// A target that never answers the shutdown notification holds the delete
// only until the bound (Options.ShutdownTimeout here; the controller's
// RTD3E, at least 5 s, otherwise); then the sockets are shut and the
// delete ends as usual.
func TestHungTargetShutdownBounded(t *testing.T) {
	r := newRig(t, target.Config{}, time.Second)
	var notified atomic.Int32
	defer r.tg.InjectFault(target.Fault{QID: 0, Match: isShutdownNotification, Drop: true,
		Before: func() { notified.Add(1) }})()
	c := r.start(func(o *lifecycle.Options) { o.ShutdownTimeout = 200 * time.Millisecond })
	deleted := make(chan struct{})
	go func() {
		defer close(deleted)
		c.Delete()
	}()
	select {
	case <-deleted:
	case <-time.After(20 * time.Second): // only ends the wait; nothing is asserted about time
		t.Fatal("delete held by a target that does not answer the shutdown notification")
	}
	if n := notified.Load(); n != 1 {
		t.Fatalf("the target saw %d shutdown notifications, want 1", n)
	}
	if c.State() != lifecycle.StateDead {
		t.Fatalf("state %v", c.State())
	}
}
