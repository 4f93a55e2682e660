// Package netnstest gives tests a network namespace of their own, for the
// link watch's tests with veth pairs and routes.
package netnstest

import (
	"runtime"
	"testing"

	"github.com/vishvananda/netns"
)

// New makes a network namespace for t (needs CAP_SYS_ADMIN; t is skipped,
// with the reason, otherwise), closed when t ends. The calling thread is
// back in its own namespace when New returns.
func New(t *testing.T) netns.NsHandle {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Skipf("netns: %v", err)
	}
	defer orig.Close()
	ns, err := netns.New()
	if err != nil {
		t.Skipf("cannot create a network namespace (needs CAP_SYS_ADMIN): %v", err)
	}
	if err := netns.Set(orig); err != nil {
		t.Fatalf("back to the original namespace: %v", err)
	}
	t.Cleanup(func() { ns.Close() })
	return ns
}
