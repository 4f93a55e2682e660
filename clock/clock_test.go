package clock

import (
	"testing"
	"time"
)

var epoch = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func fired(t Timer) bool {
	select {
	case <-t.C():
		return true
	default:
		return false
	}
}

func TestFakeFiresInOrderAtDeadline(t *testing.T) {
	f := NewFake(epoch)
	a := f.NewTimer(2 * time.Second)
	b := f.NewTimer(time.Second)
	c := f.NewTimer(3 * time.Second)
	if f.Pending() != 3 || f.Armed() != 3 {
		t.Fatalf("pending %d armed %d", f.Pending(), f.Armed())
	}
	if d, _ := f.NextDeadline(); !d.Equal(epoch.Add(time.Second)) {
		t.Fatalf("next deadline %v", d)
	}
	f.Advance(time.Second - 1)
	if fired(a) || fired(b) || fired(c) {
		t.Fatal("fired early")
	}
	f.Advance(1)
	if !fired(b) || fired(a) {
		t.Fatal("b should have fired, a not")
	}
	if !c.Stop() {
		t.Fatal("Stop of a pending timer returned false")
	}
	f.Advance(time.Hour)
	if !fired(a) || fired(c) {
		t.Fatal("a should have fired, c (stopped) not")
	}
	if a.Stop() {
		t.Fatal("Stop of a fired timer returned true")
	}
	if !f.Now().Equal(epoch.Add(time.Hour + time.Second)) {
		t.Fatalf("now %v", f.Now())
	}
}

func TestFakeZeroDurationFiresAtOnce(t *testing.T) {
	f := NewFake(epoch)
	if !fired(f.NewTimer(0)) {
		t.Fatal("zero timer did not fire")
	}
	if f.Pending() != 0 {
		t.Fatal("zero timer pending")
	}
}

func TestFakeWaitTimers(t *testing.T) {
	f := NewFake(epoch)
	done := make(chan struct{})
	go func() {
		f.WaitTimers(2)
		f.WaitArmed(2)
		close(done)
	}()
	f.NewTimer(time.Second)
	select {
	case <-done:
		t.Fatal("WaitTimers(2) returned with one timer")
	default:
	}
	f.NewTimer(time.Second)
	<-done
}

func TestReal(t *testing.T) {
	r := Real{}
	tm := r.NewTimer(time.Millisecond)
	<-tm.C()
	if tm.Stop() {
		t.Fatal("Stop after firing returned true")
	}
}
