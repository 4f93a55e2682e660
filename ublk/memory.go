package ublk

import (
	"fmt"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// MemoryBackend stores the device in anonymous memory. It serves requests
// synchronously inside Serve. Its contents start as zeros.
type MemoryBackend struct {
	mu   sync.RWMutex // writes exclusive, reads shared: keeps -race quiet for overlapping I/O
	data []byte
}

// NewMemoryBackend allocates size bytes (lazily: pages are only touched
// when written). Close releases them.
func NewMemoryBackend(size uint64) (*MemoryBackend, error) {
	data, err := unix.Mmap(-1, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("ublk: memory backend of %d bytes: %w", size, err)
	}
	return &MemoryBackend{data: data}, nil
}

// Size is the backend's capacity in bytes.
func (m *MemoryBackend) Size() uint64 { return uint64(len(m.data)) }

// Bytes returns the backing store for inspection; callers must not use it
// concurrently with I/O.
func (m *MemoryBackend) Bytes() []byte { return m.data }

// Serve implements Backend.
func (m *MemoryBackend) Serve(r *Request) { r.Complete(m.Do(r)) }

// Do executes r against the store and returns its status, without
// completing it; wrappers use it to complete asynchronously.
func (m *MemoryBackend) Do(r *Request) error {
	end := r.Offset + int64(r.Length)
	if r.Offset < 0 || end > int64(len(m.data)) || end < r.Offset {
		return syscall.EIO
	}
	switch r.Op {
	case OpRead:
		m.mu.RLock()
		copy(r.Buf, m.data[r.Offset:end])
		m.mu.RUnlock()
	case OpWrite:
		m.mu.Lock()
		copy(m.data[r.Offset:end], r.Buf)
		m.mu.Unlock()
	case OpFlush:
		// Memory is as durable as it gets.
	case OpDiscard, OpWriteZeroes:
		m.mu.Lock()
		clear(m.data[r.Offset:end])
		m.mu.Unlock()
	default:
		return syscall.EOPNOTSUPP
	}
	return nil
}

// Close releases the memory. The device must be closed first.
func (m *MemoryBackend) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.data == nil {
		return nil
	}
	err := unix.Munmap(m.data)
	m.data = nil
	return err
}

// NullBackend completes every request at once, successfully, without
// touching data: reads return whatever the tag buffer held. For
// benchmarking the ublk path itself.
type NullBackend struct{}

// Serve implements Backend.
func (NullBackend) Serve(r *Request) { r.Complete(nil) }
