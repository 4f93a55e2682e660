package guest

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// Namespace helpers for nvmet (drivers/nvme/target/configfs.c): a namespace
// on a file whose size changes, and a namespace whose identity changes.

// setNamespaceAttrs writes the optional attributes of tg.Opts; the
// namespace must be disabled.
func (tg *Target) setNamespaceAttrs() error {
	attrs := []struct{ name, value string }{
		{"device_uuid", tg.Opts.UUID}, {"device_nguid", tg.Opts.NGUID},
	}
	if tg.Opts.BufferedIO {
		attrs = append(attrs, struct{ name, value string }{"buffered_io", "1"})
	}
	for _, a := range attrs {
		if a.value == "" {
			continue
		}
		if err := write(filepath.Join(tg.ns(), a.name), a.value); err != nil {
			return err
		}
	}
	return nil
}

// CreateFile creates (or truncates) a namespace backing file of size bytes,
// all zeroes.
func CreateFile(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	return errors.Join(f.Truncate(size), f.Close())
}

// ResizeFile changes the size of the namespace's backing file (a file
// namespace: Opts.Device is a regular file) and makes nvmet see it
// (RevalidateSize). What a shrink cuts off is gone; a grow adds zeroes.
func (tg *Target) ResizeFile(size int64) error {
	if err := os.Truncate(tg.Opts.Device, size); err != nil {
		return fmt.Errorf("nvmet: resize %s: %w", tg.Opts.Device, err)
	}
	return tg.RevalidateSize()
}

// RevalidateSize makes nvmet read the namespace's size again from its
// device or file (the namespace's revalidate_size attribute,
// nvmet_ns_revalidate); when it changed, every controller gets a Namespace
// Attribute Changed event.
func (tg *Target) RevalidateSize() error {
	return write(filepath.Join(tg.ns(), "revalidate_size"), "1")
}

// ReplaceNamespaceIdentity gives the namespace another identity, as a
// namespace replaced behind the same NSID: it is disabled, gets the new
// UUID and NGUID, and is enabled again (each step sends controllers a
// Namespace Attribute Changed event).
func (tg *Target) ReplaceNamespaceIdentity(uuid, nguid string) error {
	if err := tg.SetNamespaceEnabled(false); err != nil {
		return err
	}
	tg.Opts.UUID, tg.Opts.NGUID = uuid, nguid
	if err := tg.setNamespaceAttrs(); err != nil {
		return err
	}
	return tg.SetNamespaceEnabled(true)
}
