package attach

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle"
	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle/nvmeofconn"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
	"github.com/ublk-nvmeof/ublk-nvmeof/ublk"
)

// The daemon's data path (blockBackend on lifecycle on nvmeof) against
// the in-process target in the modes Linux nvmet cannot be put in: each
// under a verified load (written, read back, compared, and compared on the
// target's memory), with the ublk queue depth and the largest I/O the
// daemon would give the kernel. The target holds the host to what it
// announced (SQSIZE, MAXCMD, MAXH2CDATA, CPDA, IOCCSZ) and records any
// violation; a mode that should be invisible must also cause no error and
// no reconnect.

const modesNQN = "nqn.2026-11.io.ublk-nvmeof:modes"

// modeRig is a backendRig on a target in one mode, with the queue depth
// and maximum I/O size attach derives from the first association.
type modeRig struct {
	*backendRig
	queues, depth, maxIO int
	// beforeIO, if set, runs once the first round's data is made, just
	// before its first request.
	beforeIO func()
}

func newModeRig(t *testing.T, tcfg target.Config, ccfg nvmeof.ControllerConfig) *modeRig {
	t.Helper()
	tcfg.Logger = quietLogger()
	tg, mem, addr := startTarget(t, tcfg, modesNQN, 16<<20)
	ccfg.Addr, ccfg.SubsysNQN = addr, modesNQN
	ccfg.Host = nvmeof.HostIdentity{NQN: "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000011"}
	ccfg.IOQueues, ccfg.KATO, ccfg.Logger = 2, 5*time.Second, quietLogger()
	if ccfg.QueueSize == 0 {
		ccfg.QueueSize = 32
	}
	connector := &nvmeofconn.Connector{Config: ccfg, NSID: 1}
	lc := startLifecycle(t, connector, rigLifecycleOptions(quietLogger()))
	// As attach.Run: the ublk depth follows the negotiated queue size,
	// the largest I/O MDTS (at most 1 MiB).
	ns, queues := connector.First()
	depth := min(connector.FirstQueueSize()-1, 4096)
	r := &modeRig{
		backendRig: &backendRig{t: t, addr: addr, nqn: modesNQN, tg: tg, lc: lc, b: newBlockBackend(lc, nil, queues, depth), mem: mem},
		queues:     queues, depth: depth, maxIO: min(ns.MaxTransfer, 1<<20),
	}
	t.Cleanup(func() {
		lc.Delete()
		r.b.wg.Wait()
	})
	return r
}

func fill(buf []byte, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 7))
	for i := 0; i < len(buf); i += 8 {
		v := rng.Uint64()
		for k := 0; k < 8 && i+k < len(buf); k++ {
			buf[i+k] = byte(v >> (8 * k))
		}
	}
}

