package ublk

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
)

// roundTrip writes and reads back one 1 MiB O_DIRECT buffer at off.
func roundTrip(t *testing.T, path string, off int64, seed byte) {
	t.Helper()
	f := openBlock(t, path, os.O_RDWR|unix.O_DIRECT)
	defer f.Close()
	buf := alignedBuf(t, mib)
	pattern(buf, seed, off)
	if _, err := f.WriteAt(buf, off); err != nil {
		t.Fatal(err)
	}
	clear(buf)
	if _, err := f.ReadAt(buf, off); err != nil {
		t.Fatal(err)
	}
	checkPattern(t, path, buf, seed, off)
}

// TestGuestLegacyOpcodes: with the pre-6.2 command encoding (which this
// kernel still accepts, CONFIG_BLKDEV_UBLK_LEGACY_OPCODES=y) the whole
// device life cycle works: the fallback path for old kernels.
func TestGuestLegacyOpcodes(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	c.encode = false
	mem, err := NewMemoryBackend(4 * mib)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mem.Close() })
	d := createDevice(t, c, Options{ID: AutoID, Queues: 1, Depth: 16, Params: Params{Size: 4 * mib}}, mem)
	roundTrip(t, d.BlockDevice(), mib, 7)
	checkPattern(t, "backend", mem.Bytes()[mib:2*mib], 7, mib)
}

// TestGuestListAndChosenID: a device created with a chosen id gets it, and
// List reports every device with its state and daemon.
func TestGuestListAndChosenID(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	a := createDevice(t, c, Options{ID: 7, Queues: 1, Depth: 4, Params: Params{Size: mib}}, NullBackend{})
	if a.ID() != 7 || a.BlockDevice() != "/dev/ublkb7" {
		t.Fatalf("chosen id 7: got %d (%s)", a.ID(), a.BlockDevice())
	}
	b := createDevice(t, c, Options{ID: AutoID, Queues: 2, Depth: 8, Recovery: Recovery, Params: Params{Size: 2 * mib}}, NullBackend{})
	list, err := c.List(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("List: %+v", list)
	ids := []int{}
	for _, i := range list {
		ids = append(ids, i.ID)
		if i.State != StateLive || i.DaemonPID != os.Getpid() {
			t.Errorf("device %d: %v served by %d, want LIVE by %d", i.ID, i.State, i.DaemonPID, os.Getpid())
		}
		if i.ID == b.ID() && (i.Queues != 2 || i.Depth != 8 || !i.Flags.Has(FeatureUserRecovery)) {
			t.Errorf("device %d: %+v", i.ID, i)
		}
	}
	if !slices.Contains(ids, 7) || !slices.Contains(ids, b.ID()) {
		t.Errorf("List ids %v lack 7 and %d", ids, b.ID())
	}
}

// TestGuestStoppedElsewhere: when someone else stops the device, the
// queues end (Done closes) and Close still deletes it.
func TestGuestStoppedElsewhere(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	d, err := c.Create(t.Context(), Options{ID: AutoID, Queues: 2, Depth: 8, Params: Params{Size: mib}}, NullBackend{})
	if err != nil {
		t.Fatal(err)
	}
	stoppedElsewhere(t, c, d)
}

// stoppedElsewhere sends STOP_DEV for d through another Control and
// checks that d's queues end by themselves, without an error, and that d
// then closes and is gone.
func stoppedElsewhere(t *testing.T, c *Control, d *Device) {
	t.Helper()
	other := openControl(t)
	if err := other.stopDev(t.Context(), d.ID()); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d.Done():
	case <-time.After(time.Minute):
		t.Fatal("queues still serving a minute after STOP_DEV")
	}
	if err := d.Err(); err != nil {
		t.Errorf("queues ended with %v", err)
	}
	if err := d.Close(t.Context()); err != nil {
		t.Errorf("Close after an external stop: %v", err)
	}
	assertGone(t, c, d.ID())
}

