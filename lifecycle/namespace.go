package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Namespace changes, as the Linux host handles them (drivers/nvme/host/
// core.c: nvme_scan_work -> nvme_validate_ns; nvme_ns_ids_equal;
// nvme_update_ns_info -> set_capacity_and_notify):
//
//   - Identity is NSID, the Namespace Identifiers (NGUID, EUI64, UUID; the
//     command set is always NVM here) and the LBA data size. A reconnect or
//     a Namespace Attribute Changed event that finds another identity
//     deletes the controller and its device: never resume I/O onto a
//     different namespace.
//   - A new size alone keeps the device: it is resized where the block
//     device can be (Resizer; ublk's UPDATE_SIZE, Linux 6.16), otherwise it
//     keeps its size and one WARN line says so. The association bounds I/O
//     by the namespace's current size, so I/O past a shrunk namespace's end
//     fails with EIO either way. A shrink is not a removal: the daemon
//     cannot know which blocks a file system above uses, and Linux keeps
//     the disk too; what is past the new end is gone at the target
//     already.
//   - A namespace that is no longer active (not in the active namespace
//     list, Identify Namespace all zeroes, or Invalid Namespace) is
//     removal: the association is given up as after any error, I/O is
//     held, and reconnects look for the namespace every reconnect_delay.
//     If it comes back with the same identity within ctrl_loss_tmo, the
//     held I/O resumes (a namespace disabled for a while on the target);
//     otherwise the controller and its device are deleted, as after a
//     controller loss (fast_io_fail_tmo fails held I/O earlier, as ever).
//     Linux removes the disk at once unless native multipath keeps the
//     head node (queue_if_no_path, delayed_removal_secs in 6.16); holding
//     within ctrl_loss_tmo is the single-path equivalent.

// NamespaceWatcher is implemented by a Conn whose controller reports
// namespace changes (Namespace Attribute Changed asynchronous events,
// NVMe Base Specification 2.1, 5.2.2.1).
type NamespaceWatcher interface {
	// NamespaceChanged delivers the namespace as identified again after
	// the controller reported that it changed; Blocks is zero when the
	// namespace is no longer active. Only the latest matters: a Conn may
	// replace an undelivered value. Before delivering a namespace of the
	// same identity and a new size, the Conn must already bound its I/O
	// by the new size.
	NamespaceChanged() <-chan Namespace
}

// Resizer is implemented by a Block that can change its size while it
// serves.
type Resizer interface {
	// Size is the block device's size in bytes.
	Size() uint64
	// Resize sets the block device's size to size bytes. An error means
	// the device keeps the size it had (e.g. the kernel lacks ublk's
	// UPDATE_SIZE).
	Resize(ctx context.Context, size uint64) error
}

// ErrNamespaceGone: the controller no longer has the namespace active.
var ErrNamespaceGone = errors.New("namespace no longer active on the controller")

// resizeTimeout bounds one resize of the block device.
const resizeTimeout = 30 * time.Second

// Bytes is the namespace's size in bytes; ok is false when Blocks *
// BlockSize does not fit in 64 bits.
func (n Namespace) Bytes() (size uint64, ok bool) {
	if n.BlockSize == 0 {
		return 0, n.Blocks == 0
	}
	if n.Blocks > ^uint64(0)/uint64(n.BlockSize) {
		return 0, false
	}
	return n.Blocks * uint64(n.BlockSize), true
}

// SameIdentity returns an error describing the first difference in
// identity between n (the namespace first connected to) and o (found on
// reconnect or after a change event), nil if there is none. A different
// size is not one.
func (n Namespace) SameIdentity(o Namespace) error {
	switch {
	case n.NSID != o.NSID:
		return fmt.Errorf("NSID %d, was %d", o.NSID, n.NSID)
	case n.NGUID != o.NGUID:
		return fmt.Errorf("NGUID %x, was %x", o.NGUID, n.NGUID)
	case n.EUI64 != o.EUI64:
		return fmt.Errorf("EUI64 %x, was %x", o.EUI64, n.EUI64)
	case n.UUID != o.UUID:
		return fmt.Errorf("UUID %x, was %x", o.UUID, n.UUID)
	case n.BlockSize != o.BlockSize:
		return fmt.Errorf("block size %d, was %d", o.BlockSize, n.BlockSize)
	}
	return nil
}

// namespaceChanges is the live association's change channel, nil when it
// reports none.
func namespaceChanges(conn Conn) <-chan Namespace {
	if w, ok := conn.(NamespaceWatcher); ok {
		return w.NamespaceChanged()
	}
	return nil
}

// namespaceChanged handles, on the supervisor while LIVE, the namespace as
// the association identified it after a change event. It returns a cause
// wrapping ErrNamespaceGone (start recovery) or ErrNamespaceChanged (delete),
// or nil when the association goes on.
func (c *Controller) namespaceChanged(o Namespace) error {
	if o.Blocks == 0 {
		return fmt.Errorf("%w: namespace %d", ErrNamespaceGone, c.Namespace().NSID)
	}
	return c.adoptNamespace(o)
}

// adoptNamespace compares the namespace found on reconnect or after a
// change event with the one the controller serves: another identity is an
// error wrapping ErrNamespaceChanged; the same one with a new size is
// adopted and the block device resized.
func (c *Controller) adoptNamespace(o Namespace) error {
	c.mu.Lock()
	cur := c.ns
	c.mu.Unlock()
	if err := cur.SameIdentity(o); err != nil {
		return fmt.Errorf("%w: %v", ErrNamespaceChanged, err)
	}
	if o.Blocks == cur.Blocks {
		return nil
	}
	c.log.Info("namespace resized", "nsid", o.NSID, "blocks", o.Blocks, "was", cur.Blocks, "block_size", o.BlockSize)
	c.mu.Lock()
	c.ns.Blocks = o.Blocks
	c.mu.Unlock()
	c.fitBlock()
	return nil
}

// fitBlock makes the block device's size the namespace's, where the block
// device can be resized; otherwise it logs one WARN line.
func (c *Controller) fitBlock() {
	// resizeMu before reading the namespace: two callers (SetBlock and the
	// supervisor applying a change) must not resize in the order opposite
	// to the one they read the size in, leaving the device at a stale size.
	c.resizeMu.Lock()
	defer c.resizeMu.Unlock()
	c.mu.Lock()
	ns, block := c.ns, c.block
	c.mu.Unlock()
	if block == nil {
		return
	}
	size, ok := ns.Bytes()
	if !ok {
		c.log.Warn("namespace size does not fit in 64 bits: the block device keeps its size", "blocks", ns.Blocks, "block_size", ns.BlockSize)
		return
	}
	r, ok := block.(Resizer)
	if !ok {
		c.log.Warn("namespace resized; the block device cannot be resized and keeps its size: I/O past the namespace's end fails with EIO", "size", size)
		return
	}
	was := r.Size()
	if was == size {
		return
	}
	ctx, cancel := context.WithTimeout(c.ctx, resizeTimeout)
	defer cancel()
	if err := r.Resize(ctx, size); err != nil {
		c.log.Warn("namespace resized; the block device keeps its size: I/O past the namespace's end fails with EIO",
			"size", size, "device_size", was, "err", err)
		return
	}
	c.log.Info("block device resized", "size", size, "was", was)
}
