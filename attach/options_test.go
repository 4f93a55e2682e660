package attach

import (
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/ublk"
)

func valid() Options {
	o := DefaultOptions()
	o.TrAddr = "127.0.0.1"
	o.NQN = "nqn.2026-11.io.ublk-nvmeof:test"
	o.NrIOQueues = 1
	return o
}

func TestValidateAcceptsDefaults(t *testing.T) {
	o := valid()
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, addr := range []string{"::1", "fe80::1", "target.example", "t-1.example.org", "localhost"} {
		o.TrAddr = addr
		if err := o.Validate(); err != nil {
			t.Errorf("%s: %v", addr, err)
		}
	}
	o = valid()
	o.CtrlLossTmo = -1 // forever
	if err := o.Validate(); err != nil {
		t.Error(err)
	}
}

func TestValidateRejects(t *testing.T) {
	cases := []struct {
		name string
		mod  func(*Options)
		want string
	}{
		{"no traddr", func(o *Options) { o.TrAddr = "" }, "--traddr is required"},
		{"bad traddr", func(o *Options) { o.TrAddr = "-bad_host" }, "neither an IP"},
		{"traddr with port", func(o *Options) { o.TrAddr = "10.0.0.1:4420" }, "neither an IP"},
		{"port text", func(o *Options) { o.TrSvcID = "nvme" }, "not a TCP port"},
		{"port zero", func(o *Options) { o.TrSvcID = "0" }, "not a TCP port"},
		{"port big", func(o *Options) { o.TrSvcID = "65536" }, "not a TCP port"},
		{"no nqn", func(o *Options) { o.NQN = "" }, "--nqn is required"},
		{"no queues", func(o *Options) { o.NrIOQueues = 0 }, "at least 1"},
		{"too many queues", func(o *Options) { o.NrIOQueues = 1 << 16 }, "more than the"},
		{"small queue", func(o *Options) { o.QueueSize = 8 }, "--queue-size 8"},
		{"big queue", func(o *Options) { o.QueueSize = 4096 }, "--queue-size 4096"},
		{"negative kato", func(o *Options) { o.KeepAliveTmo = -time.Second }, "--keep-alive-tmo"},
		{"kato past 32-bit ms", func(o *Options) { o.KeepAliveTmo = MaxKeepAliveTmo + time.Second }, "--keep-alive-tmo"},
		{"huge reconnect", func(o *Options) { o.ReconnectDelay = MaxTimeout + time.Second }, "--reconnect-delay"},
		{"huge loss", func(o *Options) { o.CtrlLossTmo = MaxTimeout + time.Second }, "--ctrl-loss-tmo"},
		{"huge fast fail", func(o *Options) { o.FastIOFailTmo = MaxTimeout + time.Second }, "--fast-io-fail-tmo"},
		{"zero copy mode", func(o *Options) { o.ZeroCopy = "yes" }, "--zero-copy \"yes\": auto, on or off"},
		{"zero copy with data digest", func(o *Options) { o.ZeroCopy, o.DataDigest = UseOn, true }, "--zero-copy on with --data-digest"},
		{"dev-id -2", func(o *Options) { o.DevID = -2 }, "--dev-id -2"},
		{"dev-id past UBLK_MAX_UBLKS", func(o *Options) { o.DevID = 1 << 20 }, "--dev-id 1048576"},
		{"zero reconnect", func(o *Options) { o.ReconnectDelay = 0 }, "--reconnect-delay"},
		{"loss < delay", func(o *Options) { o.CtrlLossTmo = time.Second }, "shorter than"},
		{"nsid 0", func(o *Options) { o.NSID = 0 }, "--nsid 0"},
		{"nsid broadcast", func(o *Options) { o.NSID = 0xffffffff }, "not a namespace"},
	}
	for _, c := range cases {
		o := valid()
		c.mod(&o)
		err := o.Validate()
		if err == nil {
			t.Errorf("%s: accepted", c.name)
			continue
		}
		if !errors.Is(err, ErrInvalidOptions) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an ErrInvalidOptions mentioning %q", c.name, err, c.want)
		}
		if strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: error is not one line: %q", c.name, err)
		}
	}
}

