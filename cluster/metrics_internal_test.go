package cluster

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/resolver"
)

// BenchmarkPickMetrics compares a pick and its done with metrics off and
// on, the per-call cost of the metered Picker:
//
//	go test -run '^$' -bench PickMetrics -benchmem ./cluster
func BenchmarkPickMetrics(b *testing.B) {
	for _, on := range []bool{false, true} {
		name := "off"
		if on {
			name = "on"
		}
		b.Run(name, func(b *testing.B) {
			cfg := Config{Targets: []string{"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"}, Logger: slog.New(slog.DiscardHandler)}
			if on {
				cfg.Metrics = prometheus.NewRegistry()
			}
			c, err := New(cfg)
			if err != nil {
				b.Fatal(err)
			}
			st := resolver.State{}
			for _, a := range cfg.Targets {
				st.Addresses = append(st.Addresses, resolver.Address{Addr: a})
			}
			if err := c.Director().UpdateState(st); err != nil {
				b.Fatal(err)
			}
			var p proxy.Picker = c.Picker()
			ctx := context.Background()
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					_, done, err := p.Pick(ctx, "/s/m")
					if err != nil {
						b.Fatal(err)
					}
					done(nil)
				}
			})
		})
	}
}

// TestMeteredPickerKeepsExclusion checks that metering does not hide the
// director's PickExcluding: a retry's pick must avoid the tried backends.
func TestMeteredPickerKeepsExclusion(t *testing.T) {
	cfg := Config{Targets: []string{"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"}, Logger: slog.New(slog.DiscardHandler), Metrics: prometheus.NewRegistry()}
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	st := resolver.State{}
	for _, a := range cfg.Targets {
		st.Addresses = append(st.Addresses, resolver.Address{Addr: a})
	}
	if err := c.Director().UpdateState(st); err != nil {
		t.Fatal(err)
	}
	rp, ok := c.Picker().(proxy.RetryPicker)
	if !ok {
		t.Fatalf("metered Picker %T is not a proxy.RetryPicker", c.Picker())
	}
	tried := []string{"10.0.0.1:80", "10.0.0.2:80"}
	for range 20 {
		addr, done, err := rp.PickExcluding(t.Context(), "/s/m", tried)
		if err != nil {
			t.Fatal(err)
		}
		done(nil)
		if addr != "10.0.0.3:80" {
			t.Fatalf("PickExcluding(tried=%v) = %s, want the untried 10.0.0.3:80", tried, addr)
		}
	}
}

