// Package load is the e2e scenarios' I/O load and data oracle: several jobs
// doing O_DIRECT reads and writes of stamped blocks, at random and
// sequential offsets, against a block device, recording every acknowledged
// write so that the device's content can be checked at the end, through any
// path to the same storage (the ublk device, the kernel's own NVMe/TCP
// initiator, the RAM disk behind the target).
//
// Every job owns a disjoint stripe of the region: writes to one block are
// never concurrent, so "the last acknowledged write" of a block is well
// defined. A write that failed leaves its blocks unknown: they may hold the
// old or the new content (sector by sector), and verification accepts
// either. A read checks every block it returns against the same rules.
package load

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// BlockSize is the unit of stamping and ownership; SectorSize the unit a
// torn write may leave mixed.
const (
	BlockSize  = 4096
	SectorSize = 512
)

// Config describes a load.
type Config struct {
	Path   string // the block device (or, without Direct, any file)
	Offset int64  // start of the region, a multiple of BlockSize
	Blocks int    // size of the region in blocks

	RandomJobs     int // jobs doing random reads and writes in their stripe
	SequentialJobs int // jobs writing their stripe sequentially, then reading it back
	ReadPercent    int // share of the random jobs' I/Os that are reads, 0-100
	MaxIOBlocks    int // largest I/O in blocks (random sizes 1..N; sequential chunks of N)

	// Direct opens Path with O_DIRECT; false only for tests on file
	// systems that do not support it.
	Direct bool
	// Run is stamped into every block, so that content left by another
	// run of the same test never passes for this one's.
	Run uint64
	// ErrorBackoff is how long a job pauses after a failed I/O (so a dead
	// device does not make it spin). Default 20 ms.
	ErrorBackoff time.Duration
}

// IOError is one failed I/O.
type IOError struct {
	Time   time.Time
	Op     string // "read" or "write"
	Offset int64
	Len    int
	Err    error
}

func (e IOError) String() string {
	return fmt.Sprintf("%s %d+%d at %s: %v", e.Op, e.Offset, e.Len, e.Time.Format("15:04:05.000"), e.Err)
}

// Stats counts what the jobs did.
type Stats struct {
	WritesAcked, WritesFailed uint64
	ReadsOK, ReadsFailed      uint64
	BytesWritten, BytesRead   uint64
	Mismatches                uint64 // blocks a read returned with content no write explains
}

func (s Stats) String() string {
	return fmt.Sprintf("writes %d acked, %d failed; reads %d ok, %d failed; %d KiB written, %d KiB read; %d mismatches",
		s.WritesAcked, s.WritesFailed, s.ReadsOK, s.ReadsFailed, s.BytesWritten>>10, s.BytesRead>>10, s.Mismatches)
}

// Load is a running load. Its jobs run until Stop.
type Load struct {
	cfg  Config
	f    *os.File
	stop chan struct{}
	wg   sync.WaitGroup
	seq  atomic.Uint64

	// state[b] is the set of sequences block b may hold; sequence 0 is
	// the zero block. Each entry is owned by one job while it runs, and
	// read by Verify only after Stop.
	state [][]uint64

	writesAcked, writesFailed atomic.Uint64
	readsOK, readsFailed      atomic.Uint64
	bytesWritten, bytesRead   atomic.Uint64
	mismatches                atomic.Uint64
	lastAck                   atomic.Int64 // unix nanoseconds of the last acknowledged I/O

	mu          sync.Mutex
	errs        []IOError // the first maxKeep
	errCount    int
	mismatchMsg []string // the first maxKeep
}

const maxKeep = 50