// verifiedLoad runs rounds of: depth writes in flight on every ublk queue
// at once (every tag), of sizes from 4 KiB to maxIO at separate offsets,
// then the same extents read back the same way and compared, and compared
// on the target's memory.
func (r *modeRig) verifiedLoad(rounds int) {
	r.t.Helper()
	rng := rand.New(rand.NewPCG(uint64(r.depth), uint64(r.maxIO)))
	slot := min(int(r.mem.Size())/(r.queues*r.depth), r.maxIO) &^ 4095
	if slot < 4096 {
		r.t.Fatalf("namespace too small for %d x %d requests", r.queues, r.depth)
	}
	type extent struct {
		queue, tag int
		off        int64
		data       []byte
	}
	for round := range rounds {
		var exts []extent
		for q := range r.queues {
			for tag := range r.depth {
				n := 4096 * (1 + rng.IntN(slot/4096))
				e := extent{queue: q, tag: tag, off: int64(len(exts) * slot), data: make([]byte, n)}
				fill(e.data, uint64(round)<<32|uint64(len(exts)))
				exts = append(exts, e)
			}
		}
		run := func(op ublk.Op) {
			chs := make([]<-chan int32, len(exts))
			bufs := make([][]byte, len(exts))
			for i, e := range exts {
				bufs[i] = e.data
				if op == ublk.OpRead {
					bufs[i] = make([]byte, len(e.data))
				}
				chs[i] = r.serve(e.queue, e.tag, op, e.off, bufs[i])
			}
			for q := range r.queues {
				r.b.Commit(q)
			}
			for i, ch := range chs {
				r.wait(fmt.Sprintf("round %d: %v of %d bytes at %d (queue %d tag %d)", round, op, len(exts[i].data), exts[i].off, exts[i].queue, exts[i].tag),
					ch, int32(len(exts[i].data)))
				if op == ublk.OpRead && !bytes.Equal(bufs[i], exts[i].data) {
					r.t.Fatalf("round %d: %d bytes at %d read back different data", round, len(exts[i].data), exts[i].off)
				}
			}
		}
		if round == 0 && r.beforeIO != nil {
			r.beforeIO()
		}
		run(ublk.OpWrite)
		run(ublk.OpRead)
		for _, e := range exts {
			onTarget := make([]byte, len(e.data))
			r.mem.ReadAt(onTarget, e.off)
			if !bytes.Equal(onTarget, e.data) {
				r.t.Fatalf("round %d: %d bytes at %d differ on the target", round, len(e.data), e.off)
			}
		}
	}
}

// invisible checks that the mode cost nothing the application or the
// target could see: no protocol violation, no reconnect.
func (r *modeRig) invisible() {
	r.t.Helper()
	if v, n := r.tg.Violations(); n != 0 {
		r.t.Fatalf("the host broke the target's limits %d times: %q", n, v)
	}
	for _, tr := range r.lc.States().History() {
		if tr.To == lifecycle.StateResetting {
			r.t.Fatalf("the controller reset under load: %+v", tr)
		}
	}
}

// TestTargetModes: each odd-target mode under a verified load.
func TestTargetModes(t *testing.T) {
	for _, tc := range []struct {
		name      string
		target    target.Config
		host      nvmeof.ControllerConfig
		wantDepth int // 0: QueueSize-1
		wantMaxIO int // 0: 128 KiB (MDTS 8 would allow 1 MiB; the load uses it)
	}{
		// MAXH2CDATA at its minimum: every R2T's data in 4 KiB PDUs.
		{name: "MAXH2CDATA 4096", target: target.Config{MaxH2CData: 4096}, wantMaxIO: 1 << 20},
		// CPDA > 0: H2C data padded to 32-byte multiples, digests on.
		{name: "CPDA 7 with digests", target: target.Config{CPDA: 7, MaxH2CData: 8192},
			host: nvmeof.ControllerConfig{HeaderDigest: true, DataDigest: true}, wantMaxIO: 1 << 20},
		// IOCCSZ 4: no in-capsule data, every write through R2T.
		{name: "IOCCSZ 4", target: target.Config{InCapsuleDataSize: target.NoInCapsuleData}, wantMaxIO: 1 << 20},
		// A small MAXCMD clamps the queue and the ublk depth.
		{name: "MAXCMD 8", target: target.Config{MaxCmd: 8}, host: nvmeof.ControllerConfig{QueueSize: 128}, wantDepth: 7, wantMaxIO: 1 << 20},
		// An odd CAP.MQES (36: 37 entries) clamps them too.
		{name: "MQES 36", target: target.Config{MaxQueueSize: 37}, host: nvmeof.ControllerConfig{QueueSize: 128}, wantDepth: 36, wantMaxIO: 1 << 20},
		// MDTS 0: no limit from the controller, the host's 1 MiB.
		{name: "MDTS 0", target: target.Config{NoMDTS: true}, wantMaxIO: 1 << 20},
		// MDTS 1: 8 KiB transfers.
		{name: "MDTS 1", target: target.Config{MDTS: 1}, wantMaxIO: 8 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newModeRig(t, tc.target, tc.host)
			wantDepth := tc.wantDepth
			if wantDepth == 0 {
				wantDepth = 31
			}
			if r.depth != wantDepth || r.maxIO != tc.wantMaxIO {
				t.Fatalf("ublk depth %d, max I/O %d; want %d, %d", r.depth, r.maxIO, wantDepth, tc.wantMaxIO)
			}
			rounds := 3
			if testing.Short() {
				rounds = 1
			}
			r.verifiedLoad(rounds)
			r.invisible()
		})
	}
}

