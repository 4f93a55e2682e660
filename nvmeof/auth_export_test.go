package nvmeof

import "github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/auth"

// SetAuthTestHook lets nvmeof_test record DH-HMAC-CHAP transcripts; nil
// removes the hook.
func SetAuthTestHook(h func(qid uint16, cfg *auth.HostConfig)) { authTestHook = h }
