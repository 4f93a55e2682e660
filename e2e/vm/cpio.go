package vm

import (
	"fmt"
	"io"
	"os"
	"path"
	"strings"
)

// cpioWriter writes the "newc" cpio format the kernel unpacks as an
// initramfs (Documentation/driver-api/early-userspace/buffer-format.rst).
// Parent directories are emitted before their contents, once each.
type cpioWriter struct {
	w     io.Writer
	ino   uint32
	dirs  map[string]bool
	files map[string]bool
	err   error
}

func newCPIOWriter(w io.Writer) *cpioWriter {
	return &cpioWriter{w: w, ino: 1, dirs: map[string]bool{".": true, "": true, "/": true}, files: map[string]bool{}}
}

const (
	cpioModeDir     = 0o040000
	cpioModeFile    = 0o100000
	cpioModeSymlink = 0o120000
)

func (c *cpioWriter) header(name string, mode, size uint32) {
	if c.err != nil {
		return
	}
	c.files[name] = true
	c.ino++
	nlink := uint32(1)
	if mode&cpioModeDir == cpioModeDir {
		nlink = 2
	}
	// magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
	// devminor, rdevmajor, rdevminor, namesize (with NUL), check.
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(name)+1, 0)
	_, c.err = io.WriteString(c.w, hdr+name+"\x00"+pad4(len(hdr)+len(name)+1))
}

func pad4(n int) string { return strings.Repeat("\x00", (4-n%4)%4) }

func (c *cpioWriter) mkdirAll(dir string) {
	dir = path.Clean(strings.TrimPrefix(dir, "/"))
	if c.dirs[dir] {
		return
	}
	c.mkdirAll(path.Dir(dir))
	c.header(dir, cpioModeDir|0o755, 0)
	c.dirs[dir] = true
}

// hasFile reports whether name was added.
func (c *cpioWriter) hasFile(name string) bool {
	return c.files[strings.TrimPrefix(path.Clean(name), "/")]
}

// Dir adds a directory (and its parents).
func (c *cpioWriter) Dir(name string) { c.mkdirAll(name) }

// Bytes adds a regular file with the given content.
func (c *cpioWriter) Bytes(name string, perm uint32, data []byte) {
	name = strings.TrimPrefix(path.Clean(name), "/")
	c.mkdirAll(path.Dir(name))
	c.header(name, cpioModeFile|perm, uint32(len(data)))
	if c.err == nil {
		_, c.err = c.w.Write(data)
	}
	if c.err == nil {
		_, c.err = io.WriteString(c.w, pad4(len(data)))
	}
}

// File adds a copy of the host file src as name.
func (c *cpioWriter) File(name string, perm uint32, src string) {
	if c.err != nil {
		return
	}
	f, err := os.Open(src)
	if err != nil {
		c.err = err
		return
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		c.err = err
		return
	}
	if st.Size() > 1<<31 {
		c.err = fmt.Errorf("%s: too large for an initramfs", src)
		return
	}
	name = strings.TrimPrefix(path.Clean(name), "/")
	c.mkdirAll(path.Dir(name))
	c.header(name, cpioModeFile|perm, uint32(st.Size()))
	if c.err != nil {
		return
	}
	n, err := io.Copy(c.w, f)
	if err == nil && n != st.Size() {
		err = fmt.Errorf("%s changed while being copied", src)
	}
	c.err = err
	if c.err == nil {
		_, c.err = io.WriteString(c.w, pad4(int(n)))
	}
}

// Symlink adds name pointing at target.
func (c *cpioWriter) Symlink(name, target string) {
	name = strings.TrimPrefix(path.Clean(name), "/")
	c.mkdirAll(path.Dir(name))
	c.header(name, cpioModeSymlink|0o777, uint32(len(target)))
	if c.err == nil {
		_, c.err = io.WriteString(c.w, target+pad4(len(target)))
	}
}

// Close writes the trailer and reports the first error.
func (c *cpioWriter) Close() error {
	c.header("TRAILER!!!", 0, 0)
	return c.err
}
