package nvmeof

import (
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// The shutdown wait follows RTD3E (microseconds) within 5 and 60 s, as
// nvme_init_identify sets shutdown_timeout.
func TestShutdownTimeoutFromRTD3E(t *testing.T) {
	for _, c := range []struct {
		rtd3e uint32
		want  time.Duration
	}{
		{0, 5 * time.Second},
		{999_999, 5 * time.Second},
		{8_000_000, 8 * time.Second},
		{8_900_000, 8 * time.Second},
		{60_000_000, 60 * time.Second},
		{0xffffffff, 60 * time.Second},
	} {
		ctrl := &Controller{id: &nvme.IdentifyController{RTD3E: c.rtd3e}}
		if got := ctrl.ShutdownTimeout(); got != c.want {
			t.Errorf("RTD3E %d us: shutdown timeout %v, want %v", c.rtd3e, got, c.want)
		}
	}
	if got := (&Controller{}).ShutdownTimeout(); got != DefaultShutdownTimeout {
		t.Errorf("no Identify data: %v", got)
	}
}
