package nvmeof_test

import (
	"fmt"
	"sync"
	"testing"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
)

// BenchmarkIO measures the host over loopback against the in-process
// target (which is not built for speed: read it as a lower bound).
func BenchmarkIO(b *testing.B) {
	for _, bc := range []struct {
		write bool
		size  int
		qd    int
	}{{false, 4096, 1}, {false, 4096, 32}, {true, 4096, 32}, {false, 128 << 10, 8}, {true, 128 << 10, 8}} {
		op := "read"
		if bc.write {
			op = "write"
		}
		b.Run(fmt.Sprintf("%s-%dk-qd%d", op, bc.size>>10, bc.qd), func(b *testing.B) {
			tg := target.New(target.Config{})
			defer tg.Close()
			sub, _ := tg.AddSubsystem(testNQN)
			sub.AddNamespace(target.NamespaceConfig{NSID: 1, Backend: target.NewMemoryBackend(64 << 20), BlockShift: 12})
			addr, err := tg.Listen("127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			ctx := b.Context()
			c, err := nvmeof.Connect(ctx, nvmeof.ControllerConfig{Addr: addr.String(), SubsysNQN: testNQN, Host: testHost, QueueSize: 128})
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			ns, err := c.Namespace(ctx, 1)
			if err != nil {
				b.Fatal(err)
			}
			q := c.IOQueues()[0]
			blocks := uint64(bc.size / ns.BlockSize())
			sem := make(chan struct{}, bc.qd)
			var wg sync.WaitGroup
			b.SetBytes(int64(bc.size))
			b.ResetTimer()
			for i := range b.N {
				sem <- struct{}{}
				req := new(nvmeof.Request)
				lba := (uint64(i) * blocks) % (ns.Blocks - blocks)
				if bc.write {
					ns.PrepareWrite(req, lba, make([]byte, bc.size), false)
				} else {
					ns.PrepareRead(req, lba, make([]byte, bc.size))
				}
				wg.Add(1)
				if err := q.Submit(req, func(err error) {
					if err != nil {
						b.Error(err)
					}
					<-sem
					wg.Done()
				}); err != nil {
					b.Fatal(err)
				}
			}
			wg.Wait()
		})
	}
}
