// Package nvmeof is a userspace NVMe over Fabrics host for the TCP transport.
//
// It follows the split of the Linux host driver:
//
//   - transport (drivers/nvme/host/tcp.c): [Queue], one TCP connection with
//     its ICReq/ICResp handshake, command identifiers, in-flight table,
//     R2T/H2CData, C2HData and per-command timeouts;
//   - fabrics (drivers/nvme/host/fabrics.c): Connect, Property Get/Set, host
//     identity ([HostIdentity]) and NQN validation;
//   - core (drivers/nvme/host/core.c): [Controller] with enable and shutdown,
//     Identify, features, Keep Alive, log pages, asynchronous events, and the
//     NVM I/O commands on [IOQueue].
//
// The wire codec lives in nvmeof/internal/pdu, the NVMe structures shared
// with the in-process target (nvmeof/target) in nvmeof/nvme.
//
// Lifetime (docs/design.md, rule 1): every path that touches a queue holds
// a usage reference from before the first touch until after the last one.
// Tearing a queue down is three explicit steps: [Queue.Shutdown] shuts the
// socket so in-flight commands fail, [Queue.Wait] returns once every
// completion handler has returned and every goroutine of the queue has
// exited, and [Queue.Close] frees it.
package nvmeof
