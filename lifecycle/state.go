package lifecycle

import (
	"fmt"
	"sync"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/clock"
)

// State is a controller state, as enum nvme_ctrl_state in the Linux host.
type State int

const (
	StateNew State = iota
	StateLive
	StateResetting
	StateConnecting
	StateDeleting
	StateDead
)

func (s State) String() string {
	switch s {
	case StateNew:
		return "NEW"
	case StateLive:
		return "LIVE"
	case StateResetting:
		return "RESETTING"
	case StateConnecting:
		return "CONNECTING"
	case StateDeleting:
		return "DELETING"
	case StateDead:
		return "DEAD"
	}
	return fmt.Sprintf("State(%d)", int(s))
}

// allowedFrom is the transition table of docs/design.md, verbatim: for each
// target state, the states it may be entered from. Anything else is
// rejected, as nvme_change_ctrl_state does.
var allowedFrom = map[State][]State{
	StateConnecting: {StateNew, StateResetting},
	StateLive:       {StateConnecting},
	StateResetting:  {StateNew, StateLive},
	StateDeleting:   {StateLive, StateResetting, StateConnecting},
	StateDead:       {StateDeleting},
}

// CanChange reports whether the table allows from → to.
func CanChange(from, to State) bool {
	for _, s := range allowedFrom[to] {
		if s == from {
			return true
		}
	}
	return false
}

// Transition is one state change, as recorded and reported to observers.
type Transition struct {
	From, To State
	Reason   string
	Time     time.Time
	Seq      uint64 // 1 for the first transition of a machine
}

func (t Transition) String() string {
	return fmt.Sprintf("%v -> %v (%s)", t.From, t.To, t.Reason)
}

// IllegalTransitionError is returned for a transition the table forbids.
type IllegalTransitionError struct {
	From, To State
	Reason   string
}

func (e *IllegalTransitionError) Error() string {
	return fmt.Sprintf("illegal controller state transition %v -> %v (%s)", e.From, e.To, e.Reason)
}

// historyLen is how many transitions a StateMachine remembers.
const historyLen = 64

// StateMachine holds a controller's state. Its state is changed by one
// function, change, which only this package calls; everything else reads
// it or observes it.
//
// Observers are called in transition order, never with the machine's lock
// held, so an observer may read the state (and even cause a further
// transition: it is delivered after the current one). An observer must not
// block for long: it delays the goroutine that changed the state. For a
// Controller that goroutine is the supervisor, so an observer must never
// call Controller.Do or Controller.Delete, which wait for it.
type StateMachine struct {
	clk clock.Clock

	mu        sync.Mutex
	state     State
	seq       uint64
	history   []Transition  // ring of the last historyLen transitions
	changed   chan struct{} // closed and replaced at every transition
	observers []func(Transition)
	pending   []Transition // transitions not yet delivered to observers
	notifying bool         // a goroutine is delivering pending
}

// NewStateMachine returns a machine in StateNew.
func NewStateMachine(clk clock.Clock) *StateMachine {
	if clk == nil {
		clk = clock.Real{}
	}
	return &StateMachine{clk: clk, state: StateNew, changed: make(chan struct{})}
}

// State returns the current state.
func (m *StateMachine) State() State {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.state
}

// Watch returns the current state and a channel closed at the next
// transition.
func (m *StateMachine) Watch() (State, <-chan struct{}) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.state, m.changed
}

// History returns the remembered transitions, oldest first.
func (m *StateMachine) History() []Transition {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]Transition(nil), m.history...)
}

// Observe registers fn to be called with every later transition.
func (m *StateMachine) Observe(fn func(Transition)) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.observers = append(m.observers, fn)
}

// change moves the machine to state to if the table allows it from the
// current state, and records why. It is the only function that changes a
// controller's state.
func (m *StateMachine) change(to State, reason string) (Transition, error) {
	m.mu.Lock()
	from := m.state
	if !CanChange(from, to) {
		m.mu.Unlock()
		return Transition{}, &IllegalTransitionError{From: from, To: to, Reason: reason}
	}
	m.seq++
	tr := Transition{From: from, To: to, Reason: reason, Time: m.clk.Now(), Seq: m.seq}
	m.state = to
	if len(m.history) == historyLen {
		copy(m.history, m.history[1:])
		m.history = m.history[:historyLen-1]
	}
	m.history = append(m.history, tr)
	close(m.changed)
	m.changed = make(chan struct{})
	m.pending = append(m.pending, tr)
	if m.notifying {
		// The goroutine already delivering will deliver this one too, in
		// order.
		m.mu.Unlock()
		return tr, nil
	}
	m.notifying = true
	m.deliverLocked()
	m.mu.Unlock()
	return tr, nil
}

// deliverLocked calls the observers for every pending transition, dropping
// the lock around each call.
func (m *StateMachine) deliverLocked() {
	for len(m.pending) > 0 {
		tr := m.pending[0]
		m.pending = m.pending[1:]
		obs := m.observers
		m.mu.Unlock()
		for _, fn := range obs {
			fn(tr)
		}
		m.mu.Lock()
	}
	m.notifying = false
}
