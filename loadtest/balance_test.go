package loadtest_test

import (
	"errors"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/streamlb/streamlb/loadtest"
)

// resultWith returns a Result whose backends got the given calls, with
// shares computed as Run computes them.
func resultWith(calls map[string]int64) *loadtest.Result {
	var total int64
	for _, n := range calls {
		total += n
	}
	r := &loadtest.Result{}
	for _, name := range slices.Sorted(maps.Keys(calls)) { // as Run sorts them
		n := calls[name]
		r.Backends = append(r.Backends, loadtest.Backend{Name: name, Calls: n, Share: 100 * float64(n) / float64(total)})
	}
	return r
}

func TestCheckBalance(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		calls   map[string]int64
		pct     float64
		expect  int
		wantErr string // "" for a pass
	}{
		{name: "even", calls: map[string]int64{"a": 100, "b": 100, "c": 100}, pct: 1},
		{name: "within", calls: map[string]int64{"a": 110, "b": 95, "c": 95}, pct: 5},
		{name: "exactly at the bound", calls: map[string]int64{"a": 60, "b": 40}, pct: 10},
		{name: "skewed", calls: map[string]int64{"a": 200, "b": 50, "c": 50}, pct: 10,
			wantErr: "balance assertion failed: backend a got 66.7% (even share 33.3%, allowed ±10)"},
		{name: "one of three expected", calls: map[string]int64{"a": 100}, pct: 10, expect: 3,
			wantErr: "balance assertion failed: backend a got 100.0% (even share 33.3%, allowed ±10)"},
		{name: "one seen, none expected", calls: map[string]int64{"a": 100}, pct: 10},
		{name: "missing backend is the worst", calls: map[string]int64{"a": 52, "b": 48}, pct: 20, expect: 3,
			wantErr: "balance assertion failed: backend #3 of 3 (no calls) got 0.0% (even share 33.3%, allowed ±20)"},
		{name: "unknown lowers shares", calls: map[string]int64{"a": 40, "b": 40, loadtest.UnknownBackend: 20}, pct: 5,
			wantErr: "backend a got 40.0% (even share 50.0%, allowed ±5)"},
		{name: "fractional allowance", calls: map[string]int64{"a": 51, "b": 49}, pct: 0.5,
			wantErr: "allowed ±0.5)"},
		{name: "nothing attributed", calls: map[string]int64{loadtest.UnknownBackend: 10}, pct: 10,
			wantErr: "no call was attributed to a backend"},
		{name: "negative allowance", calls: map[string]int64{"a": 1}, pct: -1, wantErr: "non-negative"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			err := resultWith(tc.calls).CheckBalance(tc.pct, tc.expect)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Errorf("got %v, want pass", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Errorf("got %v, want an error containing %q", err, tc.wantErr)
			}
			var be *loadtest.BalanceError
			if strings.HasPrefix(tc.wantErr, "balance assertion failed: backend") && !errors.As(err, &be) {
				t.Errorf("got %T, want *BalanceError", err)
			}
		})
	}
}

func TestParseMetadata(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		in      string
		want    map[string]string
		wantErr string
	}{
		{name: "object", in: `{"X-Delay":"1ms","token":"abc"}`, want: map[string]string{"x-delay": "1ms", "token": "abc"}},
		{name: "empty", in: `{}`, want: map[string]string{}},
		{name: "malformed", in: `{"a":`, wantErr: "JSON object of strings"},
		{name: "array", in: `["a"]`, wantErr: "JSON object of strings"},
		{name: "null", in: `null`, wantErr: "got null"},
		{name: "number value", in: `{"a":1}`, wantErr: `value of "a" must be a string, got a number`},
		{name: "nested value", in: `{"a":{"b":"c"}}`, wantErr: "got an object"},
		{name: "empty key", in: `{"":"x"}`, wantErr: "key must not be empty"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := loadtest.ParseMetadata(tc.in)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Errorf("got %v, %v; want error containing %q", got, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("metadata (-want +got):\n%s", diff)
			}
		})
	}
}

