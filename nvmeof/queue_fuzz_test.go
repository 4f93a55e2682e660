package nvmeof

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/internal/pdu"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// controllerStream builds plausible controller bytes for the two commands
// FuzzQueue submits: a 1024-byte read (command ID 0x1000) answered with
// two C2HData PDUs and a response, and an 8192-byte write (0x1001)
// answered with an R2T and a response.
func controllerStream(o pdu.Options) []byte {
	var b []byte
	for _, off := range []uint32{0, 512} {
		h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeC2HData}, Data: pdu.DataHeader{CommandID: 0x1000, DataOffset: off}}
		if off == 512 {
			h.Flags = pdu.NVME_TCP_F_DATA_LAST
		}
		b = pdu.Append(b, &h, make([]byte, 512), o)
	}
	var cqe nvme.Completion
	cqe.SetCommandID(0x1000)
	h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeCapsuleResp}, Resp: cqe}
	b = pdu.Append(b, &h, nil, o)
	r := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeR2T}, R2T: pdu.R2T{CommandID: 0x1001, TTag: 1, Length: 8192}}
	b = pdu.Append(b, &r, nil, o)
	cqe.SetCommandID(0x1001)
	cqe.SetStatus(nvme.NVME_SC_LBA_RANGE | nvme.NVME_STATUS_DNR)
	h = pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeCapsuleResp}, Resp: cqe}
	return pdu.Append(b, &h, nil, o)
}

// FuzzQueue feeds arbitrary controller bytes to a host queue with two
// commands in flight, on its goroutines and driven (Drive, by a
// PollDriver). Whatever arrives, both commands complete exactly once and
// Close returns: an error and a closed queue, never a panic or a hang.
func FuzzQueue(f *testing.F) {
	f.Add(controllerStream(pdu.Options{}), false)
	f.Add(controllerStream(pdu.Options{HeaderDigest: true, DataDigest: true}), true)
	f.Fuzz(func(t *testing.T, b []byte, digests bool) {
		fuzzQueueOnce(t, b, digests, false)
		fuzzQueueOnce(t, b, digests, true)
	})
}

// socketConns is a connected pair of Unix stream sockets as net.Conns: a
// queue on them can be driven, unlike one on net.Pipe.
func socketConns(t *testing.T) (net.Conn, net.Conn) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	return conn(fds[0]), conn(fds[1])
}

func fuzzQueueOnce(t *testing.T, b []byte, digests, driven bool) {
	hostSide, ctrlSide := net.Pipe()
	if driven {
		hostSide, ctrlSide = socketConns(t)
	}
	ctrlDone := make(chan struct{})
	go func() {
		defer close(ctrlDone)
		defer ctrlSide.Close()
		icreq := make([]byte, 128)
		if _, err := io.ReadFull(ctrlSide, icreq); err != nil {
			return
		}
		ic := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeICResp}, ICResp: pdu.ICResp{Digest: icreq[11], MaxH2CData: 4096}}
		drained := make(chan struct{})
		first := make(chan struct{})
		go func() {
			// A driven queue takes over only while idle: the
			// stream starts once its first command arrived.
			var one [1]byte
			io.ReadFull(ctrlSide, one[:])
			close(first)
			io.Copy(io.Discard, ctrlSide)
			close(drained)
		}()
		ctrlSide.Write(pdu.Append(nil, &ic, nil, pdu.Options{}))
		if driven {
			<-first
		}
		ctrlSide.Write(b)
		ctrlSide.Close()
		<-drained
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	q, err := NewQueue(ctx, hostSide, QueueConfig{QID: 1, Size: 4, HeaderDigest: digests, DataDigest: digests,
		Timeout: 5 * time.Second, MaxData: 16384, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		hostSide.Close()
		<-ctrlDone
		return
	}
	if driven {
		d := NewPollDriver(t)
		d.Start(q.DriverCompletion)
		defer d.Stop(q.StopDriving, q.DriverIdle)
		if err := q.Drive(d, 0); err != nil {
			t.Fatalf("Drive: %v", err)
		}
	}
	done := make(chan error, 2)
	read := &Request{Data: make([]byte, 1024)}
	read.Cmd.SetOpcode(nvme.NVME_CMD_READ)
	write := &Request{Data: make([]byte, 8192), Write: true}
	write.Cmd.SetOpcode(nvme.NVME_CMD_WRITE)
	submitted := 0
	for _, r := range []*Request{read, write} {
		if q.Submit(r, func(err error) { done <- err }) == nil {
			submitted++
		}
	}
	for range submitted {
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Fatal("command never completed")
		}
	}
	q.Close()
	<-ctrlDone
	select {
	case err := <-done:
		t.Fatalf("a command completed twice: %v", err)
	default:
	}
}

// TestQueueMutations is a deterministic cousin of FuzzQueue for every
// test run: mutated controller streams, each of which must finish within a
// hang deadline.
func TestQueueMutations(t *testing.T) {
	seeds := [][]byte{controllerStream(pdu.Options{}), controllerStream(pdu.Options{HeaderDigest: true, DataDigest: true})}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 5000 {
		b := append([]byte(nil), seeds[rng.IntN(2)]...)
		for range 1 + rng.IntN(4) {
			switch rng.IntN(3) {
			case 0:
				b[rng.IntN(len(b))] = byte(rng.Uint32())
			case 1:
				k := rng.IntN(len(b))
				b = append(b[:k], b[k+rng.IntN(len(b)-k):]...)
			case 2:
				k := rng.IntN(len(b))
				b = append(b[:k], append(make([]byte, rng.IntN(64)), b[k:]...)...)
			}
			if len(b) == 0 {
				b = []byte{0}
			}
		}
		dg := rng.IntN(2) == 0
		done := make(chan struct{})
		go func() {
			defer close(done)
			fuzzQueueOnce(t, b, dg, i%2 == 1)
		}()
		select {
		case <-done:
		case <-time.After(3 * time.Second):
			panic(fmt.Sprintf("iteration %d hangs (digests %v): %x", i, dg, b))
		}
	}
}
