package cluster_test

import (
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/streamlb/streamlb/cluster"
)

// overlapCollector records whether two scrapes collect it at once: each
// Collect waits up to hold for another to begin.
type overlapCollector struct {
	hold    time.Duration
	in      atomic.Int32
	overlap atomic.Bool
	arrived chan struct{}
}

func (c *overlapCollector) Describe(chan<- *prometheus.Desc) {}

func (c *overlapCollector) Collect(chan<- prometheus.Metric) {
	if c.in.Add(1) > 1 {
		c.overlap.Store(true)
		select {
		case c.arrived <- struct{}{}:
		default:
		}
	}
	defer c.in.Add(-1)
	select {
	case <-c.arrived:
		c.overlap.Store(true)
	case <-time.After(c.hold):
	}
}

// TestAdminScrapesOneAtATime: the admin responses that cost CPU to make
// (/metrics here) are made one at a time, as Envoy's admin thread makes
// them, so that clients scraping at once cannot take every CPU from the
// data plane. Before, each request was served at once: on 2 CPUs, 16
// clients scraping /metrics in a loop cut a 2,000 calls/s load to about
// 590 calls/s (p50 0.5 ms to 16 ms), where one client scraping as fast
// as it could left it at 2,000 (p50 0.8 ms). /healthz and /readyz are
// not held behind a scrape.
func TestAdminScrapesOneAtATime(t *testing.T) {
	a := startBackend(t, "a", "127.0.0.1:0")
	reg := prometheus.NewRegistry()
	col := &overlapCollector{hold: 150 * time.Millisecond, arrived: make(chan struct{}, 1)}
	reg.MustRegister(col)
	r := runServer(t, cluster.ServerConfig{Metrics: reg, Cluster: cluster.Config{Name: "a", Targets: []string{a.Addr()}}})
	waitStatus(t, r.admin+"/readyz", http.StatusOK)

	const scrapers = 4
	var wg sync.WaitGroup
	errs := make(chan error, scrapers)
	for range scrapers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := http.Get(r.admin + "/metrics")
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			if _, err := io.ReadAll(resp.Body); err != nil || resp.StatusCode != http.StatusOK {
				errs <- fmt.Errorf("GET /metrics: %d, %v", resp.StatusCode, err)
			}
		}()
	}
	// While scrapes wait, the probes answer.
	for range 3 {
		if code, _ := get(t, r.admin+"/healthz"); code != http.StatusOK {
			t.Errorf("/healthz during scrapes: %d, want 200", code)
		}
		if code, _ := get(t, r.admin+"/readyz"); code != http.StatusOK {
			t.Errorf("/readyz during scrapes: %d, want 200", code)
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if col.overlap.Load() {
		t.Errorf("%d concurrent /metrics requests were collected at the same time, want one at a time", scrapers)
	}

	// A delta profile over seconds sleeps without a turn: /metrics
	// answers meanwhile.
	profiled := make(chan error, 1)
	go func() {
		resp, err := http.Get(r.admin + "/debug/pprof/allocs?seconds=4")
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		profiled <- err
	}()
	time.Sleep(200 * time.Millisecond) // let the profile begin
	c := &http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(r.admin + "/metrics")
	if err != nil {
		t.Fatalf("/metrics while a 4 s delta profile runs: %v, want an answer at once", err)
	}
	resp.Body.Close()
	if err := <-profiled; err != nil {
		t.Errorf("delta profile: %v", err)
	}
}

// TestReadyzMalformedQuery: /readyz?cluster=NAME with a query that does
// not parse (a bad escape, as in a name cut after its %) is refused with
// 400. url.Values dropped the pair, and the probe got the answer for all
// clusters (200 while any had a backend) instead of the one it named.
func TestReadyzMalformedQuery(t *testing.T) {
	a := startBackend(t, "a", "127.0.0.1:0")
	r := runServer(t, cluster.ServerConfig{Cluster: cluster.Config{Name: "a", Targets: []string{a.Addr()}}})
	waitStatus(t, r.admin+"/readyz", http.StatusOK)
	for _, q := range []string{"cluster=%zz", "cluster=users%", "cluster=a&x=%"} {
		if code, body := get(t, r.admin+"/readyz?"+q); code != http.StatusBadRequest {
			t.Errorf("/readyz?%s = %d %q, want 400", q, code, body)
		}
	}
	if code, body := get(t, r.admin+"/readyz?cluster=a"); code != http.StatusOK {
		t.Errorf("/readyz?cluster=a = %d %q, want 200", code, body)
	}
}
