package uring

import (
	"errors"
	"runtime"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func newRing(t *testing.T, entries uint32, opts ...Option) *Ring {
	t.Helper()
	r, err := New(entries, opts...)
	if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) {
		t.Skipf("io_uring unavailable here: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Error(err)
		}
	})
	return r
}

func TestNopRoundTrip(t *testing.T) {
	for _, sqe128 := range []bool{false, true} {
		var opts []Option
		if sqe128 {
			opts = append(opts, WithSQE128())
		}
		r := newRing(t, 4, opts...)
		// Fill the whole SQ, twice, so the ring indexes wrap.
		for round := 0; round < 2; round++ {
			n := r.SQEntries()
			for i := uint32(0); i < n; i++ {
				s, err := r.GetSQE()
				if err != nil {
					t.Fatal(err)
				}
				PrepNop(s, uint64(round)<<32|uint64(i))
			}
			if _, err := r.GetSQE(); !errors.Is(err, ErrSQFull) {
				t.Fatalf("GetSQE on a full SQ = %v, want ErrSQFull", err)
			}
			if got, err := r.Submit(n); err != nil || got != int(n) {
				t.Fatalf("Submit = %d, %v; want %d", got, err, n)
			}
			for i := uint32(0); i < n; i++ {
				c, ok := r.ReapCQE()
				if !ok {
					t.Fatalf("round %d: missing CQE %d", round, i)
				}
				if want := uint64(round)<<32 | uint64(i); c.UserData != want || c.Res != 0 {
					t.Fatalf("CQE = %+v, want user_data %#x res 0", c, want)
				}
			}
			if c, ok := r.ReapCQE(); ok {
				t.Fatalf("unexpected CQE %+v", c)
			}
		}
	}
}

func TestWaitCQEEmpty(t *testing.T) {
	r := newRing(t, 2)
	ok, err := r.WaitCQE(time.Millisecond)
	if err != nil || ok {
		t.Fatalf("WaitCQE on an idle ring = %v, %v; want false, nil", ok, err)
	}
	s, _ := r.GetSQE()
	PrepNop(s, 7)
	if _, err := r.Submit(0); err != nil {
		t.Fatal(err)
	}
	ok, err = r.WaitCQE(time.Minute)
	if err != nil || !ok {
		t.Fatalf("WaitCQE after a NOP = %v, %v; want true, nil", ok, err)
	}
}

func TestReadIntoMmap(t *testing.T) {
	r := newRing(t, 2)
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	buf, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(buf)
	s, _ := r.GetSQE()
	PrepRead(s, p[0], buf[:5], ^uint64(0), 9)
	if _, err := r.Submit(0); err != nil {
		t.Fatal(err)
	}
	if _, err := unix.Write(p[1], []byte("hello")); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Submit(1); err != nil {
		t.Fatal(err)
	}
	c, ok := r.ReapCQE()
	if !ok || c.UserData != 9 || c.Res != 5 || string(buf[:5]) != "hello" {
		t.Fatalf("read CQE %+v ok=%v buf=%q", c, ok, buf[:5])
	}
}

// An eventfd read posted on the ring wakes a thread blocked in Submit(1)
// when another goroutine writes the eventfd: the queue loops' doorbell.
// Checked with the default ring and with the task-run flags the queues use.
func TestEventfdWake(t *testing.T) {
	for _, flags := range []uint32{0, 1<<8 | 1<<12 | 1<<13} {
		done := make(chan struct{})
		go func() {
			defer close(done)
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			r, err := New(4, WithFlags(flags))
			if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) {
				t.Logf("flags %#x unsupported here: %v", flags, err)
				return
			}
			if err != nil {
				t.Error(err)
				return
			}
			defer r.Close()
			efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
			if err != nil {
				t.Error(err)
				return
			}
			defer unix.Close(efd)
			buf, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
			if err != nil {
				t.Error(err)
				return
			}
			defer unix.Munmap(buf)
			s, _ := r.GetSQE()
			PrepRead(s, efd, buf[:8], 0, 42)
			if _, err := r.Submit(0); err != nil {
				t.Error(err)
				return
			}
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				unix.Write(efd, []byte{3, 0, 0, 0, 0, 0, 0, 0})
			}()
			var c CQE
			for {
				var ok bool
				if c, ok = r.ReapCQE(); ok {
					break
				}
				if _, err := r.Submit(1); err != nil {
					t.Error(err)
					break
				}
			}
			wg.Wait()
			if c.UserData != 42 || c.Res != 8 || buf[0] != 3 {
				t.Errorf("flags %#x: CQE %+v, counter %d", flags, c, buf[0])
			}
		}()
		<-done
	}
}
