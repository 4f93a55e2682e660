package nvme

import "fmt"

// Status is a completion status as the Linux host keeps it: the 15-bit
// status field of the CQE shifted right by one (no phase tag). Bits 7:0 are
// the Status Code (SC), 10:8 the Status Code Type (SCT), 12:11 the Command
// Retry Delay, 13 More, 14 Do Not Retry (NVMe Base Specification 2.0,
// Figure 92; include/linux/nvme.h NVME_SC_*, NVME_SCT_*).
//
// A non-zero Status is an error; use errors.As to get it back from a
// returned error, and its methods to decide whether to retry.
type Status uint16

// Status Code Types (include/linux/nvme.h NVME_SCT_*, shifted to bits 10:8).
const (
	NVME_SCT_GENERIC      = 0x0 << 8
	NVME_SCT_CMD_SPECIFIC = 0x1 << 8
	NVME_SCT_MEDIA_ERROR  = 0x2 << 8
	NVME_SCT_PATH         = 0x3 << 8
	NVME_SCT_VS           = 0x7 << 8
	NVME_SCT_MASK         = 0x7 << 8
	NVME_SC_MASK          = 0xff
	NVME_STATUS_CRD       = 0x3 << 11
	NVME_STATUS_MORE      = 1 << 13
	NVME_STATUS_DNR       = 1 << 14
)

// Status values (SCT | SC) the host and the in-process target use.
const (
	NVME_SC_SUCCESS              Status = 0x0
	NVME_SC_INVALID_OPCODE       Status = 0x1
	NVME_SC_INVALID_FIELD        Status = 0x2
	NVME_SC_CMDID_CONFLICT       Status = 0x3
	NVME_SC_DATA_XFER_ERROR      Status = 0x4
	NVME_SC_POWER_LOSS           Status = 0x5
	NVME_SC_INTERNAL             Status = 0x6
	NVME_SC_ABORT_REQ            Status = 0x7
	NVME_SC_ABORT_QUEUE          Status = 0x8
	NVME_SC_INVALID_NS           Status = 0xb
	NVME_SC_CMD_SEQ_ERROR        Status = 0xc
	NVME_SC_SGL_INVALID_LAST     Status = 0xd
	NVME_SC_SGL_INVALID_COUNT    Status = 0xe
	NVME_SC_SGL_INVALID_DATA     Status = 0xf
	NVME_SC_SGL_INVALID_TYPE     Status = 0x11
	NVME_SC_SGL_INVALID_OFFSET   Status = 0x16
	NVME_SC_NS_NOT_READY         Status = 0x82
	NVME_SC_LBA_RANGE            Status = 0x80
	NVME_SC_CAP_EXCEEDED         Status = 0x81
	NVME_SC_RESERVATION_CONFLICT Status = 0x83

	NVME_SC_CQ_INVALID             Status = NVME_SCT_CMD_SPECIFIC | 0x00
	NVME_SC_QID_INVALID            Status = NVME_SCT_CMD_SPECIFIC | 0x01
	NVME_SC_QUEUE_SIZE             Status = NVME_SCT_CMD_SPECIFIC | 0x02
	NVME_SC_ASYNC_LIMIT            Status = NVME_SCT_CMD_SPECIFIC | 0x05
	NVME_SC_INVALID_LOG_PAGE       Status = NVME_SCT_CMD_SPECIFIC | 0x09
	NVME_SC_FEATURE_NOT_CHANGEABLE Status = NVME_SCT_CMD_SPECIFIC | 0x0e
	NVME_SC_CONNECT_FORMAT         Status = NVME_SCT_CMD_SPECIFIC | 0x80
	NVME_SC_CONNECT_CTRL_BUSY      Status = NVME_SCT_CMD_SPECIFIC | 0x81
	NVME_SC_CONNECT_INVALID_PARAM  Status = NVME_SCT_CMD_SPECIFIC | 0x82
	NVME_SC_CONNECT_RESTART_DISC   Status = NVME_SCT_CMD_SPECIFIC | 0x83
	NVME_SC_CONNECT_INVALID_HOST   Status = NVME_SCT_CMD_SPECIFIC | 0x84
	NVME_SC_DISCOVERY_RESTART      Status = NVME_SCT_CMD_SPECIFIC | 0x90
	NVME_SC_AUTH_REQUIRED          Status = NVME_SCT_CMD_SPECIFIC | 0x91

	NVME_SC_WRITE_FAULT     Status = NVME_SCT_MEDIA_ERROR | 0x80
	NVME_SC_READ_ERROR      Status = NVME_SCT_MEDIA_ERROR | 0x81
	NVME_SC_GUARD_CHECK     Status = NVME_SCT_MEDIA_ERROR | 0x82
	NVME_SC_APPTAG_CHECK    Status = NVME_SCT_MEDIA_ERROR | 0x83
	NVME_SC_REFTAG_CHECK    Status = NVME_SCT_MEDIA_ERROR | 0x84
	NVME_SC_COMPARE_FAILED  Status = NVME_SCT_MEDIA_ERROR | 0x85
	NVME_SC_ACCESS_DENIED   Status = NVME_SCT_MEDIA_ERROR | 0x86
	NVME_SC_UNWRITTEN_BLOCK Status = NVME_SCT_MEDIA_ERROR | 0x87

	// Path Related Status (NVMe Base Specification 2.0, Figure "Status
	// Code – Path Related Status Values"): the command failed on this
	// path; unless DNR is set it may succeed if retried. 0x70 and 0x71
	// are never sent by a controller: a host sets them itself (the Linux
	// host's nvme_host_path_error, and a command it aborted).
	NVME_SC_INTERNAL_PATH_ERROR Status = NVME_SCT_PATH | 0x00
	NVME_SC_ANA_PERSISTENT_LOSS Status = NVME_SCT_PATH | 0x01
	NVME_SC_ANA_INACCESSIBLE    Status = NVME_SCT_PATH | 0x02
	NVME_SC_ANA_TRANSITION      Status = NVME_SCT_PATH | 0x03
	NVME_SC_CTRL_PATH_ERROR     Status = NVME_SCT_PATH | 0x60
	NVME_SC_HOST_PATH_ERROR     Status = NVME_SCT_PATH | 0x70
	NVME_SC_HOST_ABORTED_CMD    Status = NVME_SCT_PATH | 0x71
)

