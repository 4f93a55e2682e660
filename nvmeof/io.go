package nvmeof

import (
	"context"
	"errors"
	"fmt"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// Namespace is what the host needs to build I/O commands for one
// namespace: its identity, LBA format and the controller's limits.
type Namespace struct {
	NSID       uint32
	Blocks     uint64 // NSZE
	BlockShift uint8  // log2 of the LBA data size in use
	NGUID      [16]byte
	EUI64      [8]byte
	UUID       [16]byte

	// MaxTransfer is the largest transfer of one command in bytes (MDTS
	// and the host's limit), a multiple of the block size.
	MaxTransfer int
	// MaxWriteZeroesBlocks is the most blocks one Write Zeroes may cover:
	// WZSL, or MDTS where WZSL is not reported (as the Linux host, which
	// is cautious there), and at most 65536 (NLB is 16 bits).
	MaxWriteZeroesBlocks uint32
	// MaxDeallocateBlocks is the most blocks one Dataset Management range
	// may cover (DMRSL, and DMSL), MaxDeallocateRanges the most ranges of
	// one command (DMRL, at most 256).
	MaxDeallocateBlocks uint32
	MaxDeallocateRanges int
	// dmsl is DMSL, the most blocks of all ranges of one command; 0: none.
	dmsl uint64
	// ONCS is the controller's Optional NVM Command Support.
	ONCS uint16
	// VolatileWriteCache is VWC.present: writes need Flush (or FUA) to be
	// durable.
	VolatileWriteCache bool
}

// setCommandLimits derives the Write Zeroes and Dataset Management limits
// from the controller's NVM command set limits (nvme_init_non_mdts_limits,
// nvme_config_discard). An operation whose limit is below one block is
// treated as unsupported.
func (ns *Namespace) setCommandLimits(c *Controller) {
	const maxNLB = 65536 // NLB is 16 bits, 0's based
	nvm := c.NVMLimits()
	wz := uint64(maxNLB)
	switch bytes, ok := pagesLimit(nvm.WZSL, nvme.CAPMPSMin(c.CAP())); {
	case nvm.WZSL != 0 && ok:
		wz = min(wz, bytes>>ns.BlockShift)
	case nvm.WZSL == 0 && c.id.MDTS != 0:
		// Bounded at connect; MaxTransfer may be lower (the host's limit).
		mdts, _ := pagesLimit(c.id.MDTS, nvme.CAPMPSMin(c.CAP()))
		wz = min(wz, mdts>>ns.BlockShift)
	}
	// A WZSL above 2^32 bytes limits nothing (as nvme_mps_to_sectors
	// saturates).
	ns.MaxWriteZeroesBlocks = uint32(wz)
	if wz == 0 {
		ns.ONCS &^= nvme.NVME_CTRL_ONCS_WRITE_ZEROES
	}

	dm := uint64(1<<32 - 1) // a range's NLB is 32 bits
	if nvm.DMRSL != 0 {
		dm = min(dm, uint64(nvm.DMRSL))
	}
	if nvm.DMSL != 0 {
		dm = min(dm, nvm.DMSL)
	}
	ns.MaxDeallocateBlocks = uint32(dm)
	ns.dmsl = nvm.DMSL
	ns.MaxDeallocateRanges = maxDSMRanges
	if nvm.DMRL != 0 {
		ns.MaxDeallocateRanges = min(int(nvm.DMRL), maxDSMRanges)
	}
}

// maxDSMRanges is NVME_DSM_MAX_RANGES: NR is 8 bits, 0's based.
const maxDSMRanges = 256

// BlockSize is the LBA data size in bytes.
func (ns *Namespace) BlockSize() int { return 1 << ns.BlockShift }

// SupportsWriteZeroes reports ONCS Write Zeroes.
func (ns *Namespace) SupportsWriteZeroes() bool { return ns.ONCS&nvme.NVME_CTRL_ONCS_WRITE_ZEROES != 0 }

// SupportsDeallocate reports ONCS Dataset Management.
func (ns *Namespace) SupportsDeallocate() bool { return ns.ONCS&nvme.NVME_CTRL_ONCS_DSM != 0 }

// Namespace identifies namespace nsid and returns what I/O needs.
func (c *Controller) Namespace(ctx context.Context, nsid uint32) (*Namespace, error) {
	id, err := c.IdentifyNamespace(ctx, nsid)
	if err != nil {
		return nil, err
	}
	if id.NSZE == 0 {
		return nil, fmt.Errorf("nvmeof: namespace %d: %w", nsid, ErrNamespaceNotActive)
	}
	shift, err := id.BlockShift()
	if err != nil {
		return nil, fmt.Errorf("nvmeof: namespace %d: %w", nsid, err)
	}
	ns := &Namespace{NSID: nsid, Blocks: id.NSZE, BlockShift: shift, NGUID: id.NGUID, EUI64: id.EUI64,
		ONCS: c.id.ONCS, VolatileWriteCache: c.id.VWC&nvme.NVME_CTRL_VWC_PRESENT != 0}
	// The size in bytes must fit a signed 64-bit offset (loff_t).
	if id.NSZE > (1<<63-1)>>shift {
		return nil, fmt.Errorf("nvmeof: namespace %d: NSZE %d blocks of %d bytes is beyond 2^63 bytes", nsid, id.NSZE, ns.BlockSize())
	}
	ns.MaxTransfer = c.MaxTransfer() &^ (ns.BlockSize() - 1)
	// NLB is 16 bits: at most 65536 blocks per command.
	ns.MaxTransfer = min(ns.MaxTransfer, 65536<<shift)
	if ns.MaxTransfer < ns.BlockSize() {
		return nil, fmt.Errorf("nvmeof: namespace %d: block size %d above the transfer limit", nsid, ns.BlockSize())
	}
	ns.setCommandLimits(c)
	ids, err := c.NamespaceIDs(ctx, nsid)
	var st nvme.Status
	switch {
	case err == nil:
		ns.UUID = ids.UUID
		if ids.NGUID != ([16]byte{}) {
			ns.NGUID = ids.NGUID
		}
		if ids.EUI64 != ([8]byte{}) {
			ns.EUI64 = ids.EUI64
		}
	case errors.As(err, &st):
		// Optional before NVMe 1.3: the identifiers from Identify
		// Namespace stand.
	default:
		return nil, err
	}
	return ns, nil
}

// ErrNamespaceNotActive: Identify Namespace returned zeroes (NSZE 0), as
// a controller does for an inactive NSID (NVMe Base Specification 2.1,
// 3.2.1.5).
var ErrNamespaceNotActive = errors.New("not active")

// ErrNotSupported is returned for a command the controller does not
// support (ONCS).
var ErrNotSupported = errors.New("nvmeof: command not supported by the controller")

// checkRange validates an LBA range of n bytes.
func (ns *Namespace) checkRange(lba uint64, n int) (nlb uint32, err error) {
	bs := ns.BlockSize()
	switch {
	case n <= 0 || n%bs != 0:
		return 0, fmt.Errorf("nvmeof: transfer of %d bytes is not a positive multiple of the %d byte block", n, bs)
	case n > ns.MaxTransfer:
		return 0, fmt.Errorf("nvmeof: transfer of %d bytes above the %d byte limit (MDTS)", n, ns.MaxTransfer)
	case lba >= ns.Blocks || uint64(n>>ns.BlockShift) > ns.Blocks-lba:
		return 0, fmt.Errorf("nvmeof: LBA range %d+%d beyond the namespace's %d blocks", lba, n>>ns.BlockShift, ns.Blocks)
	}
	return uint32(n >> ns.BlockShift), nil
}

func (ns *Namespace) rw(req *Request, op uint8, lba uint64, buf []byte, fua bool) error {
	if err := ns.rwCmd(req, op, lba, len(buf), fua); err != nil {
		return err
	}
	req.Data = buf
	return nil
}

// rwCmd fills req with a read or write of n bytes at lba, no data yet.
func (ns *Namespace) rwCmd(req *Request, op uint8, lba uint64, n int, fua bool) error {
	nlb, err := ns.checkRange(lba, n)
	if err != nil {
		return err
	}
	*req = Request{Write: op == nvme.NVME_CMD_WRITE, Timeout: req.Timeout}
	req.Cmd.SetOpcode(op)
	req.Cmd.SetNSID(ns.NSID)
	req.Cmd.SetCDW(10, uint32(lba))
	req.Cmd.SetCDW(11, uint32(lba>>32))
	cdw12 := nlb - 1
	if fua {
		cdw12 |= nvme.NVME_RW_FUA
	}
	req.Cmd.SetCDW(12, cdw12)
	return nil
}

// PrepareRead fills req to read len(buf) bytes at lba into buf.
func (ns *Namespace) PrepareRead(req *Request, lba uint64, buf []byte) error {
	return ns.rw(req, nvme.NVME_CMD_READ, lba, buf, false)
}

// PrepareWrite fills req to write buf at lba; fua forces it to media.
func (ns *Namespace) PrepareWrite(req *Request, lba uint64, buf []byte, fua bool) error {
	return ns.rw(req, nvme.NVME_CMD_WRITE, lba, buf, fua)
}

// PrepareReadFixed fills req to read data.Len() bytes at lba into data
// (zero copy, Request.Fixed).
func (ns *Namespace) PrepareReadFixed(req *Request, lba uint64, data FixedData) error {
	if err := ns.rwCmd(req, nvme.NVME_CMD_READ, lba, data.Len(), false); err != nil {
		return err
	}
	req.Fixed = data
	return nil
}

// PrepareWriteFixed fills req to write data at lba (zero copy,
// Request.Fixed); fua forces it to media.
func (ns *Namespace) PrepareWriteFixed(req *Request, lba uint64, data FixedData, fua bool) error {
	if err := ns.rwCmd(req, nvme.NVME_CMD_WRITE, lba, data.Len(), fua); err != nil {
		return err
	}
	req.Fixed = data
	return nil
}

// PrepareFlush fills req with a Flush of the namespace.
func (ns *Namespace) PrepareFlush(req *Request) {
	*req = Request{Timeout: req.Timeout}
	req.Cmd.SetOpcode(nvme.NVME_CMD_FLUSH)
	req.Cmd.SetNSID(ns.NSID)
}

// PrepareWriteZeroes fills req to zero blocks at lba; deallocate lets the
// controller deallocate them (DEAC).
func (ns *Namespace) PrepareWriteZeroes(req *Request, lba uint64, blocks uint32, deallocate bool) error {
	if !ns.SupportsWriteZeroes() {
		return fmt.Errorf("write zeroes: %w", ErrNotSupported)
	}
	if blocks == 0 || lba >= ns.Blocks || uint64(blocks) > ns.Blocks-lba {
		return fmt.Errorf("nvmeof: write zeroes of %d blocks at %d out of range", blocks, lba)
	}
	if blocks > ns.writeZeroesLimit() {
		return fmt.Errorf("nvmeof: write zeroes of %d blocks above the controller's limit of %d (WZSL, MDTS)", blocks, ns.writeZeroesLimit())
	}
	*req = Request{Timeout: req.Timeout}
	req.Cmd.SetOpcode(nvme.NVME_CMD_WRITE_ZEROES)
	req.Cmd.SetNSID(ns.NSID)
	req.Cmd.SetCDW(10, uint32(lba))
	req.Cmd.SetCDW(11, uint32(lba>>32))
	cdw12 := blocks - 1
	if deallocate {
		cdw12 |= nvme.NVME_WZ_DEAC
	}
	req.Cmd.SetCDW(12, cdw12)
	return nil
}

// PrepareDeallocate fills req with a Dataset Management deallocate of the
// ranges (at most 256).
func (ns *Namespace) PrepareDeallocate(req *Request, ranges []nvme.DSMRange) error {
	if !ns.SupportsDeallocate() {
		return fmt.Errorf("deallocate: %w", ErrNotSupported)
	}
	maxRanges, maxBlocks := ns.deallocateLimits()
	if len(ranges) == 0 || len(ranges) > maxRanges {
		return fmt.Errorf("nvmeof: %d DSM ranges, want 1..%d (DMRL)", len(ranges), maxRanges)
	}
	data := make([]byte, 0, len(ranges)*nvme.DSMRangeSize)
	var total uint64
	for _, r := range ranges {
		if r.NLB == 0 || r.SLBA >= ns.Blocks || uint64(r.NLB) > ns.Blocks-r.SLBA {
			return fmt.Errorf("nvmeof: deallocate range %d+%d out of range", r.SLBA, r.NLB)
		}
		if r.NLB > maxBlocks {
			return fmt.Errorf("nvmeof: deallocate range of %d blocks above the controller's limit of %d (DMRSL)", r.NLB, maxBlocks)
		}
		if total += uint64(r.NLB); ns.dmsl != 0 && total > ns.dmsl {
			return fmt.Errorf("nvmeof: deallocate of %d blocks above the controller's limit of %d (DMSL)", total, ns.dmsl)
		}
		data = nvme.AppendDSMRange(data, r)
	}
	*req = Request{Data: data, Write: true, Timeout: req.Timeout}
	req.Cmd.SetOpcode(nvme.NVME_CMD_DSM)
	req.Cmd.SetNSID(ns.NSID)
	req.Cmd.SetCDW(10, uint32(len(ranges)-1))
	req.Cmd.SetCDW(11, nvme.NVME_DSMGMT_AD)
	return nil
}

// writeZeroesLimit is MaxWriteZeroesBlocks, or 65536 for a Namespace
// built by hand without it.
func (ns *Namespace) writeZeroesLimit() uint32 {
	if ns.MaxWriteZeroesBlocks == 0 {
		return 65536
	}
	return ns.MaxWriteZeroesBlocks
}

// deallocateLimits are MaxDeallocateRanges and MaxDeallocateBlocks, with
// the protocol's limits for a Namespace built by hand without them.
func (ns *Namespace) deallocateLimits() (ranges int, blocks uint32) {
	ranges, blocks = ns.MaxDeallocateRanges, ns.MaxDeallocateBlocks
	if ranges == 0 {
		ranges = maxDSMRanges
	}
	if blocks == 0 {
		blocks = 1<<32 - 1
	}
	return ranges, blocks
}

// Synchronous wrappers. Each waits for the command's completion.

// Read reads len(buf) bytes at lba.
func (q *IOQueue) Read(ctx context.Context, ns *Namespace, lba uint64, buf []byte) error {
	var req Request
	if err := ns.PrepareRead(&req, lba, buf); err != nil {
		return err
	}
	return q.Do(ctx, &req)
}

// Write writes buf at lba.
func (q *IOQueue) Write(ctx context.Context, ns *Namespace, lba uint64, buf []byte, fua bool) error {
	var req Request
	if err := ns.PrepareWrite(&req, lba, buf, fua); err != nil {
		return err
	}
	return q.Do(ctx, &req)
}

// Flush flushes the namespace's volatile write cache.
func (q *IOQueue) Flush(ctx context.Context, ns *Namespace) error {
	var req Request
	ns.PrepareFlush(&req)
	return q.Do(ctx, &req)
}

// WriteZeroes zeroes blocks at lba.
func (q *IOQueue) WriteZeroes(ctx context.Context, ns *Namespace, lba uint64, blocks uint32, deallocate bool) error {
	var req Request
	if err := ns.PrepareWriteZeroes(&req, lba, blocks, deallocate); err != nil {
		return err
	}
	return q.Do(ctx, &req)
}

// Deallocate deallocates the ranges (discard).
func (q *IOQueue) Deallocate(ctx context.Context, ns *Namespace, ranges []nvme.DSMRange) error {
	var req Request
	if err := ns.PrepareDeallocate(&req, ranges); err != nil {
		return err
	}
	return q.Do(ctx, &req)
}