// Zero writes zeros over the region of cfg directly (the state every load
// starts from), e.g. on the RAM disk before the target exports it.
func Zero(path string, offset int64, blocks int, direct bool) error {
	flags := os.O_WRONLY
	if direct {
		flags |= unix.O_DIRECT
	}
	f, err := os.OpenFile(path, flags, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	const chunk = 64
	buf, err := alignedBuf(chunk * BlockSize)
	if err != nil {
		return err
	}
	defer unix.Munmap(buf)
	for b := 0; b < blocks; b += chunk {
		n := min(chunk, blocks-b)
		if _, err := f.WriteAt(buf[:n*BlockSize], offset+int64(b)*BlockSize); err != nil {
			return err
		}
	}
	return f.Sync()
}

// Start opens the device and starts the jobs. The region must hold zeros
// (see Zero).
func Start(cfg Config) (*Load, error) {
	if cfg.ErrorBackoff == 0 {
		cfg.ErrorBackoff = 20 * time.Millisecond
	}
	if cfg.MaxIOBlocks < 1 {
		cfg.MaxIOBlocks = 1
	}
	jobs := cfg.RandomJobs + cfg.SequentialJobs
	if jobs < 1 || cfg.Blocks < jobs*cfg.MaxIOBlocks {
		return nil, fmt.Errorf("load: %d blocks cannot give %d jobs a stripe of at least %d blocks", cfg.Blocks, jobs, cfg.MaxIOBlocks)
	}
	if cfg.Offset%BlockSize != 0 {
		return nil, fmt.Errorf("load: offset %d is not a multiple of %d", cfg.Offset, BlockSize)
	}
	flags := os.O_RDWR
	if cfg.Direct {
		flags |= unix.O_DIRECT
	}
	f, err := os.OpenFile(cfg.Path, flags, 0)
	if err != nil {
		return nil, err
	}
	l := &Load{cfg: cfg, f: f, stop: make(chan struct{}), state: make([][]uint64, cfg.Blocks)}
	for i := range l.state {
		l.state[i] = []uint64{0}
	}
	l.lastAck.Store(time.Now().UnixNano())
	bufs := make([][]byte, jobs)
	for j := range bufs {
		if bufs[j], err = alignedBuf(cfg.MaxIOBlocks * BlockSize); err != nil {
			for _, b := range bufs[:j] {
				_ = unix.Munmap(b)
			}
			f.Close()
			return nil, err
		}
	}
	for j := 0; j < jobs; j++ {
		lo, hi := j*cfg.Blocks/jobs, (j+1)*cfg.Blocks/jobs
		rng := rand.New(rand.NewPCG(cfg.Run, uint64(j)))
		sequential := j >= cfg.RandomJobs
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			defer unix.Munmap(bufs[j])
			if sequential {
				l.sequentialJob(lo, hi, bufs[j])
			} else {
				l.randomJob(lo, hi, bufs[j], rng)
			}
		}()
	}
	return l, nil
}

func alignedBuf(n int) ([]byte, error) {
	return unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
}

func (l *Load) stopped() bool {
	select {
	case <-l.stop:
		return true
	default:
		return false
	}
}

// backoff pauses after an error, returning early at Stop.
func (l *Load) backoff() {
	t := time.NewTimer(l.cfg.ErrorBackoff)
	defer t.Stop()
	select {
	case <-l.stop:
	case <-t.C:
	}
}

func (l *Load) randomJob(lo, hi int, buf []byte, rng *rand.Rand) {
	for !l.stopped() {
		n := 1 + rng.IntN(l.cfg.MaxIOBlocks)
		b := lo + rng.IntN(hi-lo-n+1)
		var ok bool
		if rng.IntN(100) < l.cfg.ReadPercent {
			ok = l.read(b, n, buf)
		} else {
			ok = l.write(b, n, buf)
		}
		if !ok {
			l.backoff()
		}
	}
}

// sequentialJob writes its stripe front to back in chunks, then reads it
// back the same way, and again.
func (l *Load) sequentialJob(lo, hi int, buf []byte) {
	for pass := 0; !l.stopped(); pass++ {
		for b := lo; b < hi && !l.stopped(); b += l.cfg.MaxIOBlocks {
			n := min(l.cfg.MaxIOBlocks, hi-b)
			var ok bool
			if pass%2 == 0 {
				ok = l.write(b, n, buf)
			} else {
				ok = l.read(b, n, buf)
			}
			if !ok {
				l.backoff()
			}
		}
	}
}

func (l *Load) write(b, n int, buf []byte) bool {
	seq := l.seq.Add(1)
	for i := 0; i < n; i++ {
		Stamp(buf[i*BlockSize:(i+1)*BlockSize], l.cfg.Run, uint64(b+i), seq)
	}
	off := l.cfg.Offset + int64(b)*BlockSize
	_, err := l.f.WriteAt(buf[:n*BlockSize], off)
	if err != nil {
		// Unknown: the old content or the new, sector by sector.
		for i := b; i < b+n; i++ {
			if !slices.Contains(l.state[i], seq) {
				l.state[i] = append(l.state[i], seq)
			}
		}
		l.writesFailed.Add(1)
		l.recordError("write", off, n*BlockSize, err)
		return false
	}
	for i := b; i < b+n; i++ {
		l.state[i] = append(l.state[i][:0], seq)
	}
	l.writesAcked.Add(1)
	l.bytesWritten.Add(uint64(n * BlockSize))
	l.lastAck.Store(time.Now().UnixNano())
	return true
}

