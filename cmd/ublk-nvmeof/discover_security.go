package main

import (
	"fmt"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// Discovery log entry security fields, printed as nvme-cli's discover does
// (NVMe over Fabrics 1.1, Discovery Log Page Entry: TREQ; NVMe/TCP
// Transport Specification, TSAS SECTYPE).

// treqString names TREQ: bits 1:0 whether a secure channel (TLS) is
// required, bit 2 whether SQ flow control may be disabled.
func treqString(treq uint8) string {
	var s string
	switch treq & 3 {
	case 0:
		s = "not specified"
	case 1:
		s = "required"
	case 2:
		s = "not required"
	default:
		s = "reserved (3)"
	}
	if treq&4 != 0 {
		s += ", sq flow control disable supported"
	}
	return s
}

// sectypeString names the NVMe/TCP security type (TLS version).
func sectypeString(trtype, sectype uint8) string {
	if trtype != nvme.NVMF_TRTYPE_TCP {
		return fmt.Sprint(sectype)
	}
	switch sectype {
	case 0:
		return "none"
	case 1:
		return "tls1.2"
	case 2:
		return "tls1.3"
	}
	return fmt.Sprintf("reserved (%d)", sectype)
}
