package cluster_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// TestH1RetryAfterRouteRemoved: calls in flight on a backend that fails
// them UNAVAILABLE after 300ms, retryable, while a reload removes the
// only route that takes them. The retry finds no route; the client must
// still get the backend's own answer, not the UNIMPLEMENTED of a call
// that was never routed.
func TestH1RetryAfterRouteRemoved(t *testing.T) {
	a1 := startBackendConfig(t, testserver.Config{Name: "a1", Latency: 300 * time.Millisecond, ErrorRate: 1}, "127.0.0.1:0")
	a2 := startBackend(t, "a2", "127.0.0.1:0")
	dir := t.TempDir()
	conf := `proxy: {retry_on: [grpc.testing.TestService/EmptyCall], max_retries: 2}
clusters: [{name: a, targets: [%s, %s], ejection: {after: -1}}]
routes:
  - {match: {service: %s}, cluster: a}
`
	path := writeConfig(t, dir, fmt.Sprintf(conf, a1.Addr(), a2.Addr(), "grpc.testing.TestService"))
	r := runFile(t, path, false)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 20*time.Second)
	res := make(chan error, 4)
	for range 4 {
		go func() {
			_, err := client.EmptyCall(ctx, &testgrpc.Empty{})
			res <- err
		}()
	}
	// All four routed and on a backend (a1 holds its for 300ms) before
	// the route goes: a call that started after would rightly find none.
	testkit.WaitFor(ctx, t, "the calls on a1 and a2", func() bool { return a1.InFlight() >= 1 && a1.Calls()+a2.Calls() == 4 })
	writeConfig(t, dir, fmt.Sprintf(conf, a1.Addr(), a2.Addr(), "other.v1.Other"))
	if err := r.srv.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	failed := 0
	for range 4 {
		err := <-res
		t.Logf("call: %v", status.Convert(err))
		switch st := status.Convert(err); {
		case st.Code() == codes.OK:
		case st.Code() == codes.Unavailable && strings.Contains(st.Message(), "injected failure"):
			failed++
		default:
			t.Errorf("call in flight across the reload: %v, want OK or a1's own UNAVAILABLE", st)
		}
	}
	if failed == 0 {
		t.Errorf("no call was on a1 when the route went: the test did not test anything")
	}
}

// TestH1GRPCProxyRemovedClusterLongCall: with engine grpc-proxy, a
// reload removes the cluster a long bidi call runs on. The README
// (Reload, and the drain_timeout row of the field table): removed
// clusters "carry the calls in flight to their end, however long ... no
// drain timeout applies"; drain_timeout bounds calls to a backend that
// left a cluster's set, "not calls in flight on a cluster a reload
// replaced or removed". The frame engine keeps the call
// (TestReloadKeepsLongCalls); this engine cuts it when drain_timeout
// (1s) passes, with "draining because the backend left the set".
func TestH1GRPCProxyRemovedClusterLongCall(t *testing.T) {
	_, lnA := serveLive(t, "a")
	_, lnB := serveLive(t, "b")
	dir := t.TempDir()
	both := fmt.Sprintf(`engine: grpc-proxy
drain_timeout: 1s
clusters:
  - {name: a, targets: [%s]}
  - {name: b, targets: [%s]}
routes:
  - {match: {headers: [{name: x-route, exact: b}]}, cluster: b}
  - {cluster: a}
`, lnA.Addr(), lnB.Addr())
	r := runFile(t, writeConfig(t, dir, both), false)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)
	release := make(chan struct{})
	lc := startLongCall(ctx, client, release, "x-route", "b")
	if err := <-lc.ready; err != nil {
		t.Fatal(err)
	}
	writeConfig(t, dir, fmt.Sprintf("engine: grpc-proxy\ndrain_timeout: 1s\nclusters: [{name: a, targets: [%s]}]\nroutes: [{cluster: a}]\n", lnA.Addr()))
	if err := r.srv.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	// Outlive the drain timeout by half of it: what the call must
	// survive.
	time.Sleep(1500 * time.Millisecond)
	select {
	case err := <-lc.done:
		t.Fatalf("long call on the removed cluster b ended %v after the reload: %v; want it to run to its end", 1500*time.Millisecond, err)
	default:
	}
	close(release)
	if err := <-lc.done; err != nil {
		t.Fatal(err)
	}
	// Its connection closes after its last call; a's is kept.
	testkit.WaitFor(ctx, t, "b's connection to close after its last call", func() bool { return lnB.open.Load() == 0 })
	if got, err := backendOf(ctx, client); err != nil || got != "a" {
		t.Errorf("call after the reload: %q, %v; want a", got, err)
	}
	if a := lnA.open.Load(); a != 1 {
		t.Errorf("a's backend connections: %d, want 1", a)
	}
}

// TestH1ReloadDuringShutdown: a reload that removes and adds clusters
// while the server drains (shutdown, drain_timeout 1s) with long calls on
// both clusters: the shutdown still bounds every call by drain_timeout,
// including those of the cluster the reload removed, whose calls
// otherwise have no drain timeout; Run returns and the calls end.
func TestH1ReloadDuringShutdown(t *testing.T) {
	for _, engine := range []string{"frame", "grpc-proxy"} {
		t.Run(engine, func(t *testing.T) {
			_, lnA := serveLive(t, "a")
			_, lnB := serveLive(t, "b")
			dir := t.TempDir()
			both := fmt.Sprintf(`engine: %s
drain_timeout: 1s
clusters:
  - {name: a, targets: [%s]}
  - {name: b, targets: [%s]}
routes:
  - {match: {headers: [{name: x-route, exact: b}]}, cluster: b}
  - {cluster: a}
`, engine, lnA.Addr(), lnB.Addr())
			path := writeConfig(t, dir, both)
			f, err := cluster.LoadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			r, ran, stop := runServerStop(t, f.ServerConfig())
			client := dial(t, r.addr)
			ctx := testkit.Context(t, 30*time.Second)
			release := make(chan struct{})
			defer close(release)
			lcB := startLongCall(ctx, client, release, "x-route", "b")
			lcA := startLongCall(ctx, client, release)
			for _, lc := range []*longCall{lcA, lcB} {
				if err := <-lc.ready; err != nil {
					t.Fatal(err)
				}
			}
			start := time.Now()
			stop()
			time.Sleep(100 * time.Millisecond)
			writeConfig(t, dir, fmt.Sprintf("engine: %s\ndrain_timeout: 1s\nclusters: [{name: c, targets: [%s]}]\nroutes: [{cluster: c}]\n", engine, lnA.Addr()))
			rctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			err = r.srv.Reload(rctx)
			cancel()
			t.Logf("Reload during drain: %v", err)
			select {
			case err := <-ran:
				t.Logf("Run returned %v after %v", err, time.Since(start))
				if err != nil {
					t.Errorf("Run = %v, want nil", err)
				}
			case <-time.After(5 * time.Second):
				t.Fatalf("Run still running 5s after shutdown with drain_timeout 1s")
			}
			for _, lc := range []*longCall{lcA, lcB} {
				select {
				case err := <-lc.done:
					t.Logf("long call: %v", err)
					if err == nil {
						t.Errorf("long call ended OK, want it cut by the shutdown (it was never released)")
					}
				case <-time.After(2 * time.Second):
					t.Errorf("long call still running after Run returned")
				}
			}
		})
	}
}
