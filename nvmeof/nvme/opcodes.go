package nvme

// Admin command opcodes (include/linux/nvme.h enum nvme_admin_opcode).
const (
	NVME_ADMIN_GET_LOG_PAGE = 0x02
	NVME_ADMIN_IDENTIFY     = 0x06
	NVME_ADMIN_ABORT_CMD    = 0x08
	NVME_ADMIN_SET_FEATURES = 0x09
	NVME_ADMIN_GET_FEATURES = 0x0a
	NVME_ADMIN_ASYNC_EVENT  = 0x0c
	NVME_ADMIN_KEEP_ALIVE   = 0x18
)

// NVM command set opcodes (enum nvme_opcode).
const (
	NVME_CMD_FLUSH        = 0x00
	NVME_CMD_WRITE        = 0x01
	NVME_CMD_READ         = 0x02
	NVME_CMD_WRITE_ZEROES = 0x08
	NVME_CMD_DSM          = 0x09
)

// Fabrics command opcode and types (enum nvmf_fabrics_opcode,
// enum nvmf_capsule_command).
const (
	NVME_FABRICS_COMMAND           = 0x7f
	NVME_FABRICS_TYPE_PROPERTY_SET = 0x00
	NVME_FABRICS_TYPE_CONNECT      = 0x01
	NVME_FABRICS_TYPE_PROPERTY_GET = 0x04
	NVME_FABRICS_TYPE_DISCONNECT   = 0x08
)

// Identify CNS values (enum nvme_id_cns).
const (
	NVME_ID_CNS_NS             = 0x00
	NVME_ID_CNS_CTRL           = 0x01
	NVME_ID_CNS_NS_ACTIVE_LIST = 0x02
	NVME_ID_CNS_NS_DESC_LIST   = 0x03
	NVME_ID_CNS_CS_CTRL        = 0x06
)

// NVME_CSI_NVM is the NVM Command Set Identifier (Identify CDW11 bits
// 31:24).
const NVME_CSI_NVM = 0

// Feature identifiers (NVME_FEAT_*).
const (
	NVME_FEAT_NUM_QUEUES    = 0x07
	NVME_FEAT_ASYNC_EVENT   = 0x0b
	NVME_FEAT_KATO          = 0x0f
	NVME_FEAT_HOST_BEHAVIOR = 0x16
)

// Log page identifiers (NVME_LOG_*).
const (
	NVME_LOG_ERROR      = 0x01
	NVME_LOG_CHANGED_NS = 0x04
	NVME_LOG_DISC       = 0x70
)

// Asynchronous event completion dword 0 (NVMe Base 2.0, Figure 151):
// type in bits 2:0, information in 15:8, log page in 23:16.
const (
	NVME_AER_TYPE_ERROR  = 0
	NVME_AER_TYPE_SMART  = 1
	NVME_AER_TYPE_NOTICE = 2

	NVME_AER_NOTICE_NS_CHANGED      = 0x00
	NVME_AER_NOTICE_FW_ACT_STARTING = 0x01
	NVME_AER_NOTICE_ANA             = 0x03
	NVME_AER_NOTICE_DISC_CHANGED    = 0xf0
)

// Asynchronous Event Configuration bits (cdw11 of Set Features 0x0b).
const (
	NVME_AEN_CFG_NS_ATTR     = 1 << 8
	NVME_AEN_CFG_DISC_CHANGE = 1 << 31
)

// Controller properties (struct nvme_bar offsets, enum NVME_REG_*).
const (
	NVME_REG_CAP  = 0x00
	NVME_REG_VS   = 0x08
	NVME_REG_CC   = 0x14
	NVME_REG_CSTS = 0x1c
)

// Controller Configuration bits (NVME_CC_*).
const (
	NVME_CC_ENABLE     = 1 << 0
	NVME_CC_CSS_NVM    = 0 << 4
	NVME_CC_MPS_SHIFT  = 7
	NVME_CC_AMS_RR     = 0 << 11
	NVME_CC_SHN_NONE   = 0 << 14
	NVME_CC_SHN_NORMAL = 1 << 14
	NVME_CC_SHN_ABRUPT = 2 << 14
	NVME_CC_SHN_MASK   = 3 << 14
	NVME_CC_IOSQES     = 6 << 16
	NVME_CC_IOCQES     = 4 << 20
)

// Controller Status bits (NVME_CSTS_*).
const (
	NVME_CSTS_RDY         = 1 << 0
	NVME_CSTS_CFS         = 1 << 1
	NVME_CSTS_SHST_NORMAL = 0 << 2
	NVME_CSTS_SHST_OCCUR  = 1 << 2
	NVME_CSTS_SHST_CMPLT  = 2 << 2
	NVME_CSTS_SHST_MASK   = 3 << 2
)

// CAP field accessors (NVME_CAP_*).
func CAPMQES(cap uint64) uint16   { return uint16(cap & 0xffff) } // 0's based
func CAPTimeout(cap uint64) uint8 { return uint8(cap >> 24) }     // 500 ms units
func CAPMPSMin(cap uint64) uint8  { return uint8(cap>>48) & 0xf }

// ONCS bits of Identify Controller (NVME_CTRL_ONCS_*).
const (
	NVME_CTRL_ONCS_COMPARE             = 1 << 0
	NVME_CTRL_ONCS_WRITE_UNCORRECTABLE = 1 << 1
	NVME_CTRL_ONCS_DSM                 = 1 << 2
	NVME_CTRL_ONCS_WRITE_ZEROES        = 1 << 3
)

// VWC bit 0: a volatile write cache is present (NVME_CTRL_VWC_PRESENT).
const NVME_CTRL_VWC_PRESENT = 1 << 0

// Read/Write cdw12 bits (NVME_RW_*).
const (
	NVME_RW_FUA  = 1 << 30
	NVME_RW_LR   = 1 << 31
	NVME_WZ_DEAC = 1 << 25
)

// Dataset Management attributes (cdw11, NVME_DSMGMT_*).
const NVME_DSMGMT_AD = 1 << 2

// NVME_NSID_ALL addresses every namespace.
const NVME_NSID_ALL = 0xffffffff

// NVME_DISC_SUBSYS_NAME is the well-known discovery subsystem NQN.
const NVME_DISC_SUBSYS_NAME = "nqn.2014-08.org.nvmexpress.discovery"

// NVMF_NQN_SIZE is the longest NQN in bytes; NVMF_NQN_FIELD_LEN the field
// that carries it.
const (
	NVMF_NQN_SIZE      = 223
	NVMF_NQN_FIELD_LEN = 256
)
