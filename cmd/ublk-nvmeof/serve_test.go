package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// startServeLoopback runs `serve` on a free loopback port with an 8 MiB namespace
// and args, and returns its process, the first line it printed ("serving
// NQN namespace 1 (N bytes) on ADDR") and its stderr; it is killed when
// the test ends unless the test waited for it.
func startServeLoopback(t *testing.T, nqn string, args ...string) (*exec.Cmd, string, *bytes.Buffer) {
	t.Helper()
	cmd := exec.Command(os.Args[0], append([]string{"serve", "--listen", "127.0.0.1:0", "--nqn", nqn, "--size", "8M"}, args...)...)
	cmd.Env = append(os.Environ(), envRunMain+"=1")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	})
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("serve printed nothing: %v\n%s", err, stderr.String())
	}
	return cmd, line, &stderr
}

// startServeOnFreePort is startServeLoopback returning the process and the
// address it serves on.
func startServeOnFreePort(t *testing.T, nqn string, args ...string) (*exec.Cmd, string) {
	t.Helper()
	cmd, line, _ := startServeLoopback(t, nqn, args...)
	f := strings.Fields(line)
	return cmd, f[len(f)-1]
}

// TestServeAllowHost: with --allow-host only the named hosts connect to
// the subsystem; another host's Connect is refused (Connect Invalid Host).
func TestServeAllowHost(t *testing.T) {
	const nqn = "nqn.2026-11.io.ublk-nvmeof:serve-allow"
	const allowed = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000a1"
	_, addr := startServeOnFreePort(t, nqn, "--allow-host", allowed)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, host := range []string{allowed, "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000b2"} {
		c, err := nvmeof.Connect(ctx, nvmeof.ControllerConfig{Addr: addr, SubsysNQN: nqn, Host: nvmeof.HostIdentity{NQN: host}, IOQueues: 1})
		if host == allowed {
			if err != nil {
				t.Fatalf("allowed host: %v", err)
			}
			c.Close()
			continue
		}
		var st nvme.Status
		if !errors.As(err, &st) || st.Code() != nvme.NVME_SC_CONNECT_INVALID_HOST {
			if err == nil {
				c.Close()
			}
			t.Fatalf("host not allowed: %v, want Connect Invalid Host", err)
		}
	}
}

// rawConn speaks NVMe/TCP to serve byte by byte (no digests, CPDA 0).
type rawConn struct {
	t  *testing.T
	nc net.Conn
}

func dialRawServe(t *testing.T, addr string) *rawConn {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(60 * time.Second)) // a hang, not slowness
	r := &rawConn{t: t, nc: nc}
	icreq := make([]byte, 128) // ICReq: type 0, hlen 128, plen 128, PFV 0, no digests, MAXR2T 0
	icreq[2] = 128
	binary.LittleEndian.PutUint32(icreq[4:], 128)
	r.write(icreq)
	if hdr := r.read(128); hdr[0] != 1 {
		t.Fatalf("PDU type %d instead of ICResp", hdr[0])
	}
	return r
}

func (r *rawConn) write(b []byte) {
	r.t.Helper()
	if _, err := r.nc.Write(b); err != nil {
		r.t.Fatal(err)
	}
}

func (r *rawConn) read(n int) []byte {
	r.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(r.nc, b); err != nil {
		r.t.Fatal(err)
	}
	return b
}

// capsule sends a CapsuleCmd with optional in-capsule data.
func (r *rawConn) capsule(cmd nvme.Command, data []byte) {
	r.t.Helper()
	hdr := []byte{4, 0, 72, 0, 0, 0, 0, 0}
	if len(data) > 0 {
		hdr[3] = 72
	}
	binary.LittleEndian.PutUint32(hdr[4:], uint32(72+len(data)))
	r.write(append(append(hdr, cmd[:]...), data...))
}

// pdu reads one PDU without data (CapsuleResp, R2T, C2HTermReq) and
// returns its type and whole bytes; io.EOF once the connection ends.
func (r *rawConn) pdu() (byte, []byte, error) {
	hdr := make([]byte, 8)
	if _, err := io.ReadFull(r.nc, hdr); err != nil {
		return 0, nil, err
	}
	plen := binary.LittleEndian.Uint32(hdr[4:])
	if plen < 8 || plen > 256 {
		r.t.Fatalf("PDU type %d with plen %d", hdr[0], plen)
	}
	rest := make([]byte, plen-8)
	if _, err := io.ReadFull(r.nc, rest); err != nil {
		return 0, nil, err
	}
	return hdr[0], append(hdr, rest...), nil
}

