// Package clock is the time source of lifecycle and keepalive: the real clock
// in production, a fake one in tests so that keep-alive intervals, KATO,
// reconnect_delay, ctrl_loss_tmo and fast_io_fail_tmo can be driven step by
// step without sleeping.
package clock

import (
	"sort"
	"sync"
	"time"
)

// Clock tells the time and makes timers.
type Clock interface {
	Now() time.Time
	NewTimer(d time.Duration) Timer
}

// Timer is the part of *time.Timer that lifecycle and keepalive use.
type Timer interface {
	C() <-chan time.Time
	// Stop prevents the timer from firing; it reports whether it did so.
	Stop() bool
}

// Real is the wall clock.
type Real struct{}

func (Real) Now() time.Time { return time.Now() }

func (Real) NewTimer(d time.Duration) Timer { return realTimer{time.NewTimer(d)} }

type realTimer struct{ t *time.Timer }

func (t realTimer) C() <-chan time.Time { return t.t.C }
func (t realTimer) Stop() bool          { return t.t.Stop() }

// Fake is a clock that moves only when Advance is called. Timers fire (a
// value is sent on their buffered channel) when Advance moves the time to or
// past their deadline. WaitTimers lets a test wait until the code under test
// has armed its timers, so a test never needs to sleep.
type Fake struct {
	mu      sync.Mutex
	cond    *sync.Cond
	now     time.Time
	pending []*fakeTimer
	armed   int // timers ever created, for WaitArmed
}

// NewFake returns a fake clock set to start.
func NewFake(start time.Time) *Fake {
	f := &Fake{now: start}
	f.cond = sync.NewCond(&f.mu)
	return f
}

type fakeTimer struct {
	f        *Fake
	deadline time.Time
	c        chan time.Time
}

func (f *Fake) Now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}

func (f *Fake) NewTimer(d time.Duration) Timer {
	f.mu.Lock()
	defer f.mu.Unlock()
	t := &fakeTimer{f: f, deadline: f.now.Add(d), c: make(chan time.Time, 1)}
	f.armed++
	if d <= 0 {
		t.c <- f.now
	} else {
		f.pending = append(f.pending, t)
	}
	f.cond.Broadcast()
	return t
}

func (t *fakeTimer) C() <-chan time.Time { return t.c }

func (t *fakeTimer) Stop() bool {
	f := t.f
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, p := range f.pending {
		if p == t {
			f.pending = append(f.pending[:i], f.pending[i+1:]...)
			f.cond.Broadcast()
			return true
		}
	}
	return false
}

// Advance moves the clock forward by d and fires, in deadline order, every
// timer whose deadline has been reached.
func (f *Fake) Advance(d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.now = f.now.Add(d)
	sort.SliceStable(f.pending, func(i, j int) bool { return f.pending[i].deadline.Before(f.pending[j].deadline) })
	keep := f.pending[:0]
	for _, t := range f.pending {
		if !t.deadline.After(f.now) {
			t.c <- t.deadline
		} else {
			keep = append(keep, t)
		}
	}
	f.pending = keep
	f.cond.Broadcast()
}

// Pending returns the number of armed timers that have not fired or been
// stopped.
func (f *Fake) Pending() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.pending)
}

// WaitTimers blocks until at least n timers are pending.
func (f *Fake) WaitTimers(n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for len(f.pending) < n {
		f.cond.Wait()
	}
}

// Armed returns the number of timers created so far.
func (f *Fake) Armed() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.armed
}

// WaitArmed blocks until at least n timers have been created since the clock
// was made. Unlike WaitTimers it cannot be satisfied by a timer armed earlier
// that is still pending.
func (f *Fake) WaitArmed(n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for f.armed < n {
		f.cond.Wait()
	}
}

// NextDeadline returns the earliest pending deadline, or false if none.
func (f *Fake) NextDeadline() (time.Time, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.pending) == 0 {
		return time.Time{}, false
	}
	min := f.pending[0].deadline
	for _, t := range f.pending[1:] {
		if t.deadline.Before(min) {
			min = t.deadline
		}
	}
	return min, true
}
