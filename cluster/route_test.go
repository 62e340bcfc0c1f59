package cluster_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// writeFile writes a configuration file into dir and returns its path.
func writeConfig(t *testing.T, dir, text string) string {
	t.Helper()
	path := filepath.Join(dir, "streamlb.yaml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// runFile runs a server for the configuration file at path.
func runFile(t *testing.T, path string, metrics bool) running {
	t.Helper()
	f, err := cluster.LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	cfg := f.ServerConfig()
	if metrics {
		cfg.Metrics = prometheus.NewRegistry()
	}
	return runServer(t, cfg)
}

// backendOf makes one EmptyCall and returns the backend that answered.
func backendOf(ctx context.Context, client testgrpc.TestServiceClient, md ...string) (string, error) {
	var hdr metadata.MD
	if len(md) > 0 {
		ctx = metadata.AppendToOutgoingContext(ctx, md...)
	}
	_, err := client.EmptyCall(ctx, &testgrpc.Empty{}, grpc.Header(&hdr))
	return testserver.BackendFromHeader(hdr), err
}

// TestRoutes sends calls by service, method prefix and header to their
// clusters, and checks the backends' own counters.
func TestRoutes(t *testing.T) {
	a := startBackend(t, "a", "127.0.0.1:0")
	b := startBackend(t, "b", "127.0.0.1:0")
	c := startBackend(t, "c", "127.0.0.1:0")
	path := writeConfig(t, t.TempDir(), fmt.Sprintf(`
clusters:
  - {name: gold, targets: [%s]}
  - {name: unary, targets: [%s]}
  - {name: rest, targets: [%s]}
routes:
  - match:
      headers: [{name: x-tenant, exact: gold}]
    cluster: gold
  - match: {headers: [{name: x-canary, present: true}], service: grpc.testing.TestService}
    cluster: gold
  - match: {method_prefix: grpc.testing.TestService/Unary}
    cluster: unary
  - match: {service: grpc.testing.TestService}
    cluster: rest
  - match: {service: grpc.health.v1.Health}
    cluster: unary
`, a.Addr(), b.Addr(), c.Addr()))
	r := runFile(t, path, false)
	cc := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)

	for _, tc := range []struct {
		name string
		md   []string
		want string
	}{
		{name: "header exact", md: []string{"x-tenant", "gold"}, want: "a"},
		{name: "header present", md: []string{"x-canary", ""}, want: "a"},
		{name: "header other value", md: []string{"x-tenant", "silver"}, want: "c"},
		{name: "service", want: "c"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for range 5 {
				got, err := backendOf(ctx, cc, tc.md...)
				if err != nil || got != tc.want {
					t.Fatalf("EmptyCall with %q went to %q (err %v), want %q", tc.md, got, err, tc.want)
				}
			}
		})
	}
	before := b.MethodCalls(testgrpc.TestService_UnaryCall_FullMethodName)
	for range 5 {
		var hdr metadata.MD
		if _, err := cc.UnaryCall(ctx, &testgrpc.SimpleRequest{}, grpc.Header(&hdr)); err != nil {
			t.Fatal(err)
		}
		if got := testserver.BackendFromHeader(hdr); got != "b" {
			t.Errorf("UnaryCall went to %q, want b (method prefix route)", got)
		}
	}
	if got := b.MethodCalls(testgrpc.TestService_UnaryCall_FullMethodName) - before; got != 5 {
		t.Errorf("backend b counted %d UnaryCalls, want 5", got)
	}
	if a.Calls() != 10 || c.Calls() != 10 {
		t.Errorf("backends a, c counted %d, %d calls, want 10, 10", a.Calls(), c.Calls())
	}
	// Another service, through its own route; one with no route.
	conn, err := grpc.NewClient("passthrough:///"+r.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Errorf("health Check through its route: %v", err)
	}
	err = conn.Invoke(ctx, "/no.Such/Method", &testgrpc.Empty{}, &testgrpc.Empty{})
	if status.Code(err) != codes.Unimplemented || !strings.Contains(err.Error(), "no route") {
		t.Errorf("call with no route = %v, want UNIMPLEMENTED no route", err)
	}
}

