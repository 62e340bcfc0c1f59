package cluster_test

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// spread makes n EmptyCalls over client, 8 at a time, and counts them by
// the backend that answered; a failed call fails the test.
func spread(ctx context.Context, t *testing.T, client testgrpc.TestServiceClient, n int) map[string]int {
	t.Helper()
	var mu sync.Mutex
	got := map[string]int{}
	var wg sync.WaitGroup
	next := make(chan struct{}, n)
	for range n {
		next <- struct{}{}
	}
	close(next)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range next {
				b, err := backendOf(ctx, client)
				mu.Lock()
				if err != nil {
					got["error: "+err.Error()]++
				} else {
					got[b]++
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	for k, v := range got {
		if strings.HasPrefix(k, "error: ") {
			t.Fatalf("%d of %d calls failed, first: %s", v, n, k)
		}
	}
	return got
}

// fileAccessLog gives cfg a JSON access log in a file of its own, and
// returns the file's path for readAccessLog.
func fileAccessLog(t *testing.T, cfg *cluster.ServerConfig) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "access.log")
	al, err := cluster.OpenAccessLog(path, "json", os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { al.Close() })
	cfg.AccessLog = al
	return path
}

// serveLogged runs a server of the configuration file at path, with
// metrics in a registry of its own and a JSON access log in a file: the
// server, and the log's path for readAccessLog.
func serveLogged(t *testing.T, path string) (running, string) {
	t.Helper()
	f, err := cluster.LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	cfg := f.ServerConfig()
	cfg.Metrics = prometheus.NewRegistry()
	logPath := fileAccessLog(t, &cfg)
	return runServer(t, cfg), logPath
}

// TestWeightedClusters sends 2,000 calls through a route that splits them
// 90/10 between two clusters and gives a third a weight of 0, with each
// engine: the split is 90/10 within a tolerance (4.5 standard deviations
// of the binomial draw), the third cluster gets none, and the access log
// and the metrics name the cluster each call went to. A reload that
// changes the weights to 0/100 sends every later call to the second.
func TestWeightedClusters(t *testing.T) {
	for _, engine := range cluster.Engines() {
		t.Run(engine, func(t *testing.T) {
			a := startBackend(t, "a", "127.0.0.1:0")
			b := startBackend(t, "b", "127.0.0.1:0")
			z := startBackend(t, "z", "127.0.0.1:0")
			dir := t.TempDir()
			conf := func(wa, wb int) string {
				return fmt.Sprintf(`
engine: %s
clusters:
  - {name: users, targets: [%s]}
  - {name: users-canary, targets: [%s]}
  - {name: idle, targets: [%s]}
routes:
  - name: split
    clusters: [{name: users, weight: %d}, {name: users-canary, weight: %d}, {name: idle, weight: 0}]
`, engine, a.Addr(), b.Addr(), z.Addr(), wa, wb)
			}
			r, logPath := serveLogged(t, writeConfig(t, dir, conf(90, 10)))
			client := dial(t, r.addr)
			ctx := testkit.Context(t, 60*time.Second)

			const n = 2000
			got := spread(ctx, t, client, n)
			t.Logf("%d calls split 90/10/0: %v", n, got)
			// 200 ± 4.5 × sqrt(2000 × 0.1 × 0.9) = 200 ± 60.
			if got["b"] < 140 || got["b"] > 260 || got["a"]+got["b"] != n {
				t.Errorf("calls by backend = %v, want b (weight 10 of 100) 140 to 260 and the rest on a", got)
			}
			if got["z"] != 0 || z.Calls() != 0 {
				t.Errorf("backend of the weight-0 cluster got %d calls (counted %d), want 0", got["z"], z.Calls())
			}

			// The access log and the metrics name the cluster drawn.
			var lines []accessLine
			testkit.WaitFor(ctx, t, fmt.Sprintf("%d access-log lines", n), func() bool {
				lines = readAccessLog(t, logPath)
				return len(lines) >= n
			})
			byCluster := map[string]int{}
			for _, l := range lines {
				byCluster[l.Cluster+"/"+l.Backend]++
			}
			want := map[string]int{"users/" + a.Addr(): got["a"], "users-canary/" + b.Addr(): got["b"]}
			if !maps.Equal(byCluster, want) {
				t.Errorf("access-log lines by cluster/backend = %v, want %v", byCluster, want)
			}
			started := scrapeAll(t, r.admin, "streamlb_calls_started_total")
			if started["backend="+a.Addr()+",cluster=users"] != float64(got["a"]) || started["backend="+b.Addr()+",cluster=users-canary"] != float64(got["b"]) {
				t.Errorf("streamlb_calls_started_total = %v, want users/a %d and users-canary/b %d", started, got["a"], got["b"])
			}

			// A reload takes the new weights.
			writeConfig(t, dir, conf(0, 100))
			if err := r.srv.Reload(ctx); err != nil {
				t.Fatalf("Reload: %v", err)
			}
			if got := spread(ctx, t, client, 200); got["b"] != 200 {
				t.Errorf("after the reload to weights 0/100, calls by backend = %v, want all 200 on b", got)
			}
		})
	}
}

// TestWeightedClusterRetries: a call's retries stay in the cluster its
// route drew for it. Cluster x has a backend that answers every call
// UNAVAILABLE (retried for the method) and a good one; cluster y, of the
// same weight, one good backend. Every retry must go to x's good backend:
// drawn again, about half would land on y.
func TestWeightedClusterRetries(t *testing.T) {
	bad := startBackendConfig(t, testserver.Config{Name: "bad", ErrorRate: 1}, "127.0.0.1:0")
	good := startBackend(t, "good", "127.0.0.1:0")
	y := startBackend(t, "y", "127.0.0.1:0")
	r, logPath := serveLogged(t, writeConfig(t, t.TempDir(), fmt.Sprintf(`
clusters:
  - name: x
    targets: [%s, %s]
    ejection: {after: -1}     # bad keeps failing, and keeps being picked
    retry: {retry_on: [/grpc.testing.TestService/EmptyCall], max_retries: 1, budget: 100000}
  - {name: y, targets: [%s]}
routes:
  - clusters: [{name: x, weight: 1}, {name: y, weight: 1}]
`, bad.Addr(), good.Addr(), y.Addr())))
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 60*time.Second)

	const n = 400
	got := spread(ctx, t, client, n) // no call may fail: each failure is retried on good
	var lines []accessLine
	testkit.WaitFor(ctx, t, fmt.Sprintf("%d access-log lines", n), func() bool {
		lines = readAccessLog(t, logPath)
		return len(lines) >= n
	})
	retried, elsewhere := 0, 0
	for _, l := range lines {
		if l.Retries == 0 {
			continue
		}
		retried++
		if l.Cluster != "x" || l.Backend != good.Addr() {
			elsewhere++
		}
	}
	t.Logf("%d calls: %v by backend, %d retried (bad answered %d)", n, got, retried, bad.Calls())
	if retried < 20 || int64(retried) != bad.Calls() {
		t.Fatalf("%d calls retried, bad answered %d; want the same, and at least 20 for the test to mean something", retried, bad.Calls())
	}
	if elsewhere != 0 {
		t.Errorf("%d of %d retries left cluster x (or its good backend), want 0", elsewhere, retried)
	}
	if got["y"] != int(y.Calls()) || got["good"] != int(good.Calls()) {
		t.Errorf("answers by backend %v; backends counted y %d, good %d: some retry went to y", got, y.Calls(), good.Calls())
	}
}
