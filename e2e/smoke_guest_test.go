package e2e

import (
	"bytes"
	"crypto/rand"
	"os"
	"os/exec"
	"testing"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
)

func TestGuestKernelModules(t *testing.T) {
	guest.Require(t)
	for _, p := range []string{
		"/dev/ublk-control", "/dev/nvme-fabrics", "/dev/ram0",
		"/sys/module/ublk_drv", "/sys/module/nvme_tcp", "/sys/module/nvmet_tcp",
		"/sys/kernel/config/nvmet",
	} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("%v", err)
		}
	}
}

// TestGuestKernelInitiatorLoopback: the Linux nvmet-tcp target on a RAM disk
// serves the Linux nvme-tcp initiator over 127.0.0.1:4420; data written
// through /dev/nvmeXn1 is on the RAM disk and reads back the same.
func TestGuestKernelInitiatorLoopback(t *testing.T) {
	guest.Require(t)
	tg := guest.NewTarget(t, guest.TargetOptions{Device: "/dev/ram0"})
	kc, err := guest.ConnectKernel(tg)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := kc.Disconnect(); err != nil {
			t.Error(err)
		}
	}()
	dev := kc.NamespaceDevice(1)

	const size = 4 << 20
	const off = 1 << 20
	pattern := guest.AlignedBuf(t, size)
	if _, err := rand.Read(pattern); err != nil {
		t.Fatal(err)
	}
	guest.DirectIO(t, dev, pattern, off, true)

	onDisk := guest.AlignedBuf(t, size)
	guest.DirectIO(t, "/dev/ram0", onDisk, off, false)
	if !bytes.Equal(onDisk, pattern) {
		t.Fatal("RAM disk content differs from what was written through nvme-tcp")
	}
	back := guest.AlignedBuf(t, size)
	guest.DirectIO(t, dev, back, off, false)
	if !bytes.Equal(back, pattern) {
		t.Fatal("read back through nvme-tcp differs from what was written")
	}
}

// TestGuestFio: fio (a host program with its shared libraries) runs in the
// guest and verifies what it wrote, here on the second RAM disk.
func TestGuestFio(t *testing.T) {
	guest.Require(t)
	out, err := exec.Command("fio", "--name=smoke", "--filename=/dev/ram1", "--direct=1",
		"--rw=randwrite", "--bs=4k", "--size=4m", "--ioengine=psync",
		"--verify=crc32c", "--do_verify=1", "--output-format=terse").CombinedOutput()
	if err != nil {
		t.Fatalf("fio: %v\n%s", err, out)
	}
}
