package target

import (
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/auth"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// In-band authentication, the controller's side (Linux
// drivers/nvme/target/fabrics-cmd-auth.c): a queue whose host has
// DH-HMAC-CHAP settings (Config.Auth) answers Connect with AUTHREQ.ATR and
// accepts nothing but Authentication Send and Receive until the host has
// authenticated; then it works as any other.
//
// A failed transaction leaves the queue refusing every command with
// Authentication Required; the host disconnects (nvmet also deletes the
// controller at once, nvmet_ctrl_fatal_error).

// maxAuthReceive bounds Authentication Receive's allocation length, a
// value from the wire that sizes a buffer: the longest message (a
// challenge with SHA-512 and ffdhe8192) is 1104 bytes, and the Linux host
// asks for 4096.
const maxAuthReceive = 64 << 10

// connAuth is a queue's DH-HMAC-CHAP state (nvmet_sq's dhchap fields).
type connAuth struct {
	tx *auth.ControllerTransaction
}

// startAuth runs at a successful Connect and returns the AUTHREQ bits for
// its response.
func (c *conn) startAuth(subsys *Subsystem, hostNQN string) uint64 {
	if c.t.cfg.Auth == nil || subsys == nil {
		return 0
	}
	cfg := c.t.cfg.Auth(hostNQN, subsys.NQN())
	if cfg == nil {
		return 0
	}
	cc := *cfg
	cc.HostNQN, cc.SubsysNQN = hostNQN, subsys.NQN()
	c.auth = &connAuth{tx: auth.NewControllerTransaction(&cc)}
	return nvme.NVME_CONNECT_AUTHREQ_ATR
}

// authBlocks reports whether cmd must be refused with Authentication
// Required (nvmet_check_auth_status): the queue has not authenticated and
// cmd is not part of the transaction.
func (c *conn) authBlocks(cmd *nvme.Command) bool {
	if c.auth == nil || c.auth.tx.Authenticated() {
		return false
	}
	if cmd.Opcode() == nvme.NVME_FABRICS_COMMAND {
		switch cmd.FabricsType() {
		case nvme.NVME_FABRICS_TYPE_AUTH_SEND, nvme.NVME_FABRICS_TYPE_AUTH_RECEIVE:
			return false
		}
	}
	return true
}

// authCommand executes Authentication Send or Receive
// (nvmet_execute_auth_send, nvmet_execute_auth_receive).
func (c *conn) authCommand(cmd *command) (nvme.Status, uint64, []byte) {
	invalid := nvme.NVME_SC_INVALID_FIELD | nvme.NVME_STATUS_DNR
	if c.ctrl == nil {
		return nvme.NVME_SC_CMD_SEQ_ERROR | nvme.NVME_STATUS_DNR, 0, nil
	}
	if c.auth == nil {
		return invalid, 0, nil // no settings for this host: nothing to negotiate
	}
	a := cmd.cmd.AuthCommand()
	if a.SECP != auth.NVME_AUTH_DHCHAP_PROTOCOL_IDENTIFIER || a.SPSP0 != auth.NVME_AUTH_DHCHAP_SPSP0 || a.SPSP1 != auth.NVME_AUTH_DHCHAP_SPSP1 || a.Length == 0 {
		return invalid, 0, nil
	}
	if cmd.cmd.FabricsType() == nvme.NVME_FABRICS_TYPE_AUTH_SEND {
		if int64(len(cmd.data)) != int64(a.Length) {
			return invalid, 0, nil
		}
		c.auth.tx.Send(cmd.data)
		return nvme.NVME_SC_SUCCESS, 0, nil
	}
	if _, length, _ := cmd.cmd.SGL(); a.Length > maxAuthReceive || length < a.Length {
		return invalid, 0, nil
	}
	out, err := c.auth.tx.Receive(int(a.Length))
	if err != nil {
		return invalid, 0, nil
	}
	return nvme.NVME_SC_SUCCESS, 0, out
}
