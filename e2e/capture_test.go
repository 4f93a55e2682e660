package e2e

import (
	"encoding/binary"
	"fmt"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// kaCapture watches the loopback for NVMe/TCP Keep Alive commands to a
// target port and their responses, so that the detach cycles can aim at a
// keep-alive the daemon really sent, and tell afterwards whether the
// detach landed while one was in flight.
type kaCapture struct {
	port uint16
	fd   int
	stop chan struct{}
	wg   sync.WaitGroup

	mu  sync.Mutex
	kas []keepAliveSeen
}

// keepAliveSeen is one Keep Alive on the wire.
type keepAliveSeen struct {
	sent, answered time.Time // answered is zero while no response was seen
	conn           string    // the host's side, address:port
	cid            uint16
}

// NVMe/TCP PDU types (NVMe/TCP transport specification, 3.6.1) and the
// Keep Alive admin opcode (NVMe base specification, 5.1).
const (
	pduCapsuleCmd  = 0x04
	pduCapsuleResp = 0x05
	opKeepAlive    = 0x18
	packetOutgoing = 4 // PACKET_OUTGOING, linux/if_packet.h
)

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// startKACapture starts watching; it is stopped, and its goroutine joined,
// when t ends.
func startKACapture(t *testing.T, port int) *kaCapture {
	t.Helper()
	// Network-layer packets (no link header) of every interface; only the
	// loopback's matter, and every packet there is seen twice (outgoing
	// and incoming): the outgoing copy is skipped.
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_IP)))
	if err != nil {
		t.Fatalf("packet socket: %v", err)
	}
	// A receive timeout, so that the reader notices stop; the kernel's
	// receive time of every packet, not the reader's.
	tv := unix.NsecToTimeval(int64(50 * time.Millisecond))
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TIMESTAMPNS, 1); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	c := &kaCapture{port: uint16(port), fd: fd, stop: make(chan struct{})}
	c.wg.Add(1)
	go c.read()
	t.Cleanup(func() {
		close(c.stop)
		c.wg.Wait()
		unix.Close(fd)
	})
	return c
}

func (c *kaCapture) read() {
	defer c.wg.Done()
	buf := make([]byte, 65536)
	oob := make([]byte, 128)
	for {
		select {
		case <-c.stop:
			return
		default:
		}
		n, oobn, _, from, err := unix.Recvmsg(c.fd, buf, oob, 0)
		if err != nil {
			continue // the timeout, or EINTR
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == packetOutgoing {
			continue
		}
		c.packet(packetTime(oob[:oobn]), buf[:n])
	}
}

// packetTime is the kernel's timestamp of a packet (SCM_TIMESTAMPNS,
// CLOCK_REALTIME), or now if there is none.
func packetTime(oob []byte) time.Time {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err == nil {
		for _, m := range msgs {
			if m.Header.Level == unix.SOL_SOCKET && m.Header.Type == unix.SCM_TIMESTAMPNS && len(m.Data) >= 16 {
				sec := int64(binary.NativeEndian.Uint64(m.Data[0:]))
				nsec := int64(binary.NativeEndian.Uint64(m.Data[8:]))
				return time.Unix(sec, nsec)
			}
		}
	}
	return time.Now()
}

// packet looks at one IPv4 packet.
func (c *kaCapture) packet(at time.Time, p []byte) {
	if len(p) < 20 || p[0]>>4 != 4 || p[9] != unix.IPPROTO_TCP {
		return
	}
	ihl := int(p[0]&0x0f) * 4
	total := int(binary.BigEndian.Uint16(p[2:]))
	if total > len(p) || ihl+20 > total {
		return
	}
	tcp := p[ihl:total]
	src, dst := binary.BigEndian.Uint16(tcp[0:]), binary.BigEndian.Uint16(tcp[2:])
	off := int(tcp[12]>>4) * 4
	if off > len(tcp) {
		return
	}
	payload := tcp[off:]
	// An idle admin queue sends each PDU in a segment of its own; a PDU
	// inside a segment of other traffic is not a keep-alive we aim at.
	switch {
	case dst == c.port && len(payload) >= 72 && payload[0] == pduCapsuleCmd && payload[8] == opKeepAlive:
		conn := fmt.Sprintf("%d.%d.%d.%d:%d", p[12], p[13], p[14], p[15], src)
		cid := binary.LittleEndian.Uint16(payload[8+2:])
		c.mu.Lock()
		c.kas = append(c.kas, keepAliveSeen{sent: at, conn: conn, cid: cid})
		c.mu.Unlock()
	case src == c.port && len(payload) >= 24 && payload[0] == pduCapsuleResp:
		conn := fmt.Sprintf("%d.%d.%d.%d:%d", p[16], p[17], p[18], p[19], dst)
		cid := binary.LittleEndian.Uint16(payload[8+12:])
		c.mu.Lock()
		for i := len(c.kas) - 1; i >= 0; i-- {
			if k := &c.kas[i]; k.conn == conn && k.cid == cid && k.answered.IsZero() {
				k.answered = at
				break
			}
		}
		c.mu.Unlock()
	}
}

// after returns the first keep-alive sent after t, if any.
func (c *kaCapture) after(t time.Time) (keepAliveSeen, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, k := range c.kas {
		if k.sent.After(t) {
			return k, true
		}
	}
	return keepAliveSeen{}, false
}

// waitAfter waits up to timeout for a keep-alive sent after t.
func (c *kaCapture) waitAfter(t time.Time, timeout time.Duration) (keepAliveSeen, bool) {
	deadline := time.Now().Add(timeout)
	for {
		if k, ok := c.after(t); ok {
			return k, true
		}
		if time.Now().After(deadline) {
			return keepAliveSeen{}, false
		}
		time.Sleep(time.Millisecond)
	}
}

// inFlightAt returns the last keep-alive sent at or before t and whether it
// was still unanswered at t (answered later, or never: cut off by the
// teardown).
func (c *kaCapture) inFlightAt(t time.Time) (keepAliveSeen, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := len(c.kas) - 1; i >= 0; i-- {
		k := c.kas[i]
		if k.sent.After(t) {
			continue
		}
		return k, k.answered.IsZero() || k.answered.After(t)
	}
	return keepAliveSeen{}, false
}

// nearest returns the keep-alive sent nearest to t.
func (c *kaCapture) nearest(t time.Time) (keepAliveSeen, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var best keepAliveSeen
	found := false
	for _, k := range c.kas {
		if !found || absDuration(k.sent.Sub(t)) < absDuration(best.sent.Sub(t)) {
			best, found = k, true
		}
	}
	return best, found
}

func absDuration(d time.Duration) time.Duration {
	if d < 0 {
		return -d
	}
	return d
}