var statusNames = map[Status]string{
	NVME_SC_SUCCESS:                "Success",
	NVME_SC_INVALID_OPCODE:         "Invalid Command Opcode",
	NVME_SC_INVALID_FIELD:          "Invalid Field in Command",
	NVME_SC_CMDID_CONFLICT:         "Command ID Conflict",
	NVME_SC_DATA_XFER_ERROR:        "Data Transfer Error",
	NVME_SC_POWER_LOSS:             "Commands Aborted due to Power Loss Notification",
	NVME_SC_INTERNAL:               "Internal Error",
	NVME_SC_ABORT_REQ:              "Command Abort Requested",
	NVME_SC_ABORT_QUEUE:            "Command Aborted due to SQ Deletion",
	NVME_SC_INVALID_NS:             "Invalid Namespace or Format",
	NVME_SC_CMD_SEQ_ERROR:          "Command Sequence Error",
	NVME_SC_SGL_INVALID_LAST:       "Invalid SGL Segment Descriptor",
	NVME_SC_SGL_INVALID_COUNT:      "Invalid Number of SGL Descriptors",
	NVME_SC_SGL_INVALID_DATA:       "Data SGL Length Invalid",
	NVME_SC_SGL_INVALID_TYPE:       "SGL Descriptor Type Invalid",
	NVME_SC_SGL_INVALID_OFFSET:     "SGL Offset Invalid",
	NVME_SC_LBA_RANGE:              "LBA Out of Range",
	NVME_SC_CAP_EXCEEDED:           "Capacity Exceeded",
	NVME_SC_NS_NOT_READY:           "Namespace Not Ready",
	NVME_SC_RESERVATION_CONFLICT:   "Reservation Conflict",
	NVME_SC_CQ_INVALID:             "Completion Queue Invalid",
	NVME_SC_QID_INVALID:            "Invalid Queue Identifier",
	NVME_SC_QUEUE_SIZE:             "Invalid Queue Size",
	NVME_SC_ASYNC_LIMIT:            "Asynchronous Event Request Limit Exceeded",
	NVME_SC_INVALID_LOG_PAGE:       "Invalid Log Page",
	NVME_SC_FEATURE_NOT_CHANGEABLE: "Feature Not Changeable",
	NVME_SC_CONNECT_FORMAT:         "Connect Incompatible Format",
	NVME_SC_CONNECT_CTRL_BUSY:      "Connect Controller Busy",
	NVME_SC_CONNECT_INVALID_PARAM:  "Connect Invalid Parameters",
	NVME_SC_CONNECT_RESTART_DISC:   "Connect Restart Discovery",
	NVME_SC_CONNECT_INVALID_HOST:   "Connect Invalid Host",
	NVME_SC_DISCOVERY_RESTART:      "Discovery Restart",
	NVME_SC_AUTH_REQUIRED:          "Authentication Required",
	NVME_SC_WRITE_FAULT:            "Write Fault",
	NVME_SC_READ_ERROR:             "Unrecovered Read Error",
	NVME_SC_GUARD_CHECK:            "End-to-end Guard Check Error",
	NVME_SC_APPTAG_CHECK:           "End-to-end Application Tag Check Error",
	NVME_SC_REFTAG_CHECK:           "End-to-end Reference Tag Check Error",
	NVME_SC_COMPARE_FAILED:         "Compare Failure",
	NVME_SC_ACCESS_DENIED:          "Access Denied",
	NVME_SC_UNWRITTEN_BLOCK:        "Deallocated or Unwritten Logical Block",
	NVME_SC_INTERNAL_PATH_ERROR:    "Internal Path Error",
	NVME_SC_ANA_PERSISTENT_LOSS:    "Asymmetric Access Persistent Loss",
	NVME_SC_ANA_INACCESSIBLE:       "Asymmetric Access Inaccessible",
	NVME_SC_ANA_TRANSITION:         "Asymmetric Access Transition",
	NVME_SC_CTRL_PATH_ERROR:        "Controller Pathing Error",
	NVME_SC_HOST_PATH_ERROR:        "Host Pathing Error",
	NVME_SC_HOST_ABORTED_CMD:       "Command Aborted By Host",
}

