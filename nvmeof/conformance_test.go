package nvmeof_test

import (
	"context"
	"encoding/binary"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/scripted"
)

// Tests of the values a controller reports, against a scripted controller
// over net.Pipe: each is bounded before use, and a bad one ends Connect
// with an error naming the field (the Linux host's checks in
// nvme_init_identify and nvme_tcp_setup_ctrl).

// pipeDial returns a Dial that serves every connection with script on the
// other end of a net.Pipe; the serving goroutines are joined at cleanup,
// after the controller (closed by a later-registered cleanup) is gone.
func pipeDial(t *testing.T, script *scripted.Script) func(context.Context, string) (net.Conn, error) {
	p := &pipeScript{script: script}
	t.Cleanup(p.close)
	return p.dial
}

// pipeScript serves script on the controller's end of every net.Pipe its
// dial makes; close ends them all and joins their goroutines.
type pipeScript struct {
	script *scripted.Script
	wg     sync.WaitGroup
	mu     sync.Mutex
	ends   []net.Conn
}

func (p *pipeScript) dial(ctx context.Context, addr string) (net.Conn, error) {
	host, ctrl := net.Pipe()
	p.mu.Lock()
	p.ends = append(p.ends, ctrl)
	p.mu.Unlock()
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		defer ctrl.Close()
		scripted.Serve(ctrl, p.script)
	}()
	return host, nil
}

