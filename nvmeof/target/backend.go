package target

import (
	"errors"
	"fmt"
	"os"
	"sync"
)

// Backend stores a namespace's blocks.
type Backend interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Size is the capacity in bytes.
	Size() int64
	// Flush makes completed writes durable.
	Flush() error
}

// MemoryBackend is a Backend in memory.
type MemoryBackend struct {
	mu   sync.RWMutex
	data []byte
}

// NewMemoryBackend returns a zeroed memory backend of size bytes.
func NewMemoryBackend(size int64) *MemoryBackend {
	return &MemoryBackend{data: make([]byte, size)}
}

func (m *MemoryBackend) ReadAt(p []byte, off int64) (int, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if off < 0 || off+int64(len(p)) > int64(len(m.data)) {
		return 0, fmt.Errorf("memory backend: read %d at %d beyond %d", len(p), off, len(m.data))
	}
	return copy(p, m.data[off:]), nil
}

func (m *MemoryBackend) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off < 0 || off+int64(len(p)) > int64(len(m.data)) {
		return 0, fmt.Errorf("memory backend: write %d at %d beyond %d", len(p), off, len(m.data))
	}
	return copy(m.data[off:], p), nil
}

func (m *MemoryBackend) Size() int64  { return int64(len(m.data)) }
func (m *MemoryBackend) Flush() error { return nil }

// FileBackend is a Backend on a file or block device.
type FileBackend struct {
	f    *os.File
	size int64
}

// OpenFileBackend opens path read-write. If size > 0 a regular file is
// extended to at least size bytes.
func OpenFileBackend(path string, size int64) (*FileBackend, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	cur := fi.Size()
	if fi.Mode().IsRegular() && size > cur {
		if err := f.Truncate(size); err != nil {
			f.Close()
			return nil, err
		}
		cur = size
	}
	if !fi.Mode().IsRegular() {
		// Block device: the size is where the end is.
		end, err := f.Seek(0, 2)
		if err != nil {
			f.Close()
			return nil, err
		}
		cur = end
	}
	if cur == 0 {
		f.Close()
		return nil, errors.New("file backend: size 0")
	}
	return &FileBackend{f: f, size: cur}, nil
}

func (b *FileBackend) ReadAt(p []byte, off int64) (int, error)  { return b.f.ReadAt(p, off) }
func (b *FileBackend) WriteAt(p []byte, off int64) (int, error) { return b.f.WriteAt(p, off) }
func (b *FileBackend) Size() int64                              { return b.size }
func (b *FileBackend) Flush() error                             { return b.f.Sync() }

// Close closes the file.
func (b *FileBackend) Close() error { return b.f.Close() }