// connectAdmin connects an admin queue of 32 entries (SQSIZE 31).
func (r *rawConn) connectAdmin(nqn, host string) {
	r.t.Helper()
	var c nvme.Command
	c.SetConnect(nvme.Connect{QID: 0, SQSize: 31})
	data := (&nvme.ConnectData{CNTLID: nvme.NVME_CNTLID_DYNAMIC, SubsysNQN: nqn, HostNQN: host}).Marshal()
	c.SetSGL(0, uint32(len(data)), nvme.SGLInCapsule)
	r.capsule(c, data)
	typ, b, err := r.pdu()
	if err != nil || typ != 5 || binary.LittleEndian.Uint16(b[8+14:])>>1 != 0 {
		r.t.Fatalf("Connect: type %d % x %v", typ, b, err)
	}
}

// hostileWrite is a capsule announcing 1 MiB of write data by R2T
// (opcode 0x01: data from the host) whose data never comes.
func hostileWrite(cid uint16) nvme.Command {
	var c nvme.Command
	c.SetOpcode(0x01)
	c.SetCommandID(cid)
	c.SetSGL(0, 1<<20, nvme.SGLTransport)
	return c
}

// expectEnd reads until a C2HTermReq and then the end of the connection.
func (r *rawConn) expectEnd() {
	r.t.Helper()
	term := false
	for {
		typ, _, err := r.pdu()
		if err != nil {
			if !term {
				r.t.Fatalf("connection ended (%v) without a C2HTermReq", err)
			}
			return
		}
		term = term || typ == 3
	}
}

// dataMemory is the writable memory process pid has mapped (VmData: the
// Go heap as the runtime maps it), from /proc. Resident memory would not
// do: a buffer allocated and never written costs address space and heap,
// not resident pages.
func dataMemory(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Skipf("no /proc: %v", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) == 3 && f[0] == "VmData:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	t.Fatal("no VmData")
	return 0
}

// TestServeHostileClientMemory: hostile clients cannot make `serve` grow
// past the stated bound: capsules before Connect end their connection with
// nothing allocated; an admitted host's writes whose data never comes hold
// at most 4 MiB per connection (the rest wait with nothing allocated, where
// serve used to allocate 1 MiB each), and one command past SQSIZE ends the
// connection. Measured as the serve process's mapped data memory.
func TestServeHostileClientMemory(t *testing.T) {
	const nqn = "nqn.2026-11.io.ublk-nvmeof:serve-hostile"
	const host = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000c3"
	const conns = 8
	// Per connection 4 MiB of write buffers; the runtime's own growth
	// (heap goal, spans; the race detector's shadow under -race),
	// goroutines and socket buffers: 96 MiB more. Without the bound the
	// 8 x 30 MiB waiting show (measured under -race: 750 MiB without
	// it, 50 to 66 MiB with it).
	const bound = conns*4<<20 + 96<<20
	cmd, addr := startServeOnFreePort(t, nqn)
	pid := cmd.Process.Pid
	before := dataMemory(t, pid)

	// 200 capsules without Connect, on 50 connections: each is ended
	// at its first capsule.
	for range 50 {
		r := dialRawServe(t, addr)
		var b []byte
		for cid := range uint16(4) {
			c := hostileWrite(cid)
			b = append(append(b, 4, 0, 72, 0, 72, 0, 0, 0), c[:]...)
		}
		r.write(b)
		r.expectEnd()
	}

	// Admitted hosts filling their admin queues (SQSIZE 31) with writes
	// whose data never comes.
	var hostile []*rawConn
	for range conns {
		r := dialRawServe(t, addr)
		r.connectAdmin(nqn, host)
		for cid := range uint16(30) {
			r.capsule(hostileWrite(cid), nil)
		}
		// A Keep Alive after them: once it is answered, every write
		// before it has been read (serve reads a connection in order).
		var ka nvme.Command
		ka.SetOpcode(nvme.NVME_ADMIN_KEEP_ALIVE)
		ka.SetCommandID(100)
		r.capsule(ka, nil)
		r2ts, answered := 0, false
		for !answered {
			typ, b, err := r.pdu()
			if err != nil {
				t.Fatal(err)
			}
			r2ts += bool2int(typ == 9)
			answered = typ == 5 && binary.LittleEndian.Uint16(b[8+12:]) == 100
		}
		// The target asked for data within 4 MiB: 4 R2Ts.
		if r2ts != 4 {
			t.Fatalf("%d R2Ts for 30 writes of 1 MiB, want 4", r2ts)
		}
		hostile = append(hostile, r)
	}
	grew := dataMemory(t, pid) - before
	t.Logf("serve's mapped memory grew by %d KiB", grew>>10)
	if grew > bound {
		t.Fatalf("serve grew by %d bytes with %d hostile connections, bound %d", grew, conns, bound)
	}
	// Past SQSIZE: 30 writes outstanding and two more end the connection.
	for _, r := range hostile {
		r.capsule(hostileWrite(30), nil)
		r.capsule(hostileWrite(31), nil)
		r.expectEnd()
	}
}

func bool2int(b bool) int {
	if b {
		return 1
	}
	return 0
}
