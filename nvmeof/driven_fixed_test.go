package nvmeof_test

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
)

// Writes and reads whose data is Fixed (zero copy: a ublk request's
// registered pages in the daemon), through a driven queue: large H2CData
// and C2HData data moves by the driver's SendFixed and RecvFixed, small
// pieces (in-capsule data, small PDUs, the data a receive read past a
// C2HData header) by the Fixed data's ReadAt and WriteAt. Receives and
// sends cut at 100 B to 60 KB, C2HData in one PDU or several, H2CData one
// PDU per R2T or several; several commands in flight at once; what is read
// back is what was written.
func TestDrivenFixedData(t *testing.T) {
	sizes := []int{4096, 512 << 10, 512, 128 << 10, 16 << 10, 300 << 10, 20 << 10}
	for _, cut := range []int{0, 100, 4096, 60000} {
		for _, shape := range []target.Config{{}, {C2HChunk: 20 << 10, MaxH2CData: 24 << 10}} {
			name := fmt.Sprintf("cut %d C2HChunk %d MaxH2CData %d", cut, shape.C2HChunk, shape.MaxH2CData)
			tt := startTarget(t, shape, 9, 8<<20)
			_, ns, q, d := drivenQueueMax(t, tt, nvmeof.ControllerConfig{HeaderDigest: cut == 100}, cut, cut)
			rng := rand.New(rand.NewPCG(uint64(cut), 7))
			datas := make([][]byte, len(sizes))
			fixed := make([]*nvmeof.TestFixed, len(sizes))
			var wg sync.WaitGroup
			errs := make(chan error, 2*len(sizes))
			for i, size := range sizes {
				datas[i] = make([]byte, size)
				for j := range datas[i] {
					datas[i][j] = byte(rng.Uint32())
				}
				fixed[i] = &nvmeof.TestFixed{B: bytes.Clone(datas[i])}
				wg.Add(1)
				go func() {
					defer wg.Done()
					var w nvmeof.Request
					if err := ns.PrepareWrite(&w, uint64(i*2048), datas[i], false); err != nil {
						errs <- err
						return
					}
					w.Data, w.Fixed = nil, fixed[i]
					if err := q.Do(testCtx(t), &w); err != nil {
						errs <- fmt.Errorf("write of %d: %w", size, err)
					}
				}()
			}
			wg.Wait()
			for i, size := range sizes {
				wg.Add(1)
				go func() {
					defer wg.Done()
					got := &nvmeof.TestFixed{B: make([]byte, size)}
					var r nvmeof.Request
					if err := ns.PrepareRead(&r, uint64(i*2048), got.B); err != nil {
						errs <- err
						return
					}
					r.Data, r.Fixed = nil, got
					if err := q.Do(testCtx(t), &r); err != nil {
						errs <- fmt.Errorf("read of %d: %w", size, err)
						return
					}
					if !bytes.Equal(got.B, datas[i]) {
						errs <- fmt.Errorf("%d bytes read back differ", size)
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatalf("%s: %v", name, err)
			}
			copies := int64(0)
			for _, f := range fixed {
				copies += f.Copies.Load()
			}
			// Unbounded receives may find each PDU whole: none placed.
			if d.FixedSends.Load() == 0 || (cut != 0 && d.FixedRecvs.Load() == 0) || copies == 0 {
				t.Errorf("%s: %d fixed sends, %d fixed receives, %d user copies of written data; want some of each",
					name, d.FixedSends.Load(), d.FixedRecvs.Load(), copies)
			}
			t.Logf("%s: %d fixed sends, %d fixed receives, %d placed", name, d.FixedSends.Load(), d.FixedRecvs.Load(), nvmeof.DrivenPlaced(q))
		}
	}
}

// Fixed data goes only on a queue driven by a FixedDriver and without data
// digests: elsewhere Submit refuses it, and the queue stays usable.
func TestFixedDataRefused(t *testing.T) {
	tt := startTarget(t, target.Config{}, 9, 1<<20)
	c := connect(t, tt, nvmeof.ControllerConfig{})
	ns, err := c.Namespace(testCtx(t), 1)
	if err != nil {
		t.Fatal(err)
	}
	q := c.IOQueues()[0].Queue
	var r nvmeof.Request
	buf := make([]byte, 4096)
	if err := ns.PrepareRead(&r, 0, buf); err != nil {
		t.Fatal(err)
	}
	r.Data, r.Fixed = nil, &nvmeof.TestFixed{B: buf}
	if err := q.Do(testCtx(t), &r); !errors.Is(err, nvmeof.ErrFixedNotDriven) {
		t.Errorf("Fixed data on a queue not driven: %v, want ErrFixedNotDriven", err)
	}
	r.Data, r.Fixed = buf, nil
	if err := q.Do(testCtx(t), &r); err != nil {
		t.Errorf("a read after the refusal: %v", err)
	}

	tt = startTarget(t, target.Config{}, 9, 1<<20)
	_, ns, q, _ = drivenQueue(t, tt, nvmeof.ControllerConfig{DataDigest: true})
	if err := ns.PrepareRead(&r, 0, buf); err != nil {
		t.Fatal(err)
	}
	r.Data, r.Fixed = nil, &nvmeof.TestFixed{B: buf}
	if err := q.Do(testCtx(t), &r); !errors.Is(err, nvmeof.ErrFixedDigest) {
		t.Errorf("Fixed data with data digests: %v, want ErrFixedDigest", err)
	}
}