func (p *pipeScript) close() {
	p.mu.Lock()
	for _, c := range p.ends {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

var quiet = slog.New(slog.DiscardHandler)

// connectScripted connects to script (an NVM subsystem unless nqn is the
// discovery NQN); the controller is closed at cleanup.
func connectScripted(t *testing.T, script *scripted.Script, cfg nvmeof.ControllerConfig) (*nvmeof.Controller, error) {
	t.Helper()
	cfg.Dial = pipeDial(t, script)
	cfg.Addr = "scripted"
	if cfg.SubsysNQN == "" {
		cfg.SubsysNQN = scripted.PoliteNQN
	}
	cfg.Host = testHost
	cfg.Logger = quiet
	if cfg.AdminTimeout == 0 {
		cfg.AdminTimeout = hangDeadline
	}
	c, err := nvmeof.Connect(testCtx(t), cfg)
	if err == nil {
		t.Cleanup(func() { c.Close() })
	}
	return c, err
}

// patchIdentify changes the Identify Controller data the polite
// controller sends (discovery or not).
func patchIdentify(patch func(*nvme.IdentifyController)) func(*scripted.Command, scripted.Reply) scripted.Reply {
	return func(c *scripted.Command, r scripted.Reply) scripted.Reply {
		if c.QID == 0 && c.Cmd.Opcode() == nvme.NVME_ADMIN_IDENTIFY && uint8(c.Cmd.CDW(10)) == nvme.NVME_ID_CNS_CTRL {
			id, err := nvme.ParseIdentifyController(r.Data)
			if err != nil {
				panic(err)
			}
			patch(id)
			r.Data = id.Marshal()
		}
		return r
	}
}

func TestControllerValuesBounded(t *testing.T) {
	for _, tc := range []struct {
		name  string
		disc  bool
		setup func(p *scripted.Polite, s *scripted.Script)
		want  string // in the error
	}{
		{"MDTS 51", false, func(p *scripted.Polite, s *scripted.Script) { p.Controller.MDTS = 51 }, "MDTS 51"},
		{"MDTS 52", false, func(p *scripted.Polite, s *scripted.Script) { p.Controller.MDTS = 52 }, "MDTS 52"},
		{"MDTS 255", false, func(p *scripted.Polite, s *scripted.Script) { p.Controller.MDTS = 255 }, "MDTS 255"},
		{"MDTS 21", false, func(p *scripted.Polite, s *scripted.Script) { p.Controller.MDTS = 21 }, "MDTS 21"},
		{"discovery MDTS 51", true, func(p *scripted.Polite, s *scripted.Script) {
			s.Reply = patchIdentify(func(id *nvme.IdentifyController) { id.MDTS = 51 })
		}, "MDTS 51"},
		{"discovery MDTS 255", true, func(p *scripted.Polite, s *scripted.Script) {
			s.Reply = patchIdentify(func(id *nvme.IdentifyController) { id.MDTS = 255 })
		}, "MDTS 255"},
		{"CAP.MPSMIN", false, func(p *scripted.Polite, s *scripted.Script) { p.CAP |= 1 << 48 }, "CAP.MPSMIN 1"},
		{"CAP.MQES 0", false, func(p *scripted.Polite, s *scripted.Script) { p.CAP &^= 0xffff }, "CAP.MQES 0"},
		{"MAXCMD 1", false, func(p *scripted.Polite, s *scripted.Script) { p.Controller.MAXCMD = 1 }, "MAXCMD 1"},
		{"IOCCSZ 3", false, func(p *scripted.Polite, s *scripted.Script) { p.Controller.IOCCSZ = 3 }, "IOCCSZ 3"},
		{"IORCSZ 0", false, func(p *scripted.Polite, s *scripted.Script) { p.Controller.IORCSZ = 0 }, "IORCSZ 0"},
		{"ICDOFF", false, func(p *scripted.Polite, s *scripted.Script) { p.Controller.ICDOFF = 4 }, "ICDOFF 4"},
		{"KAS 0", false, func(p *scripted.Polite, s *scripted.Script) { p.Controller.KAS = 0 }, "KAS 0"},
		{"SGLS 0", false, func(p *scripted.Polite, s *scripted.Script) { p.Controller.SGLS = 1 << 20 }, "SGLS"},
		{"discovery SGLS 0", true, func(p *scripted.Polite, s *scripted.Script) { p.Controller.SGLS = 0 }, "SGLS"},
		{"CNTLID mismatch", false, func(p *scripted.Polite, s *scripted.Script) {
			s.Reply = patchIdentify(func(id *nvme.IdentifyController) { id.CNTLID = 7 })
		}, "CNTLID 7 differs from the Connect response's 1"},
		{"discovery CNTLID mismatch", true, func(p *scripted.Polite, s *scripted.Script) {
			s.Reply = patchIdentify(func(id *nvme.IdentifyController) { id.CNTLID = 7 })
		}, "CNTLID 7"},
		{"reserved CNTLID", false, func(p *scripted.Polite, s *scripted.Script) { p.Controller.CNTLID = 0xffff }, "CNTLID 0xffff is reserved"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := scripted.NewPolite()
			s := &scripted.Script{Polite: p}
			tc.setup(p, s)
			cfg := nvmeof.ControllerConfig{IOQueues: 2}
			if tc.disc {
				cfg.SubsysNQN = nvme.NVME_DISC_SUBSYS_NAME
			}
			_, err := connectScripted(t, s, cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("Connect: %v, want one line with %q", err, tc.want)
			}
		})
	}
}

// TestMDTSLimits: the largest MDTS accepted and the transfer limits that
// follow, the host's own limit winning.
func TestMDTSLimits(t *testing.T) {
	for _, tc := range []struct {
		mdts uint8
		want int
	}{{0, 1 << 20}, {1, 8192}, {8, 1 << 20}, {20, 1 << 20}} {
		p := scripted.NewPolite()
		p.Controller.MDTS = tc.mdts
		c, err := connectScripted(t, &scripted.Script{Polite: p}, nvmeof.ControllerConfig{})
		if err != nil {
			t.Fatalf("MDTS %d: %v", tc.mdts, err)
		}
		if c.MaxTransfer() != tc.want {
			t.Errorf("MDTS %d: MaxTransfer %d, want %d", tc.mdts, c.MaxTransfer(), tc.want)
		}
	}
}

// TestQueueSizeNegotiated: --queue-size is clamped by CAP.MQES+1 and
// MAXCMD, and Connect's SQSIZE on every I/O queue says so.
func TestQueueSizeNegotiated(t *testing.T) {
	for _, tc := range []struct {
		mqes, maxcmd uint16
		ask, want    int
	}{
		{127, 128, 64, 64},
		{31, 128, 64, 32},
		{127, 16, 64, 16},
		{127, 0, 64, 64}, // MAXCMD not reported
		{1, 0, 64, 2},
	} {
		p := scripted.NewPolite()
		p.CAP = p.CAP&^0xffff | uint64(tc.mqes)
		p.Controller.MAXCMD = tc.maxcmd
		var mu sync.Mutex
		var sqsizes []uint16
		s := &scripted.Script{Polite: p, Reply: func(c *scripted.Command, r scripted.Reply) scripted.Reply {
			if c.Cmd.Opcode() == nvme.NVME_FABRICS_COMMAND && c.Cmd.FabricsType() == nvme.NVME_FABRICS_TYPE_CONNECT && c.Cmd.Connect().QID != 0 {
				mu.Lock()
				sqsizes = append(sqsizes, c.Cmd.Connect().SQSize)
				mu.Unlock()
			}
			return r
		}}
		c, err := connectScripted(t, s, nvmeof.ControllerConfig{IOQueues: 2, QueueSize: tc.ask})
		if err != nil {
			t.Fatalf("%+v: %v", tc, err)
		}
		mu.Lock()
		if c.QueueSize() != tc.want || len(sqsizes) != 2 || int(sqsizes[0]) != tc.want-1 || int(sqsizes[1]) != tc.want-1 {
			t.Errorf("%+v: QueueSize %d, Connect SQSIZE %v; want %d", tc, c.QueueSize(), sqsizes, tc.want)
		}
		mu.Unlock()
	}
}

// TestNumberOfQueuesResult: whatever Set Features Number of Queues
// answers, the host makes at least one and never more I/O queues than it
// asked for.
func TestNumberOfQueuesResult(t *testing.T) {
	for _, tc := range []struct {
		result uint64
		want   int
	}{{0xffffffff, 3}, {0, 1}, {0x00010005, 2}, {0x00050001, 2}, {0xffff0000, 1}} {
		s := &scripted.Script{Reply: func(c *scripted.Command, r scripted.Reply) scripted.Reply {
			if c.QID == 0 && c.Cmd.Opcode() == nvme.NVME_ADMIN_SET_FEATURES && uint8(c.Cmd.CDW(10)) == nvme.NVME_FEAT_NUM_QUEUES {
				r.Result = tc.result
			}
			return r
		}}
		c, err := connectScripted(t, s, nvmeof.ControllerConfig{IOQueues: 3})
		if err != nil {
			t.Fatal(err)
		}
		if n := len(c.IOQueues()); n != tc.want {
			t.Errorf("result %#x: %d I/O queues, want %d", tc.result, n, tc.want)
		}
	}
}

// TestDiscoveryLogBounded: a record count beyond what a log can hold, or a
// generation counter that never settles, ends with an error, not a huge
// allocation or an endless loop.
func TestDiscoveryLogBounded(t *testing.T) {
	for _, tc := range []struct {
		name   string
		header func(n int) nvme.DiscoveryLogHeader
		want   string
	}{
		{"numrec 2^40", func(int) nvme.DiscoveryLogHeader { return nvme.DiscoveryLogHeader{GenCtr: 1, NumRec: 1 << 40} }, "claims"},
		{"numrec 2^64-1", func(int) nvme.DiscoveryLogHeader { return nvme.DiscoveryLogHeader{GenCtr: 1, NumRec: 1<<64 - 1} }, "claims"},
		{"genctr moving", func(n int) nvme.DiscoveryLogHeader { return nvme.DiscoveryLogHeader{GenCtr: uint64(n), NumRec: 1} }, "kept changing"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			reads := 0
			s := &scripted.Script{Reply: func(c *scripted.Command, r scripted.Reply) scripted.Reply {
				if c.Cmd.Opcode() == nvme.NVME_ADMIN_GET_LOG_PAGE && uint8(c.Cmd.CDW(10)) == nvme.NVME_LOG_DISC && c.Cmd.CDW(12) == 0 {
					mu.Lock()
					reads++
					h := tc.header(reads)
					mu.Unlock()
					hdr := nvme.AppendDiscoveryLogHeader(nil, h)
					copy(r.Data, hdr)
				}
				return r
			}}
			c, err := connectScripted(t, s, nvmeof.ControllerConfig{SubsysNQN: nvme.NVME_DISC_SUBSYS_NAME, NoKeepAlive: true})
			if err != nil {
				t.Fatal(err)
			}
			_, err = c.DiscoveryLog(testCtx(t))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("DiscoveryLog: %v, want %q", err, tc.want)
			}
		})
	}
}

