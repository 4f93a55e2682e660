package ublk

import (
	"strings"
	"testing"
	"unsafe"

	"github.com/ublk-nvmeof/ublk-nvmeof/ublk/internal/uapi"
)

func TestOptionsNormalize(t *testing.T) {
	o, err := Options{ID: AutoID, Depth: 32, Params: Params{Size: 1 << 20}}.normalize()
	if err != nil {
		t.Fatal(err)
	}
	if o.Queues != 1 || o.LogicalBlockSize != 512 || o.PhysicalBlockSize != 512 || o.IOMin != 512 || o.MaxIOBytes != defaultMaxIOBytes {
		t.Errorf("defaults: %+v", o)
	}
	bad := map[string]Options{
		"Depth":             {Depth: 0, Params: Params{Size: 1 << 20}},
		"Depth 5000":        {Depth: 5000, Params: Params{Size: 1 << 20}},
		"Queues":            {Depth: 1, Queues: possibleCPUs() + 1, Params: Params{Size: 1 << 20}},
		"LogicalBlockSize":  {Depth: 1, Params: Params{Size: 1 << 20, LogicalBlockSize: 1000}},
		"PhysicalBlockSize": {Depth: 1, Params: Params{Size: 1 << 20, LogicalBlockSize: 4096, PhysicalBlockSize: 512}},
		"MaxIOBytes":        {Depth: 1, Params: Params{Size: 1 << 20, MaxIOBytes: 1000}},
		"Size":              {Depth: 1, Params: Params{Size: 1000}},
		"FUA":               {Depth: 1, Params: Params{Size: 1 << 20, FUA: true}},
		"Discard":           {Depth: 1, Params: Params{Size: 1 << 20, Discard: &DiscardParams{}}},
		"Recovery":          {Depth: 1, Recovery: 7, Params: Params{Size: 1 << 20}},
		"ID":                {ID: -2, Depth: 1, Params: Params{Size: 1 << 20}},
	}
	for field, o := range bad {
		_, err := o.normalize()
		if err == nil {
			t.Errorf("%s: accepted %+v", field, o)
			continue
		}
		if !strings.Contains(err.Error(), strings.Fields(field)[0]) {
			t.Errorf("%s: error %q does not name the field", field, err)
		}
	}
}

func TestParamsRoundTrip(t *testing.T) {
	in := Params{
		Size: 64 << 20, LogicalBlockSize: 512, PhysicalBlockSize: 4096, IOMin: 4096, IOOpt: 128 << 10,
		MaxIOBytes: 256 << 10, Rotational: true, VolatileCache: true, FUA: true,
		Discard: &DiscardParams{Alignment: 0, Granularity: 4096, MaxDiscardSectors: 2048, MaxWriteZeroesSectors: 1024},
	}
	r := in.raw()
	if r.Len != uint32(unsafe.Sizeof(r)) || r.Types != uapi.UBLK_PARAM_TYPE_BASIC|uapi.UBLK_PARAM_TYPE_DISCARD {
		t.Errorf("header len %d types %#x", r.Len, r.Types)
	}
	if r.Basic.LogicalBsShift != 9 || r.Basic.PhysicalBsShift != 12 || r.Basic.IoOptShift != 17 ||
		r.Basic.MaxSectors != 512 || r.Basic.DevSectors != 131072 || r.Discard.MaxDiscardSegments != 1 {
		t.Errorf("raw basic %+v discard %+v", r.Basic, r.Discard)
	}
	if r.Basic.Attrs != uapi.UBLK_ATTR_ROTATIONAL|uapi.UBLK_ATTR_VOLATILE_CACHE|uapi.UBLK_ATTR_FUA {
		t.Errorf("attrs %#x", r.Basic.Attrs)
	}
	out := paramsFromRaw(&r)
	if out.Discard == nil || *out.Discard != *in.Discard {
		t.Fatalf("discard round trip: %+v", out.Discard)
	}
	out.Discard, in.Discard = nil, nil
	if out != in {
		t.Errorf("round trip:\n got %+v\nwant %+v", out, in)
	}
}
