package attach

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Status is what `ublk-nvmeof status` and `list` show of one attached
// device. The daemon serving it answers for it on its control socket.
type Status struct {
	Device  string `json:"device"` // /dev/ublkbN
	DevID   int    `json:"dev_id"`
	PID     int    `json:"pid"`
	TrAddr  string `json:"traddr"`
	TrSvcID string `json:"trsvcid"`
	NQN     string `json:"nqn"`
	HostNQN string `json:"hostnqn"`
	NSID    uint32 `json:"nsid"`

	State      string    `json:"state"` // the controller's lifecycle state
	StateSince time.Time `json:"state_since"`
	Queues     int       `json:"queues"`
	QueueSize  int       `json:"queue_size"`
	// KeepAliveRTT is the round trip of the last keep-alive, zero if none.
	KeepAliveRTT time.Duration `json:"keep_alive_rtt_ns"`
	Reconnects   int           `json:"reconnects"`
	InFlight     int           `json:"in_flight"` // I/O requests being served
	Held         int           `json:"held"`      // of those, held while reconnecting
	Started      time.Time     `json:"started"`
	// UblkFeatures are the UBLK_F_* flags the kernel's ublk driver offers
	// (UBLK_U_CMD_GET_FEATURES), UblkFlags those the device uses (its
	// flags at ADD_DEV): names without the UBLK_F_ prefix, unknown bits
	// as hex.
	UblkFeatures []string `json:"ublk_features"`
	UblkFlags    []string `json:"ublk_flags"`
	// UblkDataPath says whether the device's data moves with zero copy
	// (UBLK_F_AUTO_BUF_REG) or is copied, and why (ublk.DataPath).
	UblkDataPath string `json:"ublk_data_path"`
	// ZeroCopyIOs counts the READs and WRITEs whose data moved between
	// the request's pages and the socket; ZeroCopyBounced those of a
	// zero-copy device that went through a buffer of their own instead
	// (the slow path: retried or waiting I/O, an association whose
	// queues the rings do not drive, data digests).
	ZeroCopyIOs     int64 `json:"zero_copy_ios,omitempty"`
	ZeroCopyBounced int64 `json:"zero_copy_bounced,omitempty"`
	// UblkState is the driver's state of an ORPHANED device (List):
	// QUIESCED (holding I/O for a recovery), FAIL_IO or DEAD.
	UblkState string `json:"ublk_state,omitempty"`
}

// RunDir holds one control socket per attached device:
// $UBLK_NVMEOF_RUN_DIR, default /run/ublk-nvmeof.
func RunDir() string {
	if d := os.Getenv("UBLK_NVMEOF_RUN_DIR"); d != "" {
		return d
	}
	return "/run/ublk-nvmeof"
}

func socketPath(devID int) string {
	return filepath.Join(RunDir(), "ublkb"+strconv.Itoa(devID)+".sock")
}

// ControlServer answers `status`, `list` and `detach` for one device on a
// unix socket in RunDir. Detach only signals; the daemon's owner tears down.
type ControlServer struct {
	path   string
	ln     net.Listener
	srv    *http.Server
	wg     sync.WaitGroup
	detach func()
}

// ListenControl opens the control socket of device devID. status is called
// for every request; detach when a client asks the daemon to detach.
func ListenControl(devID int, status func() Status, detach func()) (*ControlServer, error) {
	if err := os.MkdirAll(RunDir(), 0o755); err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	path := socketPath(devID)
	// A socket left by a daemon that died: remove it if nobody answers.
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		return nil, fmt.Errorf("control socket %s: another daemon serves device %d", path, devID)
	}
	_ = os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	s := &ControlServer{path: path, ln: ln, detach: detach}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(status())
	})
	mux.HandleFunc("POST /detach", func(w http.ResponseWriter, _ *http.Request) {
		s.detach()
		w.WriteHeader(http.StatusAccepted)
	})
	s.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		_ = s.srv.Serve(ln)
	}()
	return s, nil
}

// Close stops answering, waits for the server goroutine and removes the
// socket.
func (s *ControlServer) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := s.srv.Shutdown(ctx)
	s.wg.Wait()
	// Serve removed the socket file with its listener; make sure.
	if rmErr := os.Remove(s.path); rmErr != nil && !errors.Is(rmErr, os.ErrNotExist) && err == nil {
		err = rmErr
	}
	return err
}

func controlClient(path string) *http.Client {
	return &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", path)
			},
		},
	}
}

// ErrNoSuchDevice: no daemon answers for that device.
var ErrNoSuchDevice = errors.New("no ublk-nvmeof daemon serves")

// noDaemon says which device has no daemon; the cause only when it is not
// the plain "nobody listens".
func noDaemon(path string, err error) error {
	dev := "/dev/" + strings.TrimSuffix(filepath.Base(path), ".sock")
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("%w %s", ErrNoSuchDevice, dev)
	}
	return fmt.Errorf("%w %s: %v", ErrNoSuchDevice, dev, err)
}

// GetStatus asks the daemon serving device devID for its status.
func GetStatus(ctx context.Context, devID int) (Status, error) {
	return getStatus(ctx, socketPath(devID))
}

func getStatus(ctx context.Context, path string) (Status, error) {
	var st Status
	c := controlClient(path)
	defer c.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://daemon/status", nil)
	if err != nil {
		return st, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return st, noDaemon(path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return st, fmt.Errorf("%s: status %s", path, resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return st, fmt.Errorf("%s: %w", path, err)
	}
	return st, nil
}

// List returns the status of every device a live daemon serves, and of
// every device this tool made that no live daemon serves (State
// StateOrphaned: its daemon died and was not restarted), by device id.
func List(ctx context.Context) ([]Status, error) {
	paths, err := filepath.Glob(filepath.Join(RunDir(), "ublkb*.sock"))
	if err != nil {
		return nil, err
	}
	var out []Status
	served := map[int]bool{}
	for _, p := range paths {
		st, err := getStatus(ctx, p)
		if err != nil {
			continue
		}
		out = append(out, st)
		served[st.DevID] = true
	}
	orphaned, err := orphans(ctx, served)
	if err != nil {
		return nil, err
	}
	out = append(out, orphaned...)
	sort.Slice(out, func(i, j int) bool { return out[i].DevID < out[j].DevID })
	return out, nil
}

// Detach asks the daemon serving devID to detach, then waits until it has
// gone (its control socket no longer answers) or ctx ends.
func Detach(ctx context.Context, devID int) error {
	path := socketPath(devID)
	c := controlClient(path)
	defer c.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://daemon/detach", nil)
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return noDaemon(path, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		return fmt.Errorf("detach /dev/ublkb%d: %s", devID, resp.Status)
	}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		conn, err := net.Dial("unix", path)
		if err != nil {
			return nil
		}
		conn.Close()
		select {
		case <-ctx.Done():
			return fmt.Errorf("detach /dev/ublkb%d: still attached: %w", devID, ctx.Err())
		case <-tick.C:
		}
	}
}

// ParseDevice accepts a device id ("3") or path ("/dev/ublkb3", "ublkb3").
func ParseDevice(s string) (int, error) {
	t := strings.TrimPrefix(strings.TrimPrefix(s, "/dev/"), "ublkb")
	id, err := strconv.Atoi(t)
	if err != nil || id < 0 {
		return 0, fmt.Errorf("%w: %q is not a ublk device id or /dev/ublkbN path", ErrInvalidOptions, s)
	}
	return id, nil
}