// TestStaleSeriesNotRecreated: a pick from the director's old snapshot that
// is metered after metrics.UpdateState removed its backend must not bring
// the backend's series back (nothing would delete them again).
func TestStaleSeriesNotRecreated(t *testing.T) {
	reg := prometheus.NewRegistry()
	c, err := New(Config{Targets: []string{"10.0.0.1:80"}, Logger: slog.New(slog.DiscardHandler), Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	m := c.metrics
	m.UpdateState(resolver.State{Addresses: []resolver.Address{{Addr: "10.0.0.1:80"}}})
	if m.backend("10.0.0.1:80") == m.detached {
		t.Fatal("a backend of the current set gets detached instruments")
	}
	p := &meteredPicker{m: m, next: proxy.PickerFunc(func(context.Context, string) (string, func(error), error) {
		// The director answered from the old snapshot; then the resolver's
		// Tee delivered the new set (without 10.0.0.1) to metrics.
		m.UpdateState(resolver.State{Addresses: []resolver.Address{{Addr: "10.0.0.2:80"}}})
		return "10.0.0.1:80", func(error) {}, nil
	})}
	_, done, _ := p.Pick(context.Background(), "/x/y")
	done(nil)
	mfs, _ := reg.Gather()
	for _, mf := range mfs {
		if mf.GetName() == "streamlb_calls_started_total" {
			for _, mm := range mf.GetMetric() {
				for _, l := range mm.GetLabel() {
					if l.GetValue() == "10.0.0.1:80" {
						t.Errorf("series %s{backend=10.0.0.1:80} exported after the backend left the set (re-created, never deleted)", mf.GetName())
					}
				}
			}
		}
	}
}

// TestMetricsRegisterTwice: a second cluster of the same name on one
// registry is an error from New, not a panic.
func TestMetricsRegisterTwice(t *testing.T) {
	reg := prometheus.NewRegistry()
	cfg := Config{Name: "echo", Targets: []string{"10.0.0.1:80"}, Logger: slog.New(slog.DiscardHandler), Metrics: reg}
	if _, err := New(cfg); err != nil {
		t.Fatal(err)
	}
	if _, err := New(cfg); err == nil {
		t.Error("New() with a cluster name already registered succeeded, want an error")
	}
}

// TestCallCountsExported: the per-call counts kept as plain integers come
// out at scrape time as the series client_golang's vectors made before:
// started, in flight, finished by code, the duration histogram
// (cumulative buckets, a count equal to the +Inf bucket, the sum in
// seconds), and a backend's series go with it when it leaves the set.
func TestCallCountsExported(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	c, err := New(Config{Targets: []string{"10.0.0.1:80"}, Logger: slog.New(slog.DiscardHandler), Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	m := c.metrics
	const addr = "10.0.0.1:80"
	set := func(addrs ...string) {
		var st resolver.State
		for _, a := range addrs {
			st.Addresses = append(st.Addresses, resolver.Address{Addr: a})
		}
		if err := m.UpdateState(st); err != nil {
			t.Fatal(err)
		}
	}
	set(addr)
	p := &meteredPicker{m: m, next: proxy.PickerFunc(func(context.Context, string) (string, func(error), error) {
		return addr, nil, nil
	})}
	var dones []func(error)
	for range 3 {
		_, done, err := p.Pick(t.Context(), "/s/M")
		if err != nil {
			t.Fatal(err)
		}
		dones = append(dones, done)
	}
	dones[0](nil)
	dones[1](status.Error(codes.Unavailable, "gone"))
	// Two more durations, straight into the counts: 3 s and 2 min.
	m.backend(addr).observe(int64(3 * time.Second))
	m.backend(addr).observe(int64(2 * time.Minute))
	m.callEnd(proxy.CallInfo{Backend: addr, RequestBytes: 7, ResponseBytes: 9})

	got := gathered(t, reg)
	b := ",backend=" + addr
	for key, want := range map[string]float64{
		"streamlb_calls_started_total" + b:                            3,
		"streamlb_calls_in_flight" + b:                                1,
		"streamlb_calls_finished_total" + b + ",code=OK":              1,
		"streamlb_calls_finished_total" + b + ",code=Unavailable":     1,
		"streamlb_calls_finished_total" + b + ",code=Internal":        0,
		"streamlb_call_duration_seconds" + b:                          4,
		"streamlb_call_duration_seconds_bucket" + b + ",le=2.5":       2,
		"streamlb_call_duration_seconds_bucket" + b + ",le=5":         3,
		"streamlb_call_duration_seconds_bucket" + b + ",le=60":        3,
		"streamlb_request_bytes_total" + b:                            7,
		"streamlb_response_bytes_total" + b:                           9,
		"streamlb_calls_finished_total" + b + ",code=Unauthenticated": 0,
	} {
		if v, ok := got[key]; !ok || v != want {
			t.Errorf("%s = %v (present %v), want %v", key, v, ok, want)
		}
	}
	if sum := got["streamlb_call_duration_seconds_sum"+b]; sum < 123 || sum > 124 {
		t.Errorf("duration sum = %v s, want 123 s and the two calls' few ms", sum)
	}

	// The backend leaves: its series go. It comes back: they start again.
	set("10.0.0.2:80")
	dones[2](nil) // ends on counts nobody exports any more
	for key := range gathered(t, reg) {
		if strings.Contains(key, addr) {
			t.Errorf("series %s exported after %s left the set", key, addr)
		}
	}
	set(addr)
	if _, done, err := p.Pick(t.Context(), "/s/M"); err != nil {
		t.Fatal(err)
	} else {
		done(nil)
	}
	got = gathered(t, reg)
	if v := got["streamlb_calls_started_total"+b]; v != 1 {
		t.Errorf("started after coming back = %v, want 1 (a fresh series)", v)
	}
	if v := got["streamlb_calls_in_flight"+b]; v != 0 {
		t.Errorf("in flight after coming back = %v, want 0", v)
	}
}
