package attach

import (
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
)

// ServePprof listens on addr and serves the Go runtime's profiles at
// /debug/pprof/ (net/http/pprof: goroutine stacks, heap, CPU profile,
// execution trace, and the daemon's command line), so that where the I/O
// path's time goes can be measured on the running daemon. They tell a
// reader a lot about the process and a CPU profile or trace costs it CPU,
// so addr must be a loopback address (PprofListenAddr).
func ServePprof(addr string) (*HTTPServer, error) {
	addr, err := PprofListenAddr(addr)
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /debug/pprof/", pprof.Index) // also the named profiles
	mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	return serveHTTP(addr, mux)
}

// PprofListenAddr checks the profiling listener's address: "PORT" or
// ":PORT" listen on 127.0.0.1; otherwise the host must be "localhost" or
// a loopback IP address. Anything else, the unspecified address included,
// is refused: profiles are for someone on the machine (ssh -L reaches them
// from elsewhere).
func PprofListenAddr(s string) (string, error) {
	if _, err := netip.ParseAddrPort("127.0.0.1:" + s); err == nil {
		return "127.0.0.1:" + s, nil // a bare port
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return "", invalid("--pprof-addr %q: not [host]:port: %v", s, err)
	}
	if _, err := netip.ParseAddrPort("127.0.0.1:" + port); err != nil {
		return "", invalid("--pprof-addr %q: %q is not a port", s, port)
	}
	switch ip, err := netip.ParseAddr(host); {
	case host == "":
		return net.JoinHostPort("127.0.0.1", port), nil
	case host == "localhost":
		return s, nil
	case err == nil && ip.Unmap().IsLoopback():
		return s, nil
	}
	return "", fmt.Errorf("%w: --pprof-addr %q: profiles are served on loopback only (127.0.0.1, ::1 or localhost)", ErrInvalidOptions, s)
}
