package cluster_test

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
)

// TestH1ReloadRoutesAtOnce flips a weighted route between clusters a and
// b (weights 1/0 and 0/1) and a header route's cluster, 40 times, for
// both engines, while 8 workers call: a call that starts after a reload
// returned and before the next began must go where that reload says.
func TestH1ReloadRoutesAtOnce(t *testing.T) {
	for _, engine := range []string{"frame", "grpc-proxy"} {
		t.Run(engine, func(t *testing.T) {
			a := startBackend(t, "a", "127.0.0.1:0")
			b := startBackend(t, "b", "127.0.0.1:0")
			conf := func(gen int) string {
				wa, wb, hdr := 1, 0, "b"
				if gen%2 == 1 {
					wa, wb, hdr = 0, 1, "a"
				}
				return fmt.Sprintf(`engine: %s
clusters: [{name: a, targets: [%s]}, {name: b, targets: [%s]}]
routes:
  - {match: {headers: [{name: x-h, present: true}]}, cluster: %s}
  - {clusters: [{name: a, weight: %d}, {name: b, weight: %d}]}
`, engine, a.Addr(), b.Addr(), hdr, wa, wb)
			}
			dir := t.TempDir()
			r := runFile(t, writeConfig(t, dir, conf(0)), false)
			client := dial(t, r.addr)
			ctx := testkit.Context(t, 60*time.Second)
			// gen is the generation in force: set after Reload returned,
			// and to -1 while a reload runs.
			var gen atomic.Int64
			var calls, stale, fails atomic.Int64
			var firstErr atomic.Value
			stop := make(chan struct{})
			var wg sync.WaitGroup
			for w := range 8 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := 0; i < 20000; i++ {
						select {
						case <-stop:
							return
						default:
						}
						g := gen.Load()
						md := []string{}
						if w%2 == 1 {
							md = []string{"x-h", "1"}
						}
						got, err := backendOf(ctx, client, md...)
						calls.Add(1)
						if err != nil {
							fails.Add(1)
							firstErr.CompareAndSwap(nil, err.Error())
							continue
						}
						if g < 0 || gen.Load() != g {
							continue // a reload ran meanwhile
						}
						want := "a"
						if (g%2 == 1) != (w%2 == 1) {
							want = "b"
						}
						if got != want {
							stale.Add(1)
							firstErr.CompareAndSwap(nil, fmt.Sprintf("gen %d worker %d: %s, want %s", g, w, got, want))
						}
					}
				}()
			}
			for g := 1; g <= 40; g++ {
				time.Sleep(20 * time.Millisecond)
				gen.Store(-1)
				writeConfig(t, dir, conf(g))
				if err := r.srv.Reload(ctx); err != nil {
					t.Fatalf("Reload %d: %v", g, err)
				}
				gen.Store(int64(g))
			}
			time.Sleep(20 * time.Millisecond)
			close(stop)
			wg.Wait()
			t.Logf("%d calls, %d failed, %d stale", calls.Load(), fails.Load(), stale.Load())
			if fails.Load() != 0 || stale.Load() != 0 {
				t.Errorf("%d failed, %d went where an earlier reload said; first: %v", fails.Load(), stale.Load(), firstErr.Load())
			}
		})
	}
}

// TestH1RemovedClusterSeriesGo: once a reload removed cluster y and its
// last call ended, no metric series names it any more (its collectors
// withdrawn, its connections closed), for both engines; x's remain.
func TestH1RemovedClusterSeriesGo(t *testing.T) {
	for _, engine := range []string{"frame", "grpc-proxy"} {
		t.Run(engine, func(t *testing.T) {
			_, lnX := serveLive(t, "x")
			_, lnY := serveLive(t, "y")
			conf := `engine: %s
clusters: [{name: x, targets: [%s]}%s]
routes:
%s  - {cluster: x, rate_limit: {rate: 1000}}
`
			dir := t.TempDir()
			path := writeConfig(t, dir, fmt.Sprintf(conf, engine, lnX.Addr(), fmt.Sprintf(", {name: y, targets: [%s], health_check: {interval: 100ms}}", lnY.Addr()),
				"  - {name: to-y, match: {headers: [{name: x-y, present: true}]}, cluster: y, rate_limit: {rate: 1000}}\n"))
			f, err := cluster.LoadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			cfg := f.ServerConfig()
			reg := prometheus.NewRegistry()
			cfg.Metrics = reg
			r := runServer(t, cfg)
			client := dial(t, r.addr)
			ctx := testkit.Context(t, 30*time.Second)
			for _, md := range [][]string{nil, {"x-y", "1"}} {
				if _, err := backendOf(ctx, client, md...); err != nil {
					t.Fatal(err)
				}
			}
			names := func() map[string]bool {
				mfs, err := reg.Gather()
				if err != nil {
					t.Fatalf("Gather: %v", err)
				}
				got := map[string]bool{}
				for _, mf := range mfs {
					for _, m := range mf.GetMetric() {
						for _, l := range m.GetLabel() {
							if l.GetName() == "cluster" || l.GetName() == "route" {
								got[l.GetValue()] = true
							}
						}
					}
				}
				return got
			}
			if got := names(); !got["y"] || !got["to-y"] {
				t.Fatalf("series before the reload name %v, want y and to-y among them", got)
			}
			writeConfig(t, dir, fmt.Sprintf(conf, engine, lnX.Addr(), "", ""))
			if err := r.srv.Reload(ctx); err != nil {
				t.Fatal(err)
			}
			testkit.WaitFor(ctx, t, "y's connection to close", func() bool { return lnY.open.Load() == 0 })
			if _, err := backendOf(ctx, client); err != nil {
				t.Fatal(err)
			}
			got := names()
			if got["y"] || got["to-y"] || !got["x"] {
				t.Errorf("series after the reload name %v; want x and neither y nor to-y", got)
			}
		})
	}
}

// TestH1ReloadKeepsRingHashMapping: a ring_hash cluster rebuilt by a
// reload that changes another of its settings (its ejection) sends each
// key to the backend it went to before: a reload must not move sessions.
func TestH1ReloadKeepsRingHashMapping(t *testing.T) {
	var addrs []string
	for _, n := range []string{"a", "b", "c"} {
		addrs = append(addrs, startBackend(t, n, "127.0.0.1:0").Addr())
	}
	conf := `clusters:
  - {name: s, targets: [%s, %s, %s], policy: ring_hash, hash_header: x-user, ejection: {after: %d}}
routes: [{cluster: s}]
`
	dir := t.TempDir()
	r := runFile(t, writeConfig(t, dir, fmt.Sprintf(conf, addrs[0], addrs[1], addrs[2], 3)), false)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)
	mapping := func() map[string]string {
		m := map[string]string{}
		for i := range 40 {
			key := fmt.Sprintf("user-%d", i)
			got, err := backendOf(ctx, client, "x-user", key)
			if err != nil {
				t.Fatalf("call: %v", err)
			}
			m[key] = got
		}
		return m
	}
	before := mapping()
	writeConfig(t, dir, fmt.Sprintf(conf, addrs[0], addrs[1], addrs[2], 5))
	if err := r.srv.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	after := mapping()
	moved := 0
	for k, v := range before {
		if after[k] != v {
			moved++
		}
	}
	if moved != 0 {
		t.Errorf("%d of %d keys went to another backend after a reload that changed only the ejection", moved, len(before))
	}
}
