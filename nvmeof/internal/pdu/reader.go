package pdu

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Reader decodes a stream of PDUs from one direction of a connection. It
// reads exactly the bytes each checked header announces, never more, so the
// caller may hand it an unbuffered connection or a bufio.Reader.
//
// Use: ReadHeader, then, if the header's DataLen is not zero, exactly one of
// ReadData or DiscardData before the next ReadHeader.
type Reader struct {
	r   io.Reader
	dir Direction

	// Options are the negotiated digests; zero until the IC exchange.
	// The receiver's PDA is not enforced: a sender may align more.
	Options Options
	// MaxData bounds the data of one PDU; larger PDUs are refused before
	// their data is read.
	MaxData uint32

	buf      [MaxHeaderSize + NVME_TCP_DIGEST_LENGTH]byte
	pad      int // bytes between header digest and data
	dataLen  int // data bytes of the current PDU not yet consumed
	dataDgst bool
	inData   bool
}

// NewReader returns a Reader of PDUs travelling in direction dir.
func NewReader(r io.Reader, dir Direction, maxData uint32) *Reader {
	return &Reader{r: r, dir: dir, MaxData: maxData}
}

// ErrDataDigest is returned (wrapped) by ReadData when a data digest does
// not match. The whole PDU has been consumed then: unlike after a header
// digest error the PDU boundaries are still known, so a host may fail the
// one command and read on (as Linux's nvme_tcp_recv_ddgst does).
var ErrDataDigest = errors.New("nvme-tcp: data digest mismatch")

// ReadHeader reads and checks the next PDU header into h.
func (r *Reader) ReadHeader(h *Header) error {
	if r.inData {
		return errors.New("pdu: ReadHeader before the previous PDU's data was consumed")
	}
	ch := r.buf[:CommonHeaderSize]
	if _, err := io.ReadFull(r.r, ch); err != nil {
		return err
	}
	c := ParseCommonHeader(ch)
	dataLen, err := c.Check(r.dir, r.Options, r.MaxData)
	if err != nil {
		return err
	}
	hlen := int(c.HLen)
	hdgst := 0
	if c.Flags&NVME_TCP_F_HDGST != 0 {
		hdgst = NVME_TCP_DIGEST_LENGTH
	}
	if _, err := io.ReadFull(r.r, r.buf[CommonHeaderSize:hlen+hdgst]); err != nil {
		return unexpected(err)
	}
	if hdgst > 0 {
		want := binary.LittleEndian.Uint32(r.buf[hlen:])
		if got := Digest(r.buf[:hlen]); got != want {
			return &ProtocolError{FES: NVME_TCP_FES_HDR_DIGEST_ERR, Msg: fmt.Sprintf("%v header digest %#08x, computed %#08x", c.Type, want, got)}
		}
	}
	*h = Header{CommonHeader: c, DataLen: dataLen}
	if err := h.parsePSH(r.buf[CommonHeaderSize:hlen]); err != nil {
		return err
	}
	r.pad = 0
	if dataLen > 0 && c.Type.hasDigests() {
		r.pad = int(c.PDO) - hlen - hdgst
	}
	r.dataLen = dataLen
	r.dataDgst = dataLen > 0 && c.Flags&NVME_TCP_F_DDGST != 0
	r.inData = dataLen > 0
	return nil
}

func unexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// ReadData reads the current PDU's data into dst, which must be exactly
// DataLen bytes, and checks the data digest.
func (r *Reader) ReadData(dst []byte) error {
	if !r.inData || len(dst) != r.dataLen {
		return fmt.Errorf("pdu: ReadData of %d bytes, the PDU carries %d", len(dst), r.dataLen)
	}
	r.inData = false
	if err := r.skip(r.pad); err != nil {
		return err
	}
	if _, err := io.ReadFull(r.r, dst); err != nil {
		return unexpected(err)
	}
	if !r.dataDgst {
		return nil
	}
	// The header is parsed: its buffer holds the digest (an array
	// passed to the io.Reader would escape, an allocation per PDU).
	d := r.buf[:NVME_TCP_DIGEST_LENGTH]
	if _, err := io.ReadFull(r.r, d); err != nil {
		return unexpected(err)
	}
	if want, got := binary.LittleEndian.Uint32(d), Digest(dst); want != got {
		return fmt.Errorf("%w: received %#08x, computed %#08x", ErrDataDigest, want, got)
	}
	return nil
}

// TakeData consumes the current PDU's padding and leaves its data to the
// caller, who takes exactly the header's DataLen bytes out of the
// underlying stream itself, or has already put them where they belong
// (a driven queue's zero-copy command: pages this process cannot
// address). Not with data digests: the caller could not check them.
func (r *Reader) TakeData() error {
	if !r.inData {
		return errors.New("pdu: TakeData with no data pending")
	}
	if r.dataDgst {
		return errors.New("pdu: TakeData with data digests")
	}
	r.inData = false
	return r.skip(r.pad)
}

// Reset forgets the current PDU: the next call must be ReadHeader. For a
// Reader used to look at headers only, whose data the caller takes out of
// the stream some other way.
func (r *Reader) Reset() { r.inData = false }

// DiscardData skips the current PDU's data, still checking its digest.
func (r *Reader) DiscardData() error {
	if !r.inData {
		return nil
	}
	var scratch [4096]byte
	if r.dataLen <= len(scratch) {
		return r.ReadData(scratch[:r.dataLen])
	}
	// Large: skip without checking the digest; the caller is about to
	// fail the connection anyway.
	r.inData = false
	n := r.pad + r.dataLen
	if r.dataDgst {
		n += NVME_TCP_DIGEST_LENGTH
	}
	return r.skip(n)
}

func (r *Reader) skip(n int) error {
	if n <= 0 {
		return nil
	}
	_, err := io.CopyN(io.Discard, r.r, int64(n))
	return unexpected(err)
}