// TestActiveNamespacesBounded: an active namespace list that goes on and
// on (increasing IDs, a full page each time) stops at NN, or at the host's
// bound where NN is not reported.
func TestActiveNamespacesBounded(t *testing.T) {
	for _, tc := range []struct {
		nn   uint32
		want string
	}{{0, "more than 65536"}, {1 << 30, "more than 65536"}, {5000, "above NN 5000"}} {
		p := scripted.NewPolite()
		p.Controller.NN = tc.nn
		var mu sync.Mutex
		pages := 0
		s := &scripted.Script{Polite: p, Reply: func(c *scripted.Command, r scripted.Reply) scripted.Reply {
			if c.Cmd.Opcode() == nvme.NVME_ADMIN_IDENTIFY && uint8(c.Cmd.CDW(10)) == nvme.NVME_ID_CNS_NS_ACTIVE_LIST {
				mu.Lock()
				pages++
				mu.Unlock()
				after := c.Cmd.NSID()
				for i := range nvme.IdentifySize / 4 {
					binary.LittleEndian.PutUint32(r.Data[4*i:], after+1+uint32(i))
				}
			}
			return r
		}}
		c, err := connectScripted(t, s, nvmeof.ControllerConfig{})
		if err != nil {
			t.Fatal(err)
		}
		_, err = c.ActiveNamespaces(testCtx(t))
		mu.Lock()
		if err == nil || !strings.Contains(err.Error(), tc.want) || pages > 65 {
			t.Errorf("NN %d: %v after %d pages, want %q", tc.nn, err, pages, tc.want)
		}
		mu.Unlock()
	}
}