// TestReloadUnderLoad swaps the route table three times while calls run
// over one client connection: no call may fail, and no call started after
// a reload goes to a cluster older than that reload's. Each reload
// replaces the default cluster (a, then b, then c), so calls in flight
// finish on a stopped cluster; the cluster "keep" is the same each time
// and must survive as it was.
func TestReloadUnderLoad(t *testing.T) {
	names := []string{"a", "b", "c"}
	var addrs []string
	for _, n := range names {
		addrs = append(addrs, startBackend(t, n, "127.0.0.1:0").Addr())
	}
	k := startBackend(t, "k", "127.0.0.1:0")
	dir := t.TempDir()
	conf := func(gen int) string {
		return fmt.Sprintf(`
clusters:
  - {name: gen%d, targets: [%s]}
  - {name: keep, targets: [%s], ejection: {after: 3}}
routes:
  - {match: {headers: [{name: x-keep, present: true}]}, cluster: keep}
  - {cluster: gen%d}
`, gen, addrs[gen], k.Addr(), gen)
	}
	path := writeConfig(t, dir, conf(0))
	r := runFile(t, path, true)
	keepDir := r.srv.Clusters()[0].Director()
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 60*time.Second)

	const workers = 8
	const maxCalls = 30000
	var calls, failures, stale atomic.Int64
	var gen atomic.Int64 // the last reload finished
	var firstErr atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for calls.Load() < maxCalls {
				select {
				case <-stop:
					return
				default:
				}
				g := gen.Load()
				// x-delay keeps calls in flight across each swap.
				got, err := backendOf(ctx, client, "x-delay", "2ms")
				calls.Add(1)
				if err != nil {
					failures.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				// Started after reload g: picked from generation g, or
				// from g+1 if the next swap came first.
				if got != names[g] && (int(g)+1 >= len(names) || got != names[g+1]) {
					stale.Add(1)
				}
			}
		}()
	}
	for g := 1; g < len(names); g++ {
		at := calls.Load()
		testkit.WaitFor(ctx, t, "load between reloads", func() bool { return calls.Load() > at+300 })
		writeConfig(t, dir, conf(g))
		if err := r.srv.Reload(ctx); err != nil {
			t.Fatalf("Reload: %v", err)
		}
		gen.Store(int64(g))
	}
	at := calls.Load()
	testkit.WaitFor(ctx, t, "load after the reloads", func() bool { return calls.Load() > at+300 })
	close(stop)
	wg.Wait()
	t.Logf("reload under load, 2 reloads: %d calls, %d failures, %d on a cluster older than the last reload",
		calls.Load(), failures.Load(), stale.Load())
	if failures.Load() != 0 {
		t.Errorf("%d of %d calls failed across the reloads, want 0; first: %v", failures.Load(), calls.Load(), firstErr.Load())
	}
	if stale.Load() != 0 {
		t.Errorf("%d calls went to a cluster a finished reload had replaced, want 0", stale.Load())
	}
	var kept *cluster.Cluster
	for _, c := range r.srv.Clusters() {
		if c.Name() == "keep" {
			kept = c
		}
	}
	if kept == nil || kept.Director() != keepDir {
		t.Errorf("cluster keep after the reloads = %v, want the same director as before", kept)
	}
	if got, err := backendOf(ctx, client, "x-keep", "1"); err != nil || got != "k" {
		t.Errorf("call routed to keep went to %q (%v), want k", got, err)
	}
}

