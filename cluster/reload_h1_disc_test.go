package cluster_test

import (
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/metadata"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/etcdtest"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/internal/zktest"
	"github.com/streamlb/streamlb/testserver"
)

// TestH1ReloadStormRegistries reloads, 60 times, a file whose etcd:// and
// zk:// clusters (real etcd and ZooKeeper on loopback) are rebuilt at
// each reload (their policy and health checks change), and every fourth
// removed and added back, while calls run on both routes: every call
// ends OK (a rebuilt cluster gets its first set before the swap), and
// the registry clients of the clusters stopped are closed: goroutines and
// file descriptors come back to what one configuration needs.
func TestH1ReloadStormRegistries(t *testing.T) {
	es := etcdtest.Start(t)
	zks := zktest.Start(t)
	ctx := testkit.Context(t, 120*time.Second)
	etcdTarget := "etcd://" + es.Endpoint() + "/kitex/registry-etcd/echo"
	zkTarget := "zk://" + zks.Addr() + "/kitex/echo"
	e1 := startBackend(t, "e1", "127.0.0.1:0")
	z1 := startBackend(t, "z1", "127.0.0.1:0")
	s1 := startBackend(t, "s1", "127.0.0.1:0")
	for _, reg := range []struct {
		target string
		ts     *testserver.Server
	}{{etcdTarget, e1}, {zkTarget, z1}} {
		r, err := testserver.Register(ctx, reg.target, reg.ts.Addr(), testserver.RegisterOptions{TTL: 10 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(r.Abandon)
	}
	conf := func(gen int) string {
		policy := []string{"round_robin", "random"}[gen%2]
		hc := ""
		if gen%3 == 1 {
			hc = ", health_check: {interval: 100ms}"
		}
		regs := fmt.Sprintf("  - {name: e, targets: [%q], policy: %s%s}\n  - {name: z, targets: [%q], policy: %s%s}\n",
			etcdTarget, policy, hc, zkTarget, policy, hc)
		routes := "  - {match: {headers: [{name: x-route, exact: e}]}, cluster: e}\n  - {match: {headers: [{name: x-route, exact: z}]}, cluster: z}\n"
		if gen%4 == 3 {
			regs = ""
			routes = "  - {match: {headers: [{name: x-route, exact: e}]}, cluster: s}\n  - {match: {headers: [{name: x-route, exact: z}]}, cluster: s}\n"
		}
		return fmt.Sprintf("clusters:\n  - {name: s, targets: [%s]}\n%sroutes:\n%s  - {cluster: s}\n", s1.Addr(), regs, routes)
	}
	dir := t.TempDir()
	path := writeConfig(t, dir, conf(0))
	f, err := cluster.LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	r := runServer(t, f.ServerConfig())
	client := dial(t, r.addr)
	for _, want := range []string{"e1", "z1"} {
		testkit.WaitFor(ctx, t, "a call on "+want, func() bool {
			got, err := backendOf(ctx, client, "x-route", want[:1])
			return err == nil && got == want
		})
	}
	time.Sleep(300 * time.Millisecond)
	baseG, baseFD := runtime.NumGoroutine(), fdCount()

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var calls, fails atomic.Int64
	var firstErr atomic.Value
	for _, route := range []string{"e", "z", "s"} {
		for range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				cctx := metadata.AppendToOutgoingContext(ctx, "x-route", route)
				for i := 0; i < 20000; i++ {
					select {
					case <-stop:
						return
					default:
					}
					calls.Add(1)
					if _, err := backendOf(cctx, client); err != nil {
						fails.Add(1)
						firstErr.CompareAndSwap(nil, fmt.Sprintf("route %s: %v", route, err))
					}
				}
			}()
		}
	}
	start := time.Now()
	const reloads = 60
	for gen := 1; gen <= reloads && time.Since(start) < 60*time.Second; gen++ {
		writeConfig(t, dir, conf(gen))
		if err := r.srv.Reload(ctx); err != nil {
			t.Fatalf("Reload %d: %v", gen, err)
		}
	}
	took := time.Since(start)
	close(stop)
	wg.Wait()
	t.Logf("%d reloads in %v; %d calls, %d failed", reloads, took, calls.Load(), fails.Load())
	if fails.Load() != 0 {
		t.Errorf("%d of %d calls failed across the reloads, want 0; first: %v", fails.Load(), calls.Load(), firstErr.Load())
	}
	// gen 60: 60%4 == 0, both registries present, as at the start.
	for _, want := range []string{"e1", "z1"} {
		if got, err := backendOf(ctx, client, "x-route", want[:1]); err != nil || got != want {
			t.Errorf("call on route %s after the reloads: %q, %v; want %s", want[:1], got, err, want)
		}
	}
	var g, fds int
	deadline := time.Now().Add(10 * time.Second)
	for {
		g, fds = runtime.NumGoroutine(), fdCount()
		if g <= baseG+10 && fds <= baseFD+4 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("goroutines %d (before %d), fds %d (before %d)", g, baseG, fds, baseFD)
	if g > baseG+10 {
		t.Errorf("goroutines after the reloads: %d, before them %d", g, baseG)
	}
	if baseFD >= 0 && fds > baseFD+4 {
		t.Errorf("file descriptors after the reloads: %d, before them %d", fds, baseFD)
	}
}
