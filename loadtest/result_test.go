package loadtest

import (
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestPercentile(t *testing.T) {
	t.Parallel()
	ms := func(v ...int) []time.Duration {
		var out []time.Duration
		for _, x := range v {
			out = append(out, time.Duration(x)*time.Millisecond)
		}
		return out
	}
	tests := []struct {
		name   string
		sorted []time.Duration
		p      float64
		want   time.Duration
	}{
		{name: "none", sorted: nil, p: 50, want: 0},
		{name: "one", sorted: ms(7), p: 99, want: 7 * time.Millisecond},
		{name: "median of four", sorted: ms(1, 2, 3, 4), p: 50, want: 2 * time.Millisecond},
		{name: "p99 of hundred", sorted: ms(seq(100)...), p: 99, want: 99 * time.Millisecond},
		{name: "p100", sorted: ms(1, 2, 3), p: 100, want: 3 * time.Millisecond},
		{name: "p0", sorted: ms(1, 2, 3), p: 0, want: time.Millisecond},
	}
	for _, tc := range tests {
		if got := percentile(tc.sorted, tc.p); got != tc.want {
			t.Errorf("%s: percentile(%v) = %v, want %v", tc.name, tc.p, got, tc.want)
		}
	}
}

func seq(n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = i + 1
	}
	return out
}

func TestHistogram(t *testing.T) {
	t.Parallel()
	var lat []time.Duration
	for i := range 1000 {
		lat = append(lat, time.Duration(1000+i)*time.Microsecond)
	}
	lat = append(lat, time.Second) // one far outlier
	b := histogram(lat, 10)
	var total int
	for i, bk := range b {
		total += bk.Count
		if i > 0 && bk.Low != b[i-1].High {
			t.Errorf("bucket %d starts at %v, previous ends at %v", i, bk.Low, b[i-1].High)
		}
	}
	if total != len(lat) {
		t.Errorf("buckets hold %d calls, want %d", total, len(lat))
	}
	if len(b) != 11 || b[10].Count != 1 || b[10].High != time.Second {
		t.Errorf("want 10 buckets and a tail bucket holding the outlier, got %+v", b)
	}
	if got := histogram(nil, 10); got != nil {
		t.Errorf("histogram(nil) = %v, want nil", got)
	}
	same := []time.Duration{time.Millisecond, time.Millisecond}
	if diff := cmp.Diff([]Bucket{{Low: time.Millisecond, High: time.Millisecond, Count: 2}}, histogram(same, 10)); diff != "" {
		t.Errorf("equal latencies (-want +got):\n%s", diff)
	}
}

func TestCallPath(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{
		"grpc.testing.TestService/EmptyCall": "/grpc.testing.TestService/EmptyCall",
		"grpc.testing.TestService.EmptyCall": "/grpc.testing.TestService/EmptyCall",
		"Svc/M":                              "/Svc/M",
	} {
		got, err := callPath(in)
		if err != nil || got != want {
			t.Errorf("callPath(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", "nodots", "/M", "Svc/", "a/b/c", "Svc/M.x"} {
		if got, err := callPath(in); err == nil {
			t.Errorf("callPath(%q) = %q, want error", in, got)
		}
	}
}