// Code returns SCT and SC without the DNR, More and CRD bits, the value to
// compare with the NVME_SC_* constants.
func (s Status) Code() Status { return s & (NVME_SCT_MASK | NVME_SC_MASK) }

// SCT is the Status Code Type (0 generic, 1 command specific, 2 media and
// data integrity, 3 path related, 7 vendor specific).
func (s Status) SCT() uint8 { return uint8((s & NVME_SCT_MASK) >> 8) }

// SC is the Status Code within its type.
func (s Status) SC() uint8 { return uint8(s & NVME_SC_MASK) }

// DNR reports the Do Not Retry bit: the same command will fail again.
func (s Status) DNR() bool { return s&NVME_STATUS_DNR != 0 }

// More reports that more status information is in the Error log page.
func (s Status) More() bool { return s&NVME_STATUS_MORE != 0 }

// CRD is the Command Retry Delay index (0: retry at once).
func (s Status) CRD() uint8 { return uint8((s & NVME_STATUS_CRD) >> 11) }

// Name is the specification's name for the status code, or "" if unknown.
func (s Status) Name() string { return statusNames[s.Code()] }

// Is lets errors.Is(err, nvme.NVME_SC_INVALID_NS) match a status whatever
// its DNR, More and CRD bits.
func (s Status) Is(target error) bool {
	t, ok := target.(Status)
	return ok && t.Code() == s.Code()
}

func (s Status) Error() string {
	name := s.Name()
	if name == "" {
		name = "Unknown Status"
	}
	str := fmt.Sprintf("nvme status %s (sct %#x sc %#x)", name, s.SCT(), s.SC())
	if s.DNR() {
		str += " dnr"
	}
	if s.More() {
		str += " more"
	}
	return str
}

// Err returns nil for success and the Status as an error otherwise.
func (s Status) Err() error {
	if s.Code() == NVME_SC_SUCCESS {
		return nil
	}
	return s
}

// DoNotRetry reports the DNR bit; lifecycle stops reconnecting after a
// Connect that failed with it.
func (s Status) DoNotRetry() bool { return s.DNR() }

// PathRelated reports a Path Related Status (SCT 3, nvme_is_path_error):
// the command failed on this path, e.g. nvmet's Internal Path Error for a
// disabled namespace. Unless DNR is set it may succeed later or elsewhere;
// lifecycle.Controller.Do retries such a command (PathRelated and not DNR)
// on the same association, up to its MaxRetries, then on the next one
// after a recovery, as a failure of the path.
func (s Status) PathRelated() bool { return s&NVME_SCT_MASK == NVME_SCT_PATH }
