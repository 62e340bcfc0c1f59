package cluster_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// hangHealth makes a backend's health checks hang until the checker gives
// up (its timeout), as a backend that accepts connections and no longer
// answers does, while *hang is true.
func hangHealth(hang *atomic.Bool) grpc.ServerOption {
	return grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if info.FullMethod == "/grpc.health.v1.Health/Check" && hang.Load() {
			<-ctx.Done()
			return nil, status.FromContextError(ctx.Err()).Err()
		}
		return handler(ctx, req)
	})
}

// TestH1ReloadKeepsHealthVerdict: backend b of cluster x fails every
// call UNAVAILABLE and its health checks time out, so they have taken it
// out of the picks; calls all go to a and succeed. A reload then changes
// one setting of x (its policy) and nothing about b or the checks. The
// rebuilt cluster starts b healthy again ("a new backend is healthy until
// a check says otherwise"), though the proxy knew it was not, and calls
// fail on b until the first check times out again: a reload of an
// unrelated setting fails calls. Ejection is off to show the health
// verdict alone. Once b answers its checks again, the rebuilt cluster's
// checks bring it back.
func TestH1ReloadKeepsHealthVerdict(t *testing.T) {
	a := startBackend(t, "a", "127.0.0.1:0")
	var hang atomic.Bool
	hang.Store(true)
	b := startBackendConfig(t, testserver.Config{Name: "b", ErrorRate: 1,
		ServerOptions: []grpc.ServerOption{hangHealth(&hang)}}, "127.0.0.1:0")
	dir := t.TempDir()
	conf := `clusters:
  - name: x
    targets: [%s, %s]
    policy: %s
    health_check: {interval: 100ms, timeout: 500ms, unhealthy_threshold: 1}
    ejection: {after: -1}
routes: [{cluster: x}]
`
	path := writeConfig(t, dir, fmt.Sprintf(conf, a.Addr(), b.Addr(), "round_robin"))
	r := runFile(t, path, false)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)
	unhealthy := func() bool {
		for _, be := range r.srv.Clusters()[0].Backends() {
			if be.Addr == b.Addr() {
				return !be.Healthy
			}
		}
		return false
	}
	testkit.WaitFor(ctx, t, "b unhealthy", unhealthy)
	calls := func() int { return failedOf20(ctx, t, client) }
	if n := calls(); n != 0 {
		t.Fatalf("%d of 20 calls failed before the reload, want 0 (b is out of the picks)", n)
	}
	writeConfig(t, dir, fmt.Sprintf(conf, a.Addr(), b.Addr(), "random"))
	if err := r.srv.Reload(ctx); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	n := calls()
	t.Logf("after the reload: b unhealthy %v, %d of 20 calls failed", unhealthy(), n)
	if n != 0 {
		t.Errorf("%d of 20 calls right after a reload that changed only x's policy failed on b, which the health checks had taken out; want 0", n)
	}
	hang.Store(false)
	testkit.WaitFor(ctx, t, "b healthy again once it answers its checks", func() bool { return !unhealthy() })
}

// TestH1ReloadKeepsEjection: backend b of cluster x fails every call
// UNAVAILABLE; outlier detection ejects it after 2 in a row, for 30s,
// and calls then all go to a. A reload changes only x's policy: the
// rebuilt cluster starts b unejected, and calls fail on it until it has
// been ejected again. No health checks.
func TestH1ReloadKeepsEjection(t *testing.T) {
	a := startBackend(t, "a", "127.0.0.1:0")
	b := startBackendConfig(t, testserver.Config{Name: "b", ErrorRate: 1}, "127.0.0.1:0")
	dir := t.TempDir()
	conf := `clusters:
  - name: x
    targets: [%s, %s]
    policy: %s
    ejection: {after: 2, base: 30s}
routes: [{cluster: x}]
`
	path := writeConfig(t, dir, fmt.Sprintf(conf, a.Addr(), b.Addr(), "round_robin"))
	r := runFile(t, path, false)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)
	ejected := func() bool {
		for _, be := range r.srv.Clusters()[0].Backends() {
			if be.Addr == b.Addr() {
				return be.Ejected
			}
		}
		return false
	}
	testkit.WaitFor(ctx, t, "b ejected", func() bool {
		backendOf(ctx, client)
		return ejected()
	})
	calls := func() int { return failedOf20(ctx, t, client) }
	if n := calls(); n != 0 {
		t.Fatalf("%d of 20 calls failed before the reload, want 0 (b is ejected)", n)
	}
	writeConfig(t, dir, fmt.Sprintf(conf, a.Addr(), b.Addr(), "random"))
	if err := r.srv.Reload(ctx); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	n := calls()
	t.Logf("after the reload: b ejected %v, %d of 20 calls failed", ejected(), n)
	if n != 0 {
		t.Errorf("%d of 20 calls right after a reload that changed only x's policy failed on b, which outlier detection had ejected for 30s; want 0", n)
	}
}

// failedOf20 makes 20 calls through client and returns how many failed,
// each of which must have failed UNAVAILABLE.
func failedOf20(ctx context.Context, t *testing.T, client testgrpc.TestServiceClient) (failed int) {
	t.Helper()
	for range 20 {
		if _, err := backendOf(ctx, client); err != nil {
			if status.Code(err) != codes.Unavailable {
				t.Fatalf("call: %v", err)
			}
			failed++
		}
	}
	return failed
}