func (l *Load) read(b, n int, buf []byte) bool {
	off := l.cfg.Offset + int64(b)*BlockSize
	_, err := l.f.ReadAt(buf[:n*BlockSize], off)
	if err != nil {
		l.readsFailed.Add(1)
		l.recordError("read", off, n*BlockSize, err)
		return false
	}
	for i := 0; i < n; i++ {
		if msg := l.check(b+i, buf[i*BlockSize:(i+1)*BlockSize]); msg != "" {
			l.mismatch("read during the load: " + msg)
		}
	}
	l.readsOK.Add(1)
	l.bytesRead.Add(uint64(n * BlockSize))
	l.lastAck.Store(time.Now().UnixNano())
	return true
}

func (l *Load) recordError(op string, off int64, n int, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.errCount++
	if len(l.errs) < maxKeep {
		l.errs = append(l.errs, IOError{Time: time.Now(), Op: op, Offset: off, Len: n, Err: err})
	}
}

func (l *Load) mismatch(msg string) {
	l.mismatches.Add(1)
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.mismatchMsg) < maxKeep {
		l.mismatchMsg = append(l.mismatchMsg, msg)
	}
}

// check returns "" if block b may hold data, else what is wrong.
func (l *Load) check(b int, data []byte) string {
	return CheckBlock(data, l.cfg.Run, uint64(b), l.state[b])
}

// Stop stops the jobs, waits until each has returned (an I/O stuck in the
// kernel keeps Stop waiting: callers bound it as hang detection), closes
// the device and returns the counts.
func (l *Load) Stop() Stats {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	l.wg.Wait()
	l.f.Close()
	return l.Stats()
}

// Stats returns the counts so far.
func (l *Load) Stats() Stats {
	return Stats{
		WritesAcked: l.writesAcked.Load(), WritesFailed: l.writesFailed.Load(),
		ReadsOK: l.readsOK.Load(), ReadsFailed: l.readsFailed.Load(),
		BytesWritten: l.bytesWritten.Load(), BytesRead: l.bytesRead.Load(),
		Mismatches: l.mismatches.Load(),
	}
}

// Completed is the number of I/Os that succeeded so far.
func (l *Load) Completed() uint64 { return l.writesAcked.Load() + l.readsOK.Load() }

// LastSuccess is when an I/O last succeeded.
func (l *Load) LastSuccess() time.Time { return time.Unix(0, l.lastAck.Load()) }

// Errors returns the number of failed I/Os and the first ones.
func (l *Load) Errors() (int, []IOError) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.errCount, slices.Clone(l.errs)
}

// Mismatches returns descriptions of the first blocks a read during the
// load found wrong.
func (l *Load) Mismatches() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.mismatchMsg)
}

// OnlyErrors reports whether allowed accepts the error of every failed
// I/O; if not, it returns the first it does not accept.
func (l *Load) OnlyErrors(allowed func(error) bool) (IOError, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, e := range l.errs {
		if !allowed(e.Err) {
			return e, false
		}
	}
	return IOError{}, true
}

// Report is what Verify found.
type Report struct {
	Blocks  int // blocks checked
	Unknown int // blocks a failed write left unknown
	New     int // of those, blocks holding (some of) the failed write
}

func (r Report) String() string {
	return fmt.Sprintf("%d blocks verified (%d left unknown by failed writes, %d of those took the new data)", r.Blocks, r.Unknown, r.New)
}

