// Package auth implements NVMe in-band authentication with DH-HMAC-CHAP
// (NVMe Base Specification 2.0, section 8.13.5; TP 8006), both roles:
// the host's exchange (Linux drivers/nvme/host/auth.c) and the
// controller's (drivers/nvme/target/auth.c, fabrics-cmd-auth.c).
//
// What is here, all on the standard library:
//
//   - secrets in the DHHC-1 representation nvme-cli's gen-dhchap-key
//     writes, and the key transformation (secret.go);
//   - the hash functions SHA-256/384/512 and the RFC 7919 ffdhe groups
//     (hash.go, dh.go);
//   - the AUTH_Negotiate, DH-HMAC-CHAP_Challenge, _Reply, _Success1,
//     _Success2, _Failure1 and _Failure2 messages (messages.go);
//   - the response computations (response.go);
//   - the host's side of one transaction over a Transport that carries
//     Authentication Send and Receive (host.go), and the controller's side
//     as a state machine fed by those commands (controller.go).
//
// Every length taken from a message is checked against the message's size
// and against the negotiated hash and group before it is used.
//
// Modular exponentiation uses math/big, which is not constant time: the
// private exponent is fresh for every transaction and discarded after it,
// as in the Linux host, but a local observer of timing could learn about
// it. The secrets themselves only ever key an HMAC.
package auth