func TestAddr(t *testing.T) {
	o := valid()
	o.TrAddr = "::1"
	if got := o.Addr(); got != "[::1]:4420" {
		t.Errorf("Addr() = %q", got)
	}
}

func TestRecoveryMode(t *testing.T) {
	const (
		k612 = ublk.FeatureUserRecovery | ublk.FeatureUserRecoveryReissue                                  // 6.12
		k73  = ublk.FeatureUserRecovery | ublk.FeatureUserRecoveryReissue | ublk.FeatureUserRecoveryFailIO // 6.13 on
	)
	log := slog.New(slog.DiscardHandler)
	for _, c := range []struct {
		recovery, failIO bool
		feats            ublk.Features
		want             ublk.RecoveryMode
		err              bool
	}{
		{false, false, k73, ublk.RecoveryNone, false},
		{true, false, k612, ublk.RecoveryReissue, false},
		{true, false, k73, ublk.RecoveryReissue, false},
		{true, false, ublk.FeatureUserRecovery, ublk.Recovery, false},
		{true, false, 0, ublk.RecoveryNone, false}, // a warning: before 6.0
		{true, true, k73, ublk.RecoveryFailIO, false},
		{true, true, k612, 0, true}, // asked for EIO, the kernel cannot
	} {
		got, err := recoveryMode(Options{Recovery: c.recovery, RecoveryFailIO: c.failIO}, c.feats, log)
		if c.err {
			if !errors.Is(err, ublk.ErrNotSupported) || !strings.Contains(err.Error(), "--recovery-fail-io") {
				t.Errorf("%+v: %v, want ErrNotSupported naming --recovery-fail-io", c, err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("%+v: %v, %v; want %v", c, got, err, c.want)
		}
	}
	o := valid()
	o.Recovery, o.RecoveryFailIO = false, true
	if err := o.Validate(); !errors.Is(err, ErrInvalidOptions) {
		t.Errorf("--recovery-fail-io without --recovery: %v, want ErrInvalidOptions", err)
	}
}

// zeroCopy: by default where the kernel has AUTO_BUF_REG and no data
// digest needs the bytes; on and off as asked.
func TestZeroCopyChoice(t *testing.T) {
	v73 := ublk.FeatureAutoBufReg | ublk.FeatureUserRecovery
	v612 := ublk.FeatureUserRecovery
	for _, c := range []struct {
		mode   FeatureUse
		digest bool
		feats  ublk.Features
		want   bool
	}{
		{UseAuto, false, v73, true},
		{"", false, v73, true},
		{UseAuto, true, v73, false},
		{UseAuto, false, v612, false},
		{UseOff, false, v73, false},
		{UseOn, false, v612, true}, // ublk's Create refuses it, naming the feature
	} {
		o := valid()
		o.ZeroCopy, o.DataDigest = c.mode, c.digest
		if got := zeroCopy(o, c.feats); got != c.want {
			t.Errorf("mode %q, data digest %v, features %v: zero copy %v, want %v", c.mode, c.digest, c.feats, got, c.want)
		}
	}
}

// batchIO: by default where the kernel has BATCH_IO; on and off as
// asked; any other word is refused before anything is touched.
func TestBatchIOChoice(t *testing.T) {
	k73 := ublk.FeatureBatchIO | ublk.FeatureAutoBufReg
	k612 := ublk.FeatureUserRecovery
	for _, c := range []struct {
		mode  FeatureUse
		feats ublk.Features
		want  bool
	}{
		{UseAuto, k73, true},
		{"", k73, true},
		{UseAuto, k612, false},
		{UseOff, k73, false},
		{UseOn, k612, true}, // ublk's Create refuses it, naming the feature
	} {
		o := valid()
		o.BatchIO = c.mode
		if got := batchIO(o, c.feats); got != c.want {
			t.Errorf("mode %q, features %v: batch %v, want %v", c.mode, c.feats, got, c.want)
		}
	}
	o := valid()
	o.BatchIO = "yes"
	if err := o.Validate(); !errors.Is(err, ErrInvalidOptions) || !strings.Contains(err.Error(), "--batch-io") {
		t.Errorf("--batch-io yes: %v, want ErrInvalidOptions naming --batch-io", err)
	}
}
