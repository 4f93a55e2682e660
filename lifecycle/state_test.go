package lifecycle

import (
	"errors"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/ublk-nvmeof/ublk-nvmeof/clock"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var epoch = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

var allStates = []State{StateNew, StateLive, StateResetting, StateConnecting, StateDeleting, StateDead}

// The table of docs/design.md, written out again independently of the code.
var designTable = map[[2]State]bool{
	{StateNew, StateConnecting}:       true,
	{StateResetting, StateConnecting}: true,
	{StateConnecting, StateLive}:      true,
	{StateNew, StateResetting}:        true,
	{StateLive, StateResetting}:       true,
	{StateLive, StateDeleting}:        true,
	{StateResetting, StateDeleting}:   true,
	{StateConnecting, StateDeleting}:  true,
	{StateDeleting, StateDead}:        true,
}

func TestTransitionTable(t *testing.T) {
	for _, from := range allStates {
		for _, to := range allStates {
			want := designTable[[2]State{from, to}]
			if got := CanChange(from, to); got != want {
				t.Errorf("CanChange(%v, %v) = %v, want %v", from, to, got, want)
			}
		}
	}
}

// Drive a machine to from through allowed transitions, then try to.
func TestChangeEnforcesTable(t *testing.T) {
	pathTo := map[State][]State{
		StateNew:        {},
		StateConnecting: {StateConnecting},
		StateLive:       {StateConnecting, StateLive},
		StateResetting:  {StateResetting},
		StateDeleting:   {StateConnecting, StateDeleting},
		StateDead:       {StateConnecting, StateDeleting, StateDead},
	}
	for _, from := range allStates {
		for _, to := range allStates {
			m := NewStateMachine(clock.NewFake(epoch))
			for _, s := range pathTo[from] {
				if _, err := m.change(s, "setup"); err != nil {
					t.Fatalf("setup %v: %v", s, err)
				}
			}
			_, err := m.change(to, "test")
			allowed := designTable[[2]State{from, to}]
			if allowed && err != nil {
				t.Errorf("%v -> %v rejected: %v", from, to, err)
			}
			if !allowed {
				var ite *IllegalTransitionError
				if !errors.As(err, &ite) || ite.From != from || ite.To != to {
					t.Errorf("%v -> %v: err = %v, want IllegalTransitionError", from, to, err)
				}
				if m.State() != from {
					t.Errorf("%v -> %v rejected but state is now %v", from, to, m.State())
				}
			}
		}
	}
}

func TestTransitionsRecordedAndObserved(t *testing.T) {
	clk := clock.NewFake(epoch)
	m := NewStateMachine(clk)
	var seen []Transition
	m.Observe(func(tr Transition) { seen = append(seen, tr) })
	_, ch := m.Watch()

	m.change(StateConnecting, "connect")
	select {
	case <-ch:
	default:
		t.Fatal("Watch channel not closed by a transition")
	}
	clk.Advance(time.Second)
	m.change(StateLive, "connected")
	if _, err := m.change(StateDead, "bogus"); err == nil {
		t.Fatal("LIVE -> DEAD allowed")
	}

	want := []Transition{
		{From: StateNew, To: StateConnecting, Reason: "connect", Time: epoch, Seq: 1},
		{From: StateConnecting, To: StateLive, Reason: "connected", Time: epoch.Add(time.Second), Seq: 2},
	}
	h := m.History()
	if len(h) != len(want) || len(seen) != len(want) {
		t.Fatalf("history %v, observed %v, want %v", h, seen, want)
	}
	for i := range want {
		if h[i] != want[i] || seen[i] != want[i] {
			t.Errorf("transition %d: history %+v, observed %+v, want %+v", i, h[i], seen[i], want[i])
		}
	}
}

// An observer that changes state does not deadlock, and every observer sees
// the transitions in order.
func TestObserverMayChangeState(t *testing.T) {
	m := NewStateMachine(clock.NewFake(epoch))
	var a, b []State
	m.Observe(func(tr Transition) {
		a = append(a, tr.To)
		if tr.To == StateLive {
			m.change(StateResetting, "observer")
		}
	})
	m.Observe(func(tr Transition) { b = append(b, tr.To) })
	m.change(StateConnecting, "")
	m.change(StateLive, "")
	want := []State{StateConnecting, StateLive, StateResetting}
	for _, got := range [][]State{a, b} {
		if len(got) != len(want) {
			t.Fatalf("observed %v, want %v", got, want)
		}
		for i := range want {
			if got[i] != want[i] {
				t.Fatalf("observed %v, want %v", got, want)
			}
		}
	}
	if m.State() != StateResetting {
		t.Fatalf("state %v", m.State())
	}
}

func TestHistoryBounded(t *testing.T) {
	m := NewStateMachine(clock.NewFake(epoch))
	m.change(StateConnecting, "")
	for i := 0; i < 100; i++ {
		m.change(StateLive, "")
		m.change(StateResetting, "")
		m.change(StateConnecting, "")
	}
	h := m.History()
	if len(h) != historyLen {
		t.Fatalf("history length %d", len(h))
	}
	if h[len(h)-1].Seq != 301 {
		t.Fatalf("last seq %d, want 301", h[len(h)-1].Seq)
	}
}
