package uring

import "testing"

// TestGuestSocketOps runs the socket operation tests in the VM, on the
// kernels the daemon supports (6.12 and 7.3): the NVMe/TCP data path
// relies on their behaviour there, not only on the host's kernel.
func TestGuestSocketOps(t *testing.T) {
	t.Run("SendRecvNonblockingTCP", TestSendRecvNonblockingTCP)
	t.Run("RecvEOF", TestRecvEOF)
	t.Run("SendmsgGathers", TestSendmsgGathers)
	t.Run("SendPartialResumes", TestSendPartialResumes)
	t.Run("CancelFdEndsPendingRecv", TestCancelFdEndsPendingRecv)
	t.Run("CancelByUserData", TestCancelByUserData)
}
