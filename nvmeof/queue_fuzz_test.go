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
func controllerStream(o pdu.Options) []byte { return controllerStreamSized(o, smallShape) }

// controllerStreamSized is controllerStream for the commands of shape s:
// the read answered with two C2HData PDUs of half its length each.
func controllerStreamSized(o pdu.Options, s fuzzShape) []byte {
	var b []byte
	half := uint32(s.readLen / 2)
	for _, off := range []uint32{0, half} {
		h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeC2HData}, Data: pdu.DataHeader{CommandID: 0x1000, DataOffset: off}}
		if off == half {
			h.Flags = pdu.NVME_TCP_F_DATA_LAST
		}
		b = pdu.Append(b, &h, make([]byte, half), o)
	}
	var cqe nvme.Completion
	cqe.SetCommandID(0x1000)
	h := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeCapsuleResp}, Resp: cqe}
	b = pdu.Append(b, &h, nil, o)
	r := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeR2T}, R2T: pdu.R2T{CommandID: 0x1001, TTag: 1, Length: uint32(s.writeLen)}}
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
		fuzzQueueOnce(t, b, digests, smallShape)
		driven := smallShape
		driven.driven = true
		fuzzQueueOnce(t, b, digests, driven)
	})
}

// fuzzShape is what fuzzQueueOnce sets up: the queue on its goroutines or
// driven, the commands' lengths, the controller's MAXH2CDATA, and the
// most one receive of the driver reads (0: no bound).
type fuzzShape struct {
	driven            bool
	readLen, writeLen int
	maxH2CData        uint32
	recvMax           int
	fixed             bool // the commands' data is Fixed (zero copy)
}

var (
	smallShape = fuzzShape{readLen: 1024, writeLen: 8192, maxH2CData: 4096}
	// largeShape's data is large enough to be received into and sent
	// from the commands' buffers on a driven queue (placedMin,
	// gatherMin).
	largeShape = fuzzShape{driven: true, readLen: 2 * placedMin, writeLen: 2 * gatherMin, maxH2CData: 2 * gatherMin}
)

// FuzzQueueLarge is FuzzQueue's driven queue with commands whose data is
// received straight into and sent straight from their buffers, the
// driver's receives cut short so that PDUs arrive in pieces (the first
// input byte sets where): whatever arrives, both commands complete once
// and Close returns.
func FuzzQueueLarge(f *testing.F) {
	f.Add(append([]byte{0}, controllerStreamSized(pdu.Options{}, largeShape)...), false)
	f.Add(append([]byte{3}, controllerStreamSized(pdu.Options{HeaderDigest: true, DataDigest: true}, largeShape)...), true)
	f.Add(append([]byte{200}, controllerStreamSized(pdu.Options{}, largeShape)...), false)
	f.Fuzz(func(t *testing.T, b []byte, digests bool) {
		if len(b) == 0 {
			return
		}
		shape := largeShape
		shape.recvMax = 64 + int(b[0])*96 // 64 bytes to about 24 KiB
		fuzzQueueOnce(t, b[1:], digests, shape)
	})
}

// FuzzQueueFixed is FuzzQueueLarge with the commands' data Fixed (zero
// copy: moved by the driver's RecvFixed and SendFixed, small pieces by
// ReadAt and WriteAt), without digests (refused with them).
func FuzzQueueFixed(f *testing.F) {
	f.Add(append([]byte{0}, controllerStreamSized(pdu.Options{}, largeShape)...))
	f.Add(append([]byte{3}, controllerStreamSized(pdu.Options{HeaderDigest: true}, largeShape)...))
	f.Add(append([]byte{200}, controllerStreamSized(pdu.Options{}, largeShape)...))
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) == 0 {
			return
		}
		shape := largeShape
		shape.fixed = true
		shape.recvMax = 64 + int(b[0])*96
		fuzzQueueOnce(t, b[1:], false, shape)
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

func fuzzQueueOnce(t *testing.T, b []byte, digests bool, shape fuzzShape) {
	driven := shape.driven
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
		ic := pdu.Header{CommonHeader: pdu.CommonHeader{Type: pdu.TypeICResp}, ICResp: pdu.ICResp{Digest: icreq[11], MaxH2CData: shape.maxH2CData}}
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
		Timeout: 5 * time.Second, MaxData: max(16384, shape.readLen, shape.writeLen), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		hostSide.Close()
		<-ctrlDone
		return
	}
	if driven {
		d := NewPollDriver(t)
		d.RecvMax = shape.recvMax
		d.Start(q.DriverCompletion)
		defer d.Stop(q.StopDriving, q.DriverIdle)
		if err := q.Drive(d, 0); err != nil {
			t.Fatalf("Drive: %v", err)
		}
	}
	done := make(chan error, 2)
	read := &Request{Data: make([]byte, shape.readLen)}
	read.Cmd.SetOpcode(nvme.NVME_CMD_READ)
	write := &Request{Data: make([]byte, shape.writeLen), Write: true}
	write.Cmd.SetOpcode(nvme.NVME_CMD_WRITE)
	if shape.fixed {
		read.Fixed, read.Data = &TestFixed{B: read.Data}, nil
		write.Fixed, write.Data = &TestFixed{B: write.Data}, nil
	}
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
			shape := smallShape
			shape.driven = i%2 == 1
			fuzzQueueOnce(t, b, dg, shape)
		}()
		select {
		case <-done:
		case <-time.After(3 * time.Second):
			panic(fmt.Sprintf("iteration %d hangs (digests %v): %x", i, dg, b))
		}
	}
}