// TestReloadInvalidChangesNothing rejects a broken file and a file with
// an unknown cluster, and keeps routing as before.
func TestReloadInvalidChangesNothing(t *testing.T) {
	a := startBackend(t, "a", "127.0.0.1:0")
	dir := t.TempDir()
	good := fmt.Sprintf("clusters: [{name: a, targets: [%s]}]\nroutes:\n  - {cluster: a}\n", a.Addr())
	path := writeConfig(t, dir, good)
	r := runFile(t, path, true)
	before := r.srv.Clusters()[0]
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)
	for _, bad := range []string{
		"clusters: [{name: a, targets: [x]}]\nroutes: [{cluster: b}]\n",
		good + "bogus: 1\n",
		// Valid, but the data plane hands Pick no x-new header.
		strings.Replace(good, "  - {cluster: a}", "  - {cluster: a, match: {headers: [{name: x-new, present: true}]}}", 1),
	} {
		writeConfig(t, dir, bad)
		err := r.srv.Reload(ctx)
		if err == nil {
			t.Errorf("Reload of %q = nil, want an error", bad)
		}
		t.Logf("rejected: %v", err)
		if got := r.srv.Clusters(); len(got) != 1 || got[0] != before {
			t.Errorf("clusters after a rejected reload = %v, want the same one", got)
		}
		if got, err := backendOf(ctx, client); err != nil || got != "a" {
			t.Errorf("call after a rejected reload went to %q (%v), want a", got, err)
		}
	}
}

// TestReloadOnFileChange edits the file and waits for the poll to apply it.
func TestReloadOnFileChange(t *testing.T) {
	a := startBackend(t, "a", "127.0.0.1:0")
	b := startBackend(t, "b", "127.0.0.1:0")
	dir := t.TempDir()
	conf := "clusters: [{name: x, targets: [%s]}]\nroutes: [{cluster: x}]\n"
	path := writeConfig(t, dir, fmt.Sprintf(conf, a.Addr()))
	r := runFile(t, path, false)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)
	if got, err := backendOf(ctx, client); got != "a" {
		t.Fatalf("first call went to %q (%v), want a", got, err)
	}
	writeConfig(t, dir, fmt.Sprintf(conf, b.Addr()))
	testkit.WaitFor(ctx, t, "calls to go to b", func() bool {
		got, _ := backendOf(ctx, client)
		return got == "b"
	})
}

// TestRateLimit sends calls as fast as one connection allows for a while
// and checks that about rate×time+burst got through, the rest failing at
// once with RESOURCE_EXHAUSTED, counted in the metrics.
func TestRateLimit(t *testing.T) {
	if testing.Short() {
		t.Skip("runs for 2s")
	}
	a := startBackend(t, "a", "127.0.0.1:0")
	const rate, burst = 50, 20
	path := writeConfig(t, t.TempDir(), fmt.Sprintf(`
clusters: [{name: a, targets: [%s]}]
routes:
  - {name: limited, match: {method_prefix: /grpc.testing.TestService/Empty}, cluster: a, rate_limit: {rate: %d, burst: %d}}
  - {cluster: a}
`, a.Addr(), rate, burst))
	r := runFile(t, path, true)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)
	if _, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{}); err != nil {
		t.Fatalf("warm-up call: %v", err) // opens the connections, outside the limit
	}
	const d = 2 * time.Second
	var ok, limited, other atomic.Int64
	var lastStart atomic.Int64 // since start, of the last call made
	start := time.Now()
	var wg sync.WaitGroup
	// Enough callers that one is always asking: tokens that come while
	// every caller waits on an admitted call overflow the bucket, and on
	// a loaded machine 4 callers let about a quarter of them go (113 of
	// 154 admitted at a load average of 20).
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; time.Since(start) < d && n < 5000; n++ {
				lastStart.Store(int64(time.Since(start)))
				_, err := client.EmptyCall(ctx, &testgrpc.Empty{})
				switch status.Code(err) {
				case codes.OK:
					ok.Add(1)
				case codes.ResourceExhausted:
					limited.Add(1)
				default:
					other.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	// The calls reached the proxy between start and the end of the last
	// one; the bucket was asked until the last was made. Tokens that came
	// after that were not asked for (the last calls may take a while to
	// end on a loaded machine), and a call made before it may have
	// arrived later.
	asked, ended := time.Duration(lastStart.Load()), time.Since(start)
	low, high := rate*asked.Seconds()+burst, rate*ended.Seconds()+burst
	t.Logf("rate limit %d/s burst %d, calls made over %v, ended after %v: %d admitted (want %.0f to %.0f), %d rejected", rate, burst, asked, ended, ok.Load(), low, high, limited.Load())
	if got := float64(ok.Load()); got < low*0.9 || got > high*1.1+1 {
		t.Errorf("admitted %v calls, want %.0f to %.0f ± 10%%", got, low, high)
	}
	if limited.Load() == 0 || other.Load() != 0 {
		t.Errorf("%d rejected with RESOURCE_EXHAUSTED and %d otherwise, want >0 and 0", limited.Load(), other.Load())
	}
	if got := scrape(t, r.admin, "streamlb_route_rate_limited_total")["route=limited"]; got != float64(limited.Load()) {
		t.Errorf("streamlb_route_rate_limited_total = %v, want %d", got, limited.Load())
	}
	// The route without a limit is not limited.
	for range 100 {
		if _, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{}); err != nil {
			t.Fatalf("UnaryCall on the unlimited route: %v", err)
		}
	}
}