// TestNamespaceSizeBounded: a namespace whose size in bytes does not fit
// an offset is refused.
func TestNamespaceSizeBounded(t *testing.T) {
	p := scripted.NewPolite()
	p.Namespace.NSZE = 1 << 55 // 2^64 bytes of 512-byte blocks
	c, err := connectScripted(t, &scripted.Script{Polite: p}, nvmeof.ControllerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Namespace(testCtx(t), 1); err == nil || !strings.Contains(err.Error(), "NSZE") {
		t.Fatalf("Namespace: %v", err)
	}
}

// hostBehavior records Set Features Host Behavior Support commands and
// answers them with status.
type hostBehavior struct {
	mu     sync.Mutex
	seen   [][]byte
	status nvme.Status
}

func (h *hostBehavior) reply(c *scripted.Command, r scripted.Reply) scripted.Reply {
	if c.QID == 0 && c.Cmd.Opcode() == nvme.NVME_ADMIN_SET_FEATURES && uint8(c.Cmd.CDW(10)) == nvme.NVME_FEAT_HOST_BEHAVIOR {
		h.mu.Lock()
		defer h.mu.Unlock()
		h.seen = append(h.seen, c.Data)
		r.Status = h.status
	}
	return r
}

// TestCommandRetryDelay: CRDT1..3 are read (100 ms units) and, when CRDT1
// is reported, Host Behavior Support enables ACRE (nvme_configure_acre); a
// controller that refuses it with a status still connects.
func TestCommandRetryDelay(t *testing.T) {
	for _, tc := range []struct {
		crdt     [3]uint16
		status   nvme.Status
		wantSent bool
		wantACRE bool
	}{
		{[3]uint16{5, 10, 600}, 0, true, true},
		{[3]uint16{5, 0, 0}, nvme.NVME_SC_INVALID_FIELD | nvme.NVME_STATUS_DNR, true, false},
		{[3]uint16{0, 0, 0}, 0, false, false},
	} {
		p := scripted.NewPolite()
		p.Controller.CRDT = tc.crdt
		hb := &hostBehavior{status: tc.status}
		c, err := connectScripted(t, &scripted.Script{Polite: p, Reply: hb.reply}, nvmeof.ControllerConfig{})
		if err != nil {
			t.Fatal(err)
		}
		want := [3]time.Duration{}
		for i, d := range tc.crdt {
			want[i] = time.Duration(d) * 100 * time.Millisecond
		}
		if c.CRDT() != want {
			t.Errorf("CRDT %v, want %v", c.CRDT(), want)
		}
		if c.ACRE() != tc.wantACRE {
			t.Errorf("CRDT %v: ACRE %v, want %v", tc.crdt, c.ACRE(), tc.wantACRE)
		}
		hb.mu.Lock()
		sent := len(hb.seen) == 1 && len(hb.seen[0]) == nvme.HostBehaviorSize && hb.seen[0][0] == nvme.NVME_ENABLE_ACRE
		if sent != tc.wantSent || len(hb.seen) > 1 {
			t.Errorf("CRDT %v: Host Behavior Support sent %d times (%v), want %v", tc.crdt, len(hb.seen), sent, tc.wantSent)
		}
		hb.mu.Unlock()
	}
}

// TestNVMCommandSetLimits: WZSL, DMRSL and DMRL (Identify CNS 06h) bound
// Write Zeroes and Dataset Management; without them MDTS bounds Write
// Zeroes (as the Linux host) and the protocol bounds the rest.
func TestNVMCommandSetLimits(t *testing.T) {
	for _, tc := range []struct {
		name           string
		mdts           uint8
		nvm            nvme.IdentifyControllerNVM
		refuse         bool // CNS 06h answered with a status
		wantWZ, wantDM uint32
		wantRanges     int
	}{
		{"limits", 8, nvme.IdentifyControllerNVM{WZSL: 1, DMRSL: 16, DMRL: 1}, false, 16, 16, 1},
		{"DMSL", 8, nvme.IdentifyControllerNVM{DMRSL: 100, DMSL: 400}, false, 2048, 100, 256},
		{"none reported", 8, nvme.IdentifyControllerNVM{}, false, 2048, 1<<32 - 1, 256},
		{"CNS 06h refused", 8, nvme.IdentifyControllerNVM{}, true, 2048, 1<<32 - 1, 256},
		{"no MDTS", 0, nvme.IdentifyControllerNVM{}, false, 65536, 1<<32 - 1, 256},
		{"WZSL 255", 8, nvme.IdentifyControllerNVM{WZSL: 255, DMRL: 255}, false, 65536, 1<<32 - 1, 255},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := scripted.NewPolite()
			p.Controller.MDTS = tc.mdts
			p.NVM = tc.nvm
			s := &scripted.Script{Polite: p}
			if tc.refuse {
				s.Reply = func(c *scripted.Command, r scripted.Reply) scripted.Reply {
					if c.Cmd.Opcode() == nvme.NVME_ADMIN_IDENTIFY && uint8(c.Cmd.CDW(10)) == nvme.NVME_ID_CNS_CS_CTRL {
						return scripted.Reply{Status: nvme.NVME_SC_INVALID_FIELD | nvme.NVME_STATUS_DNR}
					}
					return r
				}
			}
			c, err := connectScripted(t, s, nvmeof.ControllerConfig{})
			if err != nil {
				t.Fatal(err)
			}
			ns, err := c.Namespace(testCtx(t), 1)
			if err != nil {
				t.Fatal(err)
			}
			if ns.MaxWriteZeroesBlocks != tc.wantWZ || ns.MaxDeallocateBlocks != tc.wantDM || ns.MaxDeallocateRanges != tc.wantRanges {
				t.Fatalf("write zeroes %d, deallocate %d blocks in %d ranges; want %d, %d, %d",
					ns.MaxWriteZeroesBlocks, ns.MaxDeallocateBlocks, ns.MaxDeallocateRanges, tc.wantWZ, tc.wantDM, tc.wantRanges)
			}
			var req nvmeof.Request
			if err := ns.PrepareWriteZeroes(&req, 0, tc.wantWZ, false); err != nil {
				t.Errorf("write zeroes at the limit: %v", err)
			}
			if tc.wantWZ < 65536 {
				if err := ns.PrepareWriteZeroes(&req, 0, tc.wantWZ+1, false); err == nil || !strings.Contains(err.Error(), "WZSL") {
					t.Errorf("write zeroes above the limit: %v", err)
				}
			}
			if tc.wantDM < 16384 {
				if err := ns.PrepareDeallocate(&req, []nvme.DSMRange{{NLB: tc.wantDM}}); err != nil {
					t.Errorf("deallocate at the limit: %v", err)
				}
				if err := ns.PrepareDeallocate(&req, []nvme.DSMRange{{NLB: tc.wantDM + 1}}); err == nil || !strings.Contains(err.Error(), "DM") {
					t.Errorf("deallocate above the limit: %v", err)
				}
			}
			ranges := make([]nvme.DSMRange, tc.wantRanges+1)
			for i := range ranges {
				ranges[i] = nvme.DSMRange{SLBA: uint64(i), NLB: 1}
			}
			if err := ns.PrepareDeallocate(&req, ranges[:tc.wantRanges]); err != nil {
				t.Errorf("%d ranges: %v", tc.wantRanges, err)
			}
			if err := ns.PrepareDeallocate(&req, ranges); err == nil {
				t.Errorf("%d ranges accepted", len(ranges))
			}
			if dmsl := tc.nvm.DMSL; dmsl != 0 {
				var over []nvme.DSMRange // DMSL+1 blocks in ranges of at most DMRSL
				for left := dmsl + 1; left > 0; {
					n := min(left, uint64(tc.nvm.DMRSL))
					over = append(over, nvme.DSMRange{SLBA: uint64(len(over)) * 1000, NLB: uint32(n)})
					left -= n
				}
				if err := ns.PrepareDeallocate(&req, over); err == nil || !strings.Contains(err.Error(), "DMSL") {
					t.Errorf("deallocate of DMSL+1 blocks: %v", err)
				}
			}
		})
	}
}

