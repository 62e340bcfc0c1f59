package cluster

import (
	"context"
	"log/slog"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

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