// TestGuestRecoverErrors: recovering a device that is served, or that was
// created without recovery, fails clearly and harms nothing.
func TestGuestRecoverErrors(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	plain := createDevice(t, c, Options{ID: AutoID, Queues: 1, Depth: 4, Params: Params{Size: mib}}, NullBackend{})
	if _, err := c.Recover(t.Context(), plain.ID(), NullBackend{}); err == nil {
		t.Error("recovered a device created without USER_RECOVERY")
	} else {
		t.Logf("without USER_RECOVERY: %v", err)
	}
	live := createDevice(t, c, Options{ID: AutoID, Queues: 1, Depth: 4, Recovery: RecoveryReissue, Params: Params{Size: mib}}, NullBackend{})
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
	defer cancel()
	if _, err := c.Recover(ctx, live.ID(), NullBackend{}); !errors.Is(err, unix.EBUSY) {
		t.Errorf("recovering a live device: %v, want EBUSY", err)
	} else {
		t.Logf("live device: %v", err)
	}
	// The failed attempt did not disturb the device: I/O still flows
	// (NullBackend keeps no data, so only the read's success is checked).
	f := openBlock(t, live.BlockDevice(), os.O_RDONLY|unix.O_DIRECT)
	if _, err := f.ReadAt(alignedBuf(t, 4096), 0); err != nil {
		t.Errorf("read after the failed recovery: %v", err)
	}
	f.Close()
	if _, err := c.Recover(t.Context(), 999, NullBackend{}); !errors.Is(err, unix.ENODEV) {
		t.Errorf("recovering a missing device: %v, want ENODEV", err)
	}
}

// TestGuestMissingFeature: asking for a feature this kernel lacks fails
// before anything is created, naming the feature and the release.
func TestGuestMissingFeature(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	f, _ := c.Features()
	if f.Has(FeatureUserRecoveryFailIO) {
		t.Skipf("this kernel has USER_RECOVERY_FAIL_IO (%v)", f)
	}
	before, _ := c.List(t.Context())
	_, err := c.Create(t.Context(), Options{ID: AutoID, Depth: 4, Recovery: RecoveryFailIO, Params: Params{Size: mib}}, NullBackend{})
	var fe *FeatureError
	if !errors.Is(err, ErrNotSupported) || !errors.As(err, &fe) || fe.Feature != "UBLK_F_USER_RECOVERY_FAIL_IO" || fe.Since != "6.13" {
		t.Fatalf("Create with RecoveryFailIO: %v", err)
	}
	t.Log(err)
	after, _ := c.List(t.Context())
	if len(after) != len(before) {
		t.Errorf("devices before %v, after %v", before, after)
	}
}

// TestGuestQueueAffinity: every CPU maps to exactly one queue.
func TestGuestQueueAffinity(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	n := min(2, possibleCPUs())
	d := createDevice(t, c, Options{ID: AutoID, Queues: n, Depth: 4, Params: Params{Size: mib}}, NullBackend{})
	total := 0
	var union unix.CPUSet
	for q := range n {
		set, err := c.QueueAffinity(t.Context(), d.ID(), q)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("queue %d: %d CPUs", q, set.Count())
		total += set.Count()
		for cpu := range possibleCPUs() {
			if set.IsSet(cpu) {
				union.Set(cpu)
			}
		}
	}
	if total != possibleCPUs() || union.Count() != possibleCPUs() {
		t.Errorf("queues cover %d CPUs (%d distinct), want each of %d once", total, union.Count(), possibleCPUs())
	}
}

// TestGuestStopThenClose: Stop removes the block device and ends the
// queues but keeps the device, which Close then deletes.
func TestGuestStopThenClose(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	d, err := c.Create(t.Context(), Options{ID: AutoID, Queues: 2, Depth: 8, Params: Params{Size: mib}}, NullBackend{})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Stop(t.Context()); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	select {
	case <-d.Done():
	default:
		t.Error("queues still running after Stop")
	}
	if _, err := os.Stat(fmt.Sprintf("/sys/block/ublkb%d", d.ID())); err == nil {
		t.Error("block device still present after Stop")
	}
	info, err := c.DeviceInfo(t.Context(), d.ID())
	if err != nil || info.State != StateDead {
		t.Errorf("device after Stop: %+v, %v; want it present and DEAD", info, err)
	}
	if err := d.Close(t.Context()); err != nil {
		t.Fatalf("Close after Stop: %v", err)
	}
	assertGone(t, c, d.ID())
}
