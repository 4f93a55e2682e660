package spdk

import (
	"fmt"
	"net"
	"strconv"
	"testing"
)

// DiscoveryNQN is the well-known discovery subsystem (NVMe Base
// Specification 2.0, 4.7), which nvmf_tgt serves on every listener added
// to it.
const DiscoveryNQN = "nqn.2014-08.org.nvmexpress.discovery"

// ExportConfig is one subsystem with one malloc namespace behind a TCP
// listener, as the tests need it; zero values take the defaults.
type ExportConfig struct {
	NQN       string // ["nqn.2016-06.io.spdk:interop"]
	Serial    string // ["UBLKNVMEOFSPDK01"]
	SizeMB    int    // the malloc bdev's size [64]
	BlockSize int    // [512]
	// Transport holds nvmf_create_transport's parameters beyond trtype
	// (max_queue_depth, in_capsule_data_size, max_io_size,
	// io_unit_size, max_io_qpairs_per_ctrlr, ...); nil: SPDK's defaults.
	// Only a target's first Export creates the transport.
	Transport map[string]any
	// Discovery also adds the listener to the discovery subsystem.
	Discovery bool
	// Port is the listener's port; 0 reserves one (Port). A target
	// started again in the same test reuses its predecessor's.
	Port int
	// UUID is the malloc bdev's UUID, which nvmf_tgt makes the
	// namespace's UUID and NGUID; "" lets SPDK choose. A target started
	// again with the same UUID serves the same namespace identity.
	UUID string
}

// Export is what Target.Export made.
type Export struct {
	NQN  string
	Bdev string // the malloc bdev behind namespace 1
	Port int
	Addr string // "127.0.0.1:Port"
}

// Export creates the TCP transport, a malloc bdev, a subsystem that allows
// any host with the bdev as namespace 1, and a listener on a port of the
// interop range (Port); the test fails if any step does.
func (tg *Target) Export(t testing.TB, cfg ExportConfig) Export {
	t.Helper()
	if cfg.NQN == "" {
		cfg.NQN = "nqn.2016-06.io.spdk:interop"
	}
	if cfg.Serial == "" {
		cfg.Serial = "UBLKNVMEOFSPDK01"
	}
	if cfg.SizeMB == 0 {
		cfg.SizeMB = 64
	}
	if cfg.BlockSize == 0 {
		cfg.BlockSize = 512
	}
	if tg.exports == 0 {
		transport := map[string]any{"trtype": "TCP"}
		for k, v := range cfg.Transport {
			transport[k] = v
		}
		tg.MustCall(t, "nvmf_create_transport", transport)
	}
	e := Export{NQN: cfg.NQN, Bdev: fmt.Sprintf("Malloc%d", tg.exports), Port: cfg.Port}
	if e.Port == 0 {
		e.Port = Port(t)
	}
	tg.exports++
	e.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(e.Port))
	bdev := map[string]any{"name": e.Bdev, "num_blocks": cfg.SizeMB << 20 / cfg.BlockSize, "block_size": cfg.BlockSize}
	if cfg.UUID != "" {
		bdev["uuid"] = cfg.UUID
	}
	tg.MustCall(t, "bdev_malloc_create", bdev)
	tg.MustCall(t, "nvmf_create_subsystem", map[string]any{
		"nqn": cfg.NQN, "serial_number": cfg.Serial, "allow_any_host": true, "max_namespaces": 8,
	})
	tg.AddNamespace(t, cfg.NQN, e.Bdev, 1)
	tg.AddListener(t, cfg.NQN, e.Port)
	if cfg.Discovery {
		tg.AddListener(t, DiscoveryNQN, e.Port)
	}
	return e
}

// listenAddress is nvmf_subsystem_add_listener's listen_address for
// 127.0.0.1:port.
func listenAddress(port int) map[string]any {
	return map[string]any{"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": fmt.Sprint(port)}
}

// AddListener adds a TCP listener on 127.0.0.1:port to the subsystem.
func (tg *Target) AddListener(t testing.TB, nqn string, port int) {
	t.Helper()
	tg.MustCall(t, "nvmf_subsystem_add_listener", map[string]any{"nqn": nqn, "listen_address": listenAddress(port)})
}

// RemoveListener removes the subsystem's listener on 127.0.0.1:port;
// nvmf_tgt disconnects the queues that came in through it.
func (tg *Target) RemoveListener(t testing.TB, nqn string, port int) {
	t.Helper()
	tg.MustCall(t, "nvmf_subsystem_remove_listener", map[string]any{"nqn": nqn, "listen_address": listenAddress(port)})
}

// AddNamespace adds bdev to the subsystem as namespace nsid.
func (tg *Target) AddNamespace(t testing.TB, nqn, bdev string, nsid uint32) {
	t.Helper()
	tg.MustCall(t, "nvmf_subsystem_add_ns", map[string]any{
		"nqn": nqn, "namespace": map[string]any{"bdev_name": bdev, "nsid": nsid},
	})
}
