package cluster_test

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/streamlb/streamlb/internal/etcdtest"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// TestH1ReloadDiscoveryChange: cluster a moves from a static target to
// etcd discovery (the same backend registered, and a second one), then
// to a static target with health checks, three times round, under calls and with
// long bidi calls in flight: no call fails, the long calls run on, and
// the backend set follows each file.
func TestH1ReloadDiscoveryChange(t *testing.T) {
	es := etcdtest.Start(t)
	ctx := testkit.Context(t, 60*time.Second)
	_, ln1 := serveLive(t, "a1")
	a2 := startBackend(t, "a2", "127.0.0.1:0")
	target := "etcd://" + es.Endpoint() + "/kitex/registry-etcd/a"
	for _, addr := range []string{ln1.Addr().String(), a2.Addr()} {
		reg, err := testserver.RegisterEtcd(ctx, target, addr, testserver.RegisterOptions{TTL: 10 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(reg.Abandon)
	}
	files := []string{
		fmt.Sprintf("clusters: [{name: a, targets: [%s]}]\nroutes: [{cluster: a}]\n", ln1.Addr()),
		fmt.Sprintf("clusters: [{name: a, targets: [%q]}]\nroutes: [{cluster: a}]\n", target),
		fmt.Sprintf("clusters: [{name: a, targets: [%s], health_check: {interval: 100ms}}]\nroutes: [{cluster: a}]\n", ln1.Addr()),
	}
	dir := t.TempDir()
	r := runFile(t, writeConfig(t, dir, files[0]), false)
	client := dial(t, r.addr)
	release := make(chan struct{})
	var long []*longCall
	for range 3 {
		long = append(long, startLongCall(ctx, client, release))
	}
	for i, lc := range long {
		if err := <-lc.ready; err != nil {
			t.Fatalf("long call %d: %v", i, err)
		}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var calls, fails atomic.Int64
	var firstErr atomic.Value
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 20000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				calls.Add(1)
				if _, err := backendOf(ctx, client); err != nil {
					fails.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
				}
			}
		}()
	}
	for round := range 3 {
		for i := 1; i <= len(files); i++ {
			f := files[i%len(files)]
			writeConfig(t, dir, f)
			if err := r.srv.Reload(ctx); err != nil {
				t.Fatalf("Reload: %v", err)
			}
			want := map[string]bool{"a1": true}
			if i%len(files) == 1 {
				want["a2"] = true
			}
			seen := map[string]bool{}
			testkit.WaitFor(ctx, t, fmt.Sprintf("round %d file %d: calls on %v", round, i%len(files), want), func() bool {
				got, err := backendOf(ctx, client)
				if err == nil {
					seen[got] = true
				}
				return len(seen) == len(want) && seen["a1"] && (!want["a2"] || seen["a2"])
			})
			for got := range seen {
				if !want[got] {
					t.Errorf("round %d file %d: a call went to %s", round, i%len(files), got)
				}
			}
		}
	}
	close(stop)
	wg.Wait()
	close(release)
	for i, lc := range long {
		if err := <-lc.done; err != nil {
			t.Errorf("long call %d across the reloads: %v", i, err)
		}
	}
	t.Logf("%d calls, %d failed", calls.Load(), fails.Load())
	if fails.Load() != 0 {
		t.Errorf("%d of %d calls failed, want 0; first: %v", fails.Load(), calls.Load(), firstErr.Load())
	}
}
