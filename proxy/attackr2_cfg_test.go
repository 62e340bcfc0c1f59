package proxy_test

import (
	"math"
	"testing"

	"github.com/streamlb/streamlb/proxy"
)

// TestAttackR2HoldbackOverflowAccepted: a ResponseHoldback too large for
// BackendMaxStreamWindow is refused (holdTarget(n+5) > the window). Near
// math.MaxInt the check's int64(ResponseHoldback)+5 wrapped negative and
// the value was accepted; the backend connections then used uint32(it) as
// the bound (backendConn.holdBound), 4 GiB - 1 for MaxInt64: every message
// the window lets arrive whole was held. The same value reaches the
// library from --response-holdback and from a --config file's
// response_holdback.
func TestAttackR2HoldbackOverflowAccepted(t *testing.T) {
	// 1<<62, 3<<61 and 1<<40 on 64-bit platforms, smaller ones where int
	// is 32 bits.
	for _, rh := range []int{math.MaxInt, math.MaxInt - 4, math.MaxInt - 2, math.MaxInt>>1 + 1, math.MaxInt>>2*3 + 3, math.MaxInt>>23 + 1, math.MaxInt32 + (math.MaxInt-math.MaxInt32)/2} {
		_, err := proxy.New(proxy.Config{Picker: pickerTo("127.0.0.1:1"), Logger: quietLog, ResponseHoldback: rh, BackendMaxStreamWindow: 1 << 20})
		if err == nil {
			t.Errorf("ResponseHoldback %d with a 1 MiB BackendMaxStreamWindow: accepted, want refused", rh)
		}
	}
}
