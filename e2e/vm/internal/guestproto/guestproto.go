// Package guestproto is what the e2e VM's host side and its /init share: the
// manifest the host puts into the initramfs, the events /init writes back on
// the second serial port, and the rule that says which kernel log records
// fail a test.
package guestproto

import (
	"regexp"
	"strconv"
	"strings"
)

// Paths inside the initramfs.
const (
	ManifestPath = "/e2e/manifest.json"
	BinDir       = "/e2e/bin"
	// ResultsTTY is the second serial port (QEMU's second -serial): events
	// go there, one JSON object a line, apart from the kernel console on
	// ttyS0 so that kernel messages can never interleave with them.
	ResultsTTY = "/dev/ttyS1"
)

// Manifest tells /init what to load and what to run.
type Manifest struct {
	Modules  []Module  `json:"modules"`
	Binaries []Binary  `json:"binaries"`
	Run      string    `json:"run"`      // -test.run pattern choosing the tests
	Timeout  int64     `json:"timeout"`  // per test, nanoseconds
	Env      []string  `json:"env"`      // extra environment for tests
	Verbose  bool      `json:"verbose"`  // stream test output lines as they come
	Sysctls  []Sysctl  `json:"sysctls"`  // written before the first test
	Commands []Command `json:"commands"` // run before the first test (harness self-tests)
}

// Module is a kernel module file, loaded in manifest order.
type Module struct {
	Name   string `json:"name"`
	Path   string `json:"path"`
	Params string `json:"params"`
}

// Binary is one package's test binary (go test -c, CGO_ENABLED=0).
type Binary struct {
	Package string `json:"package"` // import path relative to the module, e.g. "ublk"
	Path    string `json:"path"`
	// Skip names tests an earlier boot ran to their end: listed by
	// -test.run but not run again.
	Skip []string `json:"skip,omitempty"`
}

// Sysctl is a /proc/sys file and its value.
type Sysctl struct {
	Path  string `json:"path"`
	Value string `json:"value"`
}

// Command is a program /init runs before the tests; Wait false leaves it running.
type Command struct {
	Args []string `json:"args"`
}

// Event kinds.
const (
	EventBoot  = "boot"  // /init is up; Text: kernel release and module report
	EventStart = "start" // a test started
	EventOut   = "out"   // one line of a test's output (Verbose only)
	EventEnd   = "end"   // a test ended; Status, Elapsed, Output, Kernel
	EventLog   = "log"   // a message from /init itself
	EventDone  = "done"  // every test ran; /init powers off next
)

// Test statuses.
const (
	StatusPass = "PASS"
	StatusFail = "FAIL"
	StatusSkip = "SKIP"
)

// Event is one line on the results port.
type Event struct {
	Kind    string   `json:"e"`
	Package string   `json:"p,omitempty"`
	Test    string   `json:"t,omitempty"`
	Text    string   `json:"x,omitempty"`
	Status  string   `json:"s,omitempty"`
	Elapsed int64    `json:"d,omitempty"` // nanoseconds
	Output  string   `json:"o,omitempty"` // the test's whole output (end)
	Kernel  []string `json:"k,omitempty"` // kernel log records logged during the test (end)
	// Complaints are the records among Kernel that fail the test.
	Complaints []string `json:"c,omitempty"`
}

// complaint matches the kernel's own reports of something gone wrong: WARN(),
// BUG(), oopses, the hung-task detector, soft lockups, RCU stalls and the
// sanitizers. Matched against kernel-facility records only, so a test cannot
// fake (or hide) one by writing to /dev/kmsg.
var complaint = regexp.MustCompile(`WARNING:|BUG:|Oops|kernel BUG at|general protection fault|` +
	`blocked for more than \d+ seconds|soft lockup|hard LOCKUP|detected stalls|` +
	`KASAN|UBSAN|KFENCE|Kernel panic`)

// IsComplaint reports whether a kernel log message is one that fails a test.
func IsComplaint(msg string) bool { return complaint.MatchString(msg) }

// KmsgRecord is one record read from /dev/kmsg.
type KmsgRecord struct {
	Facility int
	Level    int
	Seq      uint64
	Micros   uint64
	Message  string
}

// ParseKmsg decodes one /dev/kmsg record ("prio,seq,usec,flags[,...];message\n"
// followed by optional " KEY=value" continuation lines, see
// Documentation/ABI/testing/dev-kmsg). ok is false for a malformed record.
func ParseKmsg(rec string) (r KmsgRecord, ok bool) {
	head, msg, found := strings.Cut(rec, ";")
	if !found {
		return r, false
	}
	if i := strings.IndexByte(msg, '\n'); i >= 0 {
		msg = msg[:i] // drop the dictionary lines
	}
	f := strings.Split(head, ",")
	if len(f) < 3 {
		return r, false
	}
	prio, err1 := strconv.Atoi(f[0])
	seq, err2 := strconv.ParseUint(f[1], 10, 64)
	us, err3 := strconv.ParseUint(f[2], 10, 64)
	if err1 != nil || err2 != nil || err3 != nil || prio < 0 {
		return r, false
	}
	return KmsgRecord{Facility: prio >> 3, Level: prio & 7, Seq: seq, Micros: us, Message: msg}, true
}

// String formats a record as dmesg does.
func (r KmsgRecord) String() string {
	return "[" + strconv.FormatFloat(float64(r.Micros)/1e6, 'f', 6, 64) + "] " + r.Message
}
