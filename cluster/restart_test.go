package cluster_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// TestRollingRestartThroughWiring restarts every backend, one at a time,
// the way Kubernetes does (graceful stop, a new process on the same
// address half a second later), under continuous load over ONE client
// connection, through the same wiring the proxy command uses, metrics on.
// No call may fail and no backend may stay ejected.
func TestRollingRestartThroughWiring(t *testing.T) {
	if testing.Short() {
		t.Skip("load run")
	}
	ctx := testkit.Context(t, 90*time.Second)
	var targets []string
	var backends []*testserver.Server
	for i := range 3 {
		ts := startBackend(t, fmt.Sprintf("b%d", i), "127.0.0.1:0")
		backends = append(backends, ts)
		targets = append(targets, ts.Addr())
	}
	r := runServer(t, cluster.ServerConfig{Metrics: prometheus.NewRegistry(), Cluster: cluster.Config{Targets: targets}})
	client := dial(t, r.addr)

	var total, failed atomic.Int64
	var errMu sync.Mutex
	errs := map[string]int{}
	loadCtx, stopLoad := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for i := 0; i < 100000 && loadCtx.Err() == nil; i++ {
				cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				_, err := client.EmptyCall(cctx, &testgrpc.Empty{})
				cancel()
				total.Add(1)
				if err != nil {
					failed.Add(1)
					errMu.Lock()
					errs[err.Error()]++
					errMu.Unlock()
				}
			}
		})
	}
	testkit.WaitFor(ctx, t, "load on every backend", func() bool {
		for _, b := range backends {
			if b.Calls() < 20 {
				return false
			}
		}
		return true
	})
	pause := func(d time.Duration) {
		select {
		case <-ctx.Done():
		case <-time.After(d):
		}
	}
	var restarted []*testserver.Server
	for i, old := range backends {
		addr := old.Addr()
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if err := old.Shutdown(sctx); err != nil {
			t.Errorf("graceful stop of %s: %v", old.Name(), err)
		}
		cancel()
		pause(500 * time.Millisecond)
		restarted = append(restarted, startBackend(t, fmt.Sprintf("b%d-new", i), addr))
		pause(700 * time.Millisecond)
	}
	testkit.WaitFor(ctx, t, "the restarted backends to serve", func() bool {
		for _, b := range restarted {
			if b.Calls() < 20 {
				return false
			}
		}
		return true
	})
	stopLoad()
	wg.Wait()
	t.Logf("rolling restart through cluster.Server: %d of %d calls failed", failed.Load(), total.Load())
	for msg, n := range errs {
		t.Logf("  %d× %s", n, msg)
	}
	if failed.Load() != 0 {
		t.Errorf("%d calls failed during a rolling restart, want 0", failed.Load())
	}
	for _, b := range r.srv.Cluster().Backends() {
		if b.Ejected {
			t.Errorf("backend %s ejected after a clean rolling restart", b.Addr)
		}
	}
}