// FuzzParseMetadata: whatever the input, an error or string keys and values
// with lower-case keys, never a panic.
func FuzzParseMetadata(f *testing.F) {
	for _, s := range []string{`{"X-Delay":"1ms"}`, `{}`, `{"a":1}`, `null`, `["a"]`, `{"":"x"}`, `{"a":`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		md, err := loadtest.ParseMetadata(s)
		if err != nil {
			return
		}
		for k := range md {
			if k == "" || strings.ToLower(k) != k {
				t.Errorf("key %q is empty or not lower-case", k)
			}
		}
	})
}

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	ok := loadtest.Config{Target: "127.0.0.1:1", Call: "pkg.Svc/M"}
	tests := []struct {
		name    string
		mod     func(*loadtest.Config)
		wantErr string
	}{
		{name: "minimal", mod: func(*loadtest.Config) {}},
		{name: "dotted call", mod: func(c *loadtest.Config) { c.Call = "pkg.Svc.M" }},
		{name: "call without method", mod: func(c *loadtest.Config) { c.Call = "pkg.Svc/" }, wantErr: "not package.Service/Method"},
		{name: "call with two slashes", mod: func(c *loadtest.Config) { c.Call = "a/b/c" }, wantErr: "not package.Service/Method"},
		{name: "data and binary", mod: func(c *loadtest.Config) { c.Data, c.BinaryData = []byte("{}"), []byte{1} }, wantErr: "not both"},
		{name: "proto and protoset", mod: func(c *loadtest.Config) { c.Proto, c.Protoset = "a.proto", "a.protoset" }, wantErr: "not both"},
		{name: "proto extension", mod: func(c *loadtest.Config) { c.Proto = "a.txt" }, wantErr: ".proto extension"},
		{name: "bad stop action", mod: func(c *loadtest.Config) { c.DurationStop = "later" }, wantErr: "wait, close or ignore"},
		{name: "negatives", mod: func(c *loadtest.Config) { c.Total, c.RPS, c.Timeout = -1, -1, -1 }, wantErr: "total must not be negative"},
		{name: "upper-case header", mod: func(c *loadtest.Config) { c.BackendHeader = "X-Backend" }, wantErr: "lower-case"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cfg := ok
			tc.mod(&cfg)
			err := cfg.Validate()
			if tc.wantErr == "" {
				if err != nil {
					t.Errorf("got %v, want nil", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("got %v, want error containing %q", err, tc.wantErr)
			}
		})
	}
}

func TestCheckErrorRate(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name          string
		count, errors uint64
		pct           float64
		wantErr       string // "" for a pass
		wantRateErr   bool
	}{
		{name: "no errors, zero allowed", count: 100, pct: 0},
		{name: "at the limit", count: 200, errors: 2, pct: 1},
		{name: "above the limit", count: 200, errors: 3, pct: 1, wantErr: "error rate assertion failed: 3 of 200 calls failed (1.50%, allowed 1%)", wantRateErr: true},
		{name: "any error, zero allowed", count: 1000, errors: 1, pct: 0, wantErr: "1 of 1000 calls failed", wantRateErr: true},
		{name: "all failed, all allowed", count: 5, errors: 5, pct: 100},
		{name: "no calls", pct: 100, wantErr: "no call was made"},
		{name: "negative", count: 1, pct: -1, wantErr: "from 0 to 100"},
		{name: "over 100", count: 1, pct: 101, wantErr: "from 0 to 100"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			r := &loadtest.Result{Count: tc.count, Errors: tc.errors}
			err := r.CheckErrorRate(tc.pct)
			if tc.wantErr == "" {
				if err != nil {
					t.Errorf("CheckErrorRate(%v) = %v, want nil", tc.pct, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("CheckErrorRate(%v) = %v, want %q", tc.pct, err, tc.wantErr)
			}
			var re *loadtest.ErrorRateError
			if got := errors.As(err, &re); got != tc.wantRateErr {
				t.Errorf("errors.As(*ErrorRateError) = %v, want %v", got, tc.wantRateErr)
			}
		})
	}
}