// TestTargetModesMDTSOverflow: a controller whose MDTS makes 2^MDTS pages
// overflow (51, 52) or is absurd (255) is refused at connect with one line
// naming MDTS, not a panic or a zero-byte transfer loop.
func TestTargetModesMDTSOverflow(t *testing.T) {
	for _, mdts := range []uint8{51, 52, 255} {
		t.Run(fmt.Sprint(mdts), func(t *testing.T) {
			tg := target.New(target.Config{MDTS: mdts, Logger: quietLogger()})
			defer tg.Close()
			sub, _ := tg.AddSubsystem(modesNQN)
			sub.AddNamespace(target.NamespaceConfig{NSID: 1, Backend: target.NewMemoryBackend(1 << 20)})
			addr, err := tg.Listen("127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			connector := &nvmeofconn.Connector{Config: nvmeof.ControllerConfig{Addr: addr.String(), SubsysNQN: modesNQN,
				Host: nvmeof.HostIdentity{NQN: "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000012"}, Logger: quietLogger()}, NSID: 1}
			lopts := lifecycle.DefaultOptions()
			lopts.Logger = quietLogger()
			lc, err := lifecycle.New(connector, lopts)
			if err != nil {
				t.Fatal(err)
			}
			defer lc.Delete()
			err = lc.Start(context.Background())
			if err == nil || !strings.Contains(err.Error(), "MDTS") || strings.Contains(err.Error(), "\n") {
				t.Fatalf("connect with MDTS %d: %v, want one line naming MDTS", mdts, err)
			}
		})
	}
}

// TestTargetModesRetried: statuses a controller sends without DNR are
// retried, after the Command Retry Delay its CRD field selects, as the
// Linux host's nvme_retry_req; the application sees none of them.
// Namespace Not Ready for a second, a CRD on chosen commands, and data
// digest errors on reads (Data Transfer Error, retryable) each under a
// verified load, with no reconnect.
func TestTargetModesRetried(t *testing.T) {
	nnr := nvme.NVME_SC_NS_NOT_READY
	for _, tc := range []struct {
		name   string
		target target.Config
		host   nvmeof.ControllerConfig
		fault  target.Fault
	}{
		{name: "Namespace Not Ready for 1 s, CRD 1 (500 ms)", target: target.Config{CRDT: [3]uint16{5}},
			fault: target.Fault{QID: target.AnyIOQueue, Match: target.MatchIO(), Status: nnr | 1<<11, For: time.Second}},
		{name: "CRD 2 (200 ms) on 20 commands", target: target.Config{CRDT: [3]uint16{1, 2, 3}},
			fault: target.Fault{QID: target.AnyIOQueue, Match: target.MatchIO(), Status: nvme.NVME_SC_INTERNAL | 2<<11, Times: 20}},
		{name: "data digest errors on 20 reads", target: target.Config{C2HChunk: 16 << 10},
			host:  nvmeof.ControllerConfig{HeaderDigest: true, DataDigest: true},
			fault: target.Fault{QID: target.AnyIOQueue, Match: target.MatchOpcode(nvme.NVME_CMD_READ), CorruptDataDigest: true, Times: 20}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newModeRig(t, tc.target, tc.host)
			var hits atomic.Int64
			tc.fault.Before = func() { hits.Add(1) }
			// Filling the buffers takes a while under -race: the
			// fault's For starts with the I/O.
			r.beforeIO = func() { r.tg.InjectFault(tc.fault) }
			r.verifiedLoad(1)
			r.invisible()
			if hits.Load() == 0 {
				t.Fatal("the fault hit no command")
			}
		})
	}
}
