package pdu

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

// Fuzzing record (go test -run '^$' -fuzz FuzzReader -fuzztime ... -parallel 1):
// see FUZZING.md in this directory.

// FuzzReader feeds arbitrary bytes to the stream decoder in both directions,
// with and without digests. It must never panic, never read past what a
// checked header announced, and every accepted header must re-encode to a
// header the decoder accepts again.
func FuzzReader(f *testing.F) {
	for _, tc := range goldenCases() {
		h := tc.h
		f.Add(Append(nil, &h, tc.data, tc.o), uint8(0))
		f.Add(Append(nil, &h, tc.data, tc.o), uint8(3))
	}
	f.Fuzz(func(t *testing.T, b []byte, mode uint8) {
		o := Options{HeaderDigest: mode&1 != 0, DataDigest: mode&2 != 0}
		const maxData = 8192
		for _, dir := range []Direction{HostToController, ControllerToHost} {
			src := bytes.NewReader(b)
			r := NewReader(src, dir, maxData)
			r.Options = o
			for {
				before := src.Len()
				var h Header
				err := r.ReadHeader(&h)
				if err != nil {
					var pe *ProtocolError
					if !errors.As(err, &pe) && err != io.EOF && err != io.ErrUnexpectedEOF {
						t.Fatalf("unexpected error type %T: %v", err, err)
					}
					break
				}
				if h.DataLen < 0 || h.DataLen > maxData || h.DataLen > int(h.PLen) {
					t.Fatalf("accepted data length %d (plen %d)", h.DataLen, h.PLen)
				}
				if h.Type.Direction() != dir {
					t.Fatalf("accepted %v in direction %v", h.Type, dir)
				}
				data := make([]byte, h.DataLen)
				err = r.ReadData(data)
				if h.DataLen > 0 && err != nil {
					break
				}
				if consumed := before - src.Len(); consumed != int(h.PLen) {
					t.Fatalf("consumed %d bytes of a PDU with plen %d", consumed, h.PLen)
				}
				// Re-encode and decode again: the same header fields.
				h2 := h
				h2.Flags &= NVME_TCP_F_DATA_LAST | NVME_TCP_F_DATA_SUCCESS
				enc := Append(nil, &h2, data, o)
				r2 := NewReader(bytes.NewReader(enc), dir, maxData)
				r2.Options = o
				var h3 Header
				if err := r2.ReadHeader(&h3); err != nil {
					t.Fatalf("re-encoded %v does not decode: %v", h.Type, err)
				}
				if h3.Type != h.Type || h3.Cmd != h.Cmd || h3.Resp != h.Resp || h3.Data != h.Data || h3.R2T != h.R2T || h3.DataLen != h.DataLen {
					t.Fatalf("round trip changed the header:\n%+v\n%+v", h, h3)
				}
			}
		}
	})
}

// FuzzCommonHeaderCheck checks the bounds Check promises for any header.
func FuzzCommonHeaderCheck(f *testing.F) {
	f.Add([]byte{7, 0x0c, 24, 24, 28, 0, 0, 0}, uint8(0), uint32(4096))
	f.Add([]byte{4, 3, 72, 76, 0, 1, 0, 0}, uint8(3), uint32(8192))
	f.Fuzz(func(t *testing.T, b []byte, mode uint8, maxData uint32) {
		if len(b) < CommonHeaderSize {
			return
		}
		o := Options{HeaderDigest: mode&1 != 0, DataDigest: mode&2 != 0}
		ch := ParseCommonHeader(b)
		for _, dir := range []Direction{HostToController, ControllerToHost} {
			n, err := ch.Check(dir, o, maxData)
			if err != nil {
				continue
			}
			if n < 0 || uint64(n) > uint64(maxData) && ch.Type.hasDigests() || int64(n) > int64(ch.PLen) {
				t.Fatalf("Check(%+v) accepted %d data bytes", ch, n)
			}
			if int(ch.HLen) != ch.Type.HeaderLength() {
				t.Fatalf("Check accepted hlen %d for %v", ch.HLen, ch.Type)
			}
		}
	})
}
