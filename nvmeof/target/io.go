package target

import (
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// executeIO runs an NVM command set command (nvmet io-cmd-bdev/file).
func (c *conn) executeIO(cmd *command) (nvme.Status, uint64, []byte) {
	ctrl := c.ctrl
	if ctrl == nil || ctrl.subsys == nil {
		return nvme.NVME_SC_CMD_SEQ_ERROR | nvme.NVME_STATUS_DNR, 0, nil
	}
	if c.t.cfg.TBKAS {
		ctrl.touch()
	}
	ctrl.mu.Lock()
	ready := ctrl.cc&nvme.NVME_CC_ENABLE != 0 && ctrl.csts&nvme.NVME_CSTS_RDY != 0
	ctrl.mu.Unlock()
	if !ready {
		return nvme.NVME_SC_CMD_SEQ_ERROR | nvme.NVME_STATUS_DNR, 0, nil
	}
	op := cmd.cmd.Opcode()
	nsid := cmd.cmd.NSID()
	c.t.mu.Lock()
	ns := ctrl.subsys.namespaces[nsid]
	var all []*Namespace
	if op == nvme.NVME_CMD_FLUSH && nsid == nvme.NVME_NSID_ALL {
		for _, n := range ctrl.subsys.namespaces {
			all = append(all, n)
		}
	}
	c.t.mu.Unlock()
	if op == nvme.NVME_CMD_FLUSH && nsid == nvme.NVME_NSID_ALL {
		for _, n := range all {
			if n.cfg.Backend.Flush() != nil {
				return nvme.NVME_SC_WRITE_FAULT, 0, nil
			}
		}
		return 0, 0, nil
	}
	if ns == nil {
		return nvme.NVME_SC_INVALID_NS | nvme.NVME_STATUS_DNR, 0, nil
	}
	shift := ns.cfg.BlockShift
	be := ns.cfg.Backend
	_, sglLen, _ := cmd.cmd.SGL()

	// rangeOK checks an LBA range and returns its byte offset and length.
	rangeOK := func(slba, nlb uint64) (int64, int64, nvme.Status) {
		if slba >= ns.blocks || nlb > ns.blocks-slba {
			return 0, 0, nvme.NVME_SC_LBA_RANGE | nvme.NVME_STATUS_DNR
		}
		return int64(slba << shift), int64(nlb << shift), 0
	}
	slba := uint64(cmd.cmd.CDW(10)) | uint64(cmd.cmd.CDW(11))<<32
	nlb := uint64(cmd.cmd.CDW(12)&0xffff) + 1

	switch op {
	case nvme.NVME_CMD_READ, nvme.NVME_CMD_WRITE:
		off, n, st := rangeOK(slba, nlb)
		if st != 0 {
			return st, 0, nil
		}
		if int64(sglLen) != n || n > c.t.maxTransfer() {
			return nvme.NVME_SC_SGL_INVALID_DATA | nvme.NVME_STATUS_DNR, 0, nil
		}
		if op == nvme.NVME_CMD_READ {
			buf := make([]byte, n)
			if _, err := be.ReadAt(buf, off); err != nil {
				return nvme.NVME_SC_READ_ERROR, 0, nil
			}
			return 0, 0, buf
		}
		if len(cmd.data) != int(n) {
			return nvme.NVME_SC_SGL_INVALID_DATA | nvme.NVME_STATUS_DNR, 0, nil
		}
		if _, err := be.WriteAt(cmd.data, off); err != nil {
			return nvme.NVME_SC_WRITE_FAULT, 0, nil
		}
		if cmd.cmd.CDW(12)&nvme.NVME_RW_FUA != 0 && be.Flush() != nil {
			return nvme.NVME_SC_WRITE_FAULT, 0, nil
		}
		return 0, 0, nil

	case nvme.NVME_CMD_FLUSH:
		if be.Flush() != nil {
			return nvme.NVME_SC_WRITE_FAULT, 0, nil
		}
		return 0, 0, nil

	case nvme.NVME_CMD_WRITE_ZEROES:
		off, n, st := rangeOK(slba, nlb)
		if st != 0 {
			return st, 0, nil
		}
		if writeZeroes(be, off, n) != nil {
			return nvme.NVME_SC_WRITE_FAULT, 0, nil
		}
		return 0, 0, nil

	case nvme.NVME_CMD_DSM:
		nr := int(cmd.cmd.CDW(10)&0xff) + 1
		ranges, err := nvme.ParseDSMRanges(cmd.data, nr)
		if err != nil || int(sglLen) != nr*nvme.DSMRangeSize {
			return nvme.NVME_SC_SGL_INVALID_DATA | nvme.NVME_STATUS_DNR, 0, nil
		}
		if cmd.cmd.CDW(11)&nvme.NVME_DSMGMT_AD == 0 {
			return 0, 0, nil // only hints
		}
		for _, r := range ranges {
			off, n, st := rangeOK(r.SLBA, uint64(r.NLB))
			if st != 0 {
				return st, 0, nil
			}
			// Deallocated blocks read as zeroes (DLFEAT).
			if writeZeroes(be, off, n) != nil {
				return nvme.NVME_SC_WRITE_FAULT, 0, nil
			}
		}
		return 0, 0, nil
	}
	return nvme.NVME_SC_INVALID_OPCODE | nvme.NVME_STATUS_DNR, 0, nil
}

func writeZeroes(be Backend, off, n int64) error {
	zero := make([]byte, min(n, 1<<20))
	for n > 0 {
		k := min(n, int64(len(zero)))
		if _, err := be.WriteAt(zero[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}
