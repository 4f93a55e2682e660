package attach

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics are the daemon's Prometheus metrics, one registry per attached
// device (labels: queue, op).
type Metrics struct {
	reg *prometheus.Registry

	ios      *prometheus.CounterVec   // completed I/Os by queue, op
	bytes    *prometheus.CounterVec   // bytes moved by queue, op
	errors   *prometheus.CounterVec   // failed I/Os by queue, op
	latency  *prometheus.HistogramVec // seconds, by op
	inflight *prometheus.GaugeVec     // by queue

	state        *prometheus.GaugeVec // 1 for the current state, 0 for the others
	keepAliveRTT prometheus.Gauge
	reconnects   prometheus.Counter

	constLabels prometheus.Labels

	mu        sync.Mutex
	lastState string
}

// NewMetrics registers the metrics with labels naming the target.
func NewMetrics(target, nqn string) *Metrics {
	reg := prometheus.NewRegistry()
	constLabels := prometheus.Labels{"target": target, "nqn": nqn}
	m := &Metrics{
		reg: reg,
		ios: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "ublk_nvmeof", Name: "io_total", ConstLabels: constLabels,
			Help: "I/O requests completed, by hardware queue and operation.",
		}, []string{"queue", "op"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "ublk_nvmeof", Name: "io_bytes_total", ConstLabels: constLabels,
			Help: "Bytes read or written, by hardware queue and operation.",
		}, []string{"queue", "op"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "ublk_nvmeof", Name: "io_errors_total", ConstLabels: constLabels,
			Help: "I/O requests completed with an error, by hardware queue and operation.",
		}, []string{"queue", "op"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "ublk_nvmeof", Name: "io_latency_seconds", ConstLabels: constLabels,
			Help:    "Time from the kernel handing a request over to its completion, by operation.",
			Buckets: prometheus.ExponentialBuckets(10e-6, 2, 20), // 10 µs to ~5 s
		}, []string{"op"}),
		inflight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "ublk_nvmeof", Name: "io_in_flight", ConstLabels: constLabels,
			Help: "I/O requests in flight, by hardware queue.",
		}, []string{"queue"}),
		state: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "ublk_nvmeof", Name: "controller_state", ConstLabels: constLabels,
			Help: "1 for the controller's current lifecycle state.",
		}, []string{"state"}),
		keepAliveRTT: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "ublk_nvmeof", Name: "keep_alive_rtt_seconds", ConstLabels: constLabels,
			Help: "Round trip of the last Keep Alive command.",
		}),
		reconnects: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "ublk_nvmeof", Name: "reconnects_total", ConstLabels: constLabels,
			Help: "Associations made after the first (successful reconnects).",
		}),
	}
	m.constLabels = constLabels
	reg.MustRegister(m.ios, m.bytes, m.errors, m.latency, m.inflight, m.state, m.keepAliveRTT, m.reconnects,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// IOStarted counts a request handed over by the kernel.
func (m *Metrics) IOStarted(queue int) {
	m.inflight.WithLabelValues(strconv.Itoa(queue)).Inc()
}

// IODone records a completed request.
func (m *Metrics) IODone(queue int, op string, n int, took time.Duration, err error) {
	q := strconv.Itoa(queue)
	m.inflight.WithLabelValues(q).Dec()
	m.ios.WithLabelValues(q, op).Inc()
	if err != nil {
		m.errors.WithLabelValues(q, op).Inc()
		return
	}
	m.bytes.WithLabelValues(q, op).Add(float64(n))
	m.latency.WithLabelValues(op).Observe(took.Seconds())
}

// HeldFrom makes the io_held gauge read held() at every scrape.
func (m *Metrics) HeldFrom(held func() int) {
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "ublk_nvmeof", Name: "io_held", ConstLabels: m.constLabels,
		Help: "I/O requests held while the controller reconnects.",
	}, func() float64 { return float64(held()) }))
}

// SetState records a lifecycle state change.
func (m *Metrics) SetState(state string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.lastState != "" {
		m.state.WithLabelValues(m.lastState).Set(0)
	}
	m.state.WithLabelValues(state).Set(1)
	m.lastState = state
}

// KeepAliveDone records a keep-alive round trip.
func (m *Metrics) KeepAliveDone(rtt time.Duration) { m.keepAliveRTT.Set(rtt.Seconds()) }

// Reconnected counts a successful reconnect.
func (m *Metrics) Reconnected() { m.reconnects.Inc() }

// Registry is the registry the metrics live in.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// ServeMetrics listens on addr ("host:port") and serves m at /metrics and
// nothing else: Prometheus scrapes it, possibly from another machine. The
// Go runtime's profiles are a separate, opt-in, loopback-only listener
// (ServePprof).
func ServeMetrics(addr string, m *Metrics) (*HTTPServer, error) {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	return serveHTTP(addr, mux)
}

// HTTPServer is one of the daemon's HTTP listeners (metrics, profiles),
// serving until closed.
type HTTPServer struct {
	srv *http.Server
	ln  net.Listener
	wg  sync.WaitGroup
}

func serveHTTP(addr string, h http.Handler) (*HTTPServer, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	s := &HTTPServer{srv: &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}, ln: ln}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		_ = s.srv.Serve(ln)
	}()
	return s, nil
}

// Addr is the address it listens on.
func (s *HTTPServer) Addr() string { return s.ln.Addr().String() }

// Close stops the server and waits for its goroutine.
func (s *HTTPServer) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := s.srv.Shutdown(ctx)
	s.wg.Wait()
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}