// TestFileAccessLogAndMetrics: with a configuration file, each call's
// access-log line names the cluster its route chose, and each cluster's
// metrics count its own backends' calls.
func TestFileAccessLogAndMetrics(t *testing.T) {
	a, b, path := twoClusterFile(t)
	f, err := cluster.LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	cfg := f.ServerConfig()
	cfg.Metrics = prometheus.NewRegistry()
	var logs syncBuffer
	cfg.AccessLog = cluster.NewAccessLog(slog.NewJSONHandler(&logs, nil))
	r := runServer(t, cfg)
	cc := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)
	for range 3 {
		if _, err := backendOf(ctx, cc, "x-tenant", "gold"); err != nil {
			t.Fatal(err)
		}
	}
	for range 2 {
		if _, err := backendOf(ctx, cc); err != nil {
			t.Fatal(err)
		}
	}
	want := map[string]int{"gold": 3, "rest": 2}
	testkit.WaitFor(ctx, t, "5 access-log lines", func() bool { return strings.Count(logs.String(), "\n") >= 5 })
	got := map[string]int{}
	for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		var rec struct {
			Cluster string `json:"cluster"`
			Backend string `json:"backend"`
		}
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("access-log line %q: %v", line, err)
		}
		got[rec.Cluster]++
	}
	if !maps.Equal(got, want) {
		t.Errorf("access-log lines by cluster = %v, want %v", got, want)
	}
	started := scrapeAll(t, r.admin, "streamlb_calls_started_total")
	if started["backend="+a.Addr()+",cluster=gold"] != 3 || started["backend="+b.Addr()+",cluster=rest"] != 2 {
		t.Errorf("streamlb_calls_started_total = %v, want gold/a 3 and rest/b 2", started)
	}
}

// twoClusterFile starts backends a and b and writes a configuration file
// with a cluster for each: "gold" for calls with x-tenant: gold, "rest"
// for the other TestService calls.
func twoClusterFile(t *testing.T) (a, b *testserver.Server, path string) {
	t.Helper()
	a = startBackend(t, "a", "127.0.0.1:0")
	b = startBackend(t, "b", "127.0.0.1:0")
	path = writeConfig(t, t.TempDir(), fmt.Sprintf(`
clusters:
  - {name: gold, targets: [%s]}
  - {name: rest, targets: [%s]}
routes:
  - match: {headers: [{name: x-tenant, exact: gold}]}
    cluster: gold
  - match: {service: grpc.testing.TestService}
    cluster: rest
`, a.Addr(), b.Addr()))
	return a, b, path
}