// Verify reads the whole region through path (a fresh open, O_DIRECT when
// the load used it) and checks every block against what was acknowledged.
// Call it after Stop.
func (l *Load) Verify(path string) (Report, error) {
	var rep Report
	flags := os.O_RDONLY
	if l.cfg.Direct {
		flags |= unix.O_DIRECT
	}
	f, err := os.OpenFile(path, flags, 0)
	if err != nil {
		return rep, err
	}
	defer f.Close()
	const chunk = 64
	buf, err := alignedBuf(chunk * BlockSize)
	if err != nil {
		return rep, err
	}
	defer unix.Munmap(buf)
	var bad []string
	nbad := 0
	for b := 0; b < l.cfg.Blocks; b += chunk {
		n := min(chunk, l.cfg.Blocks-b)
		if _, err := f.ReadAt(buf[:n*BlockSize], l.cfg.Offset+int64(b)*BlockSize); err != nil {
			return rep, fmt.Errorf("%s: read blocks %d-%d: %w", path, b, b+n-1, err)
		}
		for i := 0; i < n; i++ {
			blk := buf[i*BlockSize : (i+1)*BlockSize]
			rep.Blocks++
			st := l.state[b+i]
			if len(st) > 1 {
				rep.Unknown++
				if seq, _ := ParseStamp(blk); seq != st[0] {
					rep.New++
				}
			}
			if msg := l.check(b+i, blk); msg != "" {
				nbad++
				if len(bad) < 10 {
					bad = append(bad, msg)
				}
			}
		}
	}
	if nbad > 0 {
		return rep, fmt.Errorf("%s: %d of %d blocks differ from every acknowledged or failed write:\n  %s",
			path, nbad, rep.Blocks, strings.Join(bad, "\n  "))
	}
	return rep, nil
}

// The stamp: every sector of a block starts with this header, and the
// rest of the sector is a pseudo-random fill derived from it, so that a
// block from another run, another offset, another write or a torn write is
// told apart.
var magic = [8]byte{'u', 'b', 'l', 'k', 'l', 'o', 'a', 'd'}

const headerLen = 8 + 8 + 8 + 8 + 4 // magic, run, block, seq, sector

// Stamp fills one block with the content of write seq of run to block b.
func Stamp(blk []byte, run, b, seq uint64) {
	for s := 0; s < BlockSize/SectorSize; s++ {
		stampSector(blk[s*SectorSize:(s+1)*SectorSize], run, b, seq, uint32(s))
	}
}

func stampSector(sec []byte, run, b, seq uint64, s uint32) {
	copy(sec, magic[:])
	binary.LittleEndian.PutUint64(sec[8:], run)
	binary.LittleEndian.PutUint64(sec[16:], b)
	binary.LittleEndian.PutUint64(sec[24:], seq)
	binary.LittleEndian.PutUint32(sec[32:], s)
	x := run ^ b*0x9e3779b97f4a7c15 ^ seq<<20 ^ uint64(s)<<56
	for i := headerLen; i < SectorSize; i += 8 {
		// splitmix64
		x += 0x9e3779b97f4a7c15
		z := x
		z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
		z = (z ^ z>>27) * 0x94d049bb133111eb
		z ^= z >> 31
		var w [8]byte
		binary.LittleEndian.PutUint64(w[:], z)
		copy(sec[i:], w[:])
	}
}

// ParseStamp returns the sequence in a block's first sector header, 0 for
// a zero block, and whether the header is one of ours.
func ParseStamp(blk []byte) (seq uint64, ok bool) {
	if [8]byte(blk[:8]) != magic {
		return 0, isZero(blk[:SectorSize])
	}
	return binary.LittleEndian.Uint64(blk[24:]), true
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// CheckBlock returns "" if every sector of blk is sector s of a write
// whose sequence is in allowed (0: zeros), else a description.
func CheckBlock(blk []byte, run, b uint64, allowed []uint64) string {
	var want [SectorSize]byte
	for s := 0; s < BlockSize/SectorSize; s++ {
		sec := blk[s*SectorSize : (s+1)*SectorSize]
		ok := false
		for _, seq := range allowed {
			if seq == 0 {
				ok = isZero(sec)
			} else {
				stampSector(want[:], run, b, seq, uint32(s))
				ok = [SectorSize]byte(sec) == want
			}
			if ok {
				break
			}
		}
		if !ok {
			return fmt.Sprintf("block %d sector %d: %s; allowed writes %v", b, s, describe(sec, run), allowed)
		}
	}
	return ""
}

func describe(sec []byte, run uint64) string {
	if isZero(sec) {
		return "zeros"
	}
	if [8]byte(sec[:8]) != magic {
		return fmt.Sprintf("not a stamp (% x...)", sec[:16])
	}
	r := binary.LittleEndian.Uint64(sec[8:])
	b := binary.LittleEndian.Uint64(sec[16:])
	seq := binary.LittleEndian.Uint64(sec[24:])
	s := binary.LittleEndian.Uint32(sec[32:])
	what := fmt.Sprintf("stamp of write %d to block %d sector %d", seq, b, s)
	if r != run {
		what += fmt.Sprintf(" of another run (%d)", r)
	}
	return what
}