// TestChangedNamespaceEvent: a Namespace Attribute Changed event reads the
// Changed Namespace List and hands its IDs to OnEvent.
func TestChangedNamespaceEvent(t *testing.T) {
	var mu sync.Mutex
	aers := 0
	s := &scripted.Script{Reply: func(c *scripted.Command, r scripted.Reply) scripted.Reply {
		switch {
		case c.Cmd.Opcode() == nvme.NVME_ADMIN_ASYNC_EVENT:
			mu.Lock()
			defer mu.Unlock()
			if aers++; aers == 1 {
				return scripted.Reply{Result: nvme.NVME_AER_TYPE_NOTICE | nvme.NVME_AER_NOTICE_NS_CHANGED<<8 | nvme.NVME_LOG_CHANGED_NS<<16}
			}
		case c.Cmd.Opcode() == nvme.NVME_ADMIN_GET_LOG_PAGE && uint8(c.Cmd.CDW(10)) == nvme.NVME_LOG_CHANGED_NS:
			binary.LittleEndian.PutUint32(r.Data[0:], 1)
			binary.LittleEndian.PutUint32(r.Data[4:], 9)
		}
		return r
	}}
	events := make(chan nvmeof.AsyncEvent, 1)
	if _, err := connectScripted(t, s, nvmeof.ControllerConfig{OnEvent: func(e nvmeof.AsyncEvent) { events <- e }}); err != nil {
		t.Fatal(err)
	}
	select {
	case e := <-events:
		if len(e.ChangedNamespaces) != 2 || e.ChangedNamespaces[0] != 1 || e.ChangedNamespaces[1] != 9 {
			t.Fatalf("event %v", e)
		}
	case <-time.After(hangDeadline):
		t.Fatal("no event")
	}
}
