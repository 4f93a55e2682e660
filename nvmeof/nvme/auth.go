package nvme

import "encoding/binary"

// Fabrics command types for in-band authentication (include/linux/nvme.h
// nvme_fabrics_type_auth_send, _auth_receive; NVMe over Fabrics 1.1,
// Authentication Send and Receive).
const (
	NVME_FABRICS_TYPE_AUTH_SEND    = 0x05
	NVME_FABRICS_TYPE_AUTH_RECEIVE = 0x06
)

// Connect response dword 0 bits 18:17, AUTHREQ (include/linux/nvme.h):
// authentication (ATR) or authentication and a secure channel (ASCR) is
// required before any other command.
const (
	NVME_CONNECT_AUTHREQ_ATR  = 1 << 17
	NVME_CONNECT_AUTHREQ_ASCR = 1 << 18
)

// AuthCommand is struct nvmf_auth_common_command's fields: SPSP0 at byte
// 41, SPSP1 at 42, SECP at 43, and TL (send) or AL (receive) at 44.
type AuthCommand struct {
	SECP, SPSP0, SPSP1 uint8
	Length             uint32
}

// SetAuthSend fills c as Authentication Send of tl bytes; the caller adds
// the SGL.
func (c *Command) SetAuthSend(a AuthCommand) { c.setAuth(NVME_FABRICS_TYPE_AUTH_SEND, a) }

// SetAuthReceive fills c as Authentication Receive with allocation length
// a.Length.
func (c *Command) SetAuthReceive(a AuthCommand) { c.setAuth(NVME_FABRICS_TYPE_AUTH_RECEIVE, a) }

func (c *Command) setAuth(fctype uint8, a AuthCommand) {
	*c = Command{}
	c[0] = NVME_FABRICS_COMMAND
	c[4] = fctype
	c[41], c[42], c[43] = a.SPSP0, a.SPSP1, a.SECP
	binary.LittleEndian.PutUint32(c[44:], a.Length)
}

// AuthCommand decodes an Authentication Send or Receive command.
func (c *Command) AuthCommand() AuthCommand {
	return AuthCommand{SPSP0: c[41], SPSP1: c[42], SECP: c[43], Length: binary.LittleEndian.Uint32(c[44:])}
}
