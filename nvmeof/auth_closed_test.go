package nvmeof

import (
	"fmt"
	"io"
	"syscall"
	"testing"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/auth"
)

// TestClosedAfterReplyIsRejection: Linux nvmet 6.12 may close the
// connection instead of sending AUTH_Failure1 when it rejects the host's
// DH-HMAC-CHAP_Reply (it declares the controller fatal first). That is a
// final authentication failure, not a path error to reconnect after; a
// timeout or our own shutdown at that point is not.
func TestClosedAfterReplyIsRejection(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{&auth.ReplyUnansweredError{Err: &QueueError{QID: 0, Err: io.EOF}}, true},
		{&auth.ReplyUnansweredError{Err: &QueueError{QID: 0, Err: fmt.Errorf("read: %w", syscall.ECONNRESET)}}, true},
		{&auth.ReplyUnansweredError{Err: &QueueError{QID: 0, Err: ErrCommandTimeout}}, false},
		{&auth.ReplyUnansweredError{Err: &QueueError{QID: 0, Err: ErrQueueShutdown}}, false},
		{fmt.Errorf("DH-HMAC-CHAP: receive DH-HMAC-CHAP_Challenge: %w", &QueueError{QID: 0, Err: io.EOF}), false},
	} {
		if got := closedAfterReply(tc.err); got != tc.want {
			t.Errorf("closedAfterReply(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}
