package proxy_test

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"

	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/resolver"
	"github.com/streamlb/streamlb/testserver"
)

// spread sends n EmptyCalls at concurrency conc over the env's one client
// connection and counts them per backend name.
func spread(t *testing.T, e *env, n, conc int, md func(i int) metadata.MD) map[string]int {
	t.Helper()
	ctx := testkit.Context(t, 60*time.Second)
	var mu sync.Mutex
	count := map[string]int{}
	var g errgroup.Group
	g.SetLimit(conc)
	for i := range n {
		g.Go(func() error {
			cctx := ctx
			if md != nil {
				cctx = metadata.NewOutgoingContext(ctx, md(i))
			}
			var hdr metadata.MD
			if _, err := e.client.EmptyCall(cctx, &testgrpc.Empty{}, grpc.Header(&hdr)); err != nil {
				return err
			}
			mu.Lock()
			count[testserver.BackendFromHeader(hdr)]++
			mu.Unlock()
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	return count
}

// TestPeakEWMAAvoidsSlowBackend: a backend 100 ms slower than its
// siblings gets clearly less traffic under peak_ewma than under
// least_request, the baseline measured in the same run.
//
// The calls go one at a time, so the in-flight counts are all 0 at every
// pick and least_request, blind to latency, spreads them evenly: only the
// latency estimate can keep peak_ewma off the slow backend. (With calls
// in parallel the slow backend's in-flight count alone keeps
// least_request off it, and the test could not tell the two apart.) The
// decay is short beside the test's few seconds, so that one peak on a
// fast backend of a loaded machine, which peak_ewma takes at once, is
// forgotten within the test rather than send the calls to the slow
// backend for the rest of it; and 100 ms is far above what load adds to
// the fast backends' latency.
func TestPeakEWMAAvoidsSlowBackend(t *testing.T) {
	verifyNoLeaks(t)
	share := func(policy string, n int) (slow, fast float64) {
		t.Helper()
		e := newEnv(t, envOpts{policy: policy,
			dcfg: func(c *director.Config) { c.EWMADecay = 250 * time.Millisecond },
			tscfg: func(i int, c *testserver.Config) {
				if i == 0 {
					c.Latency = 100 * time.Millisecond
				}
			}})
		count := spread(t, e, n, 1, nil)
		pct := func(b string) float64 { return float64(count[b]) / float64(n) * 100 }
		t.Logf("%s shares: slow b0 %.1f%%, fast b1 %.1f%% b2 %.1f%%", policy, pct("b0"), pct("b1"), pct("b2"))
		return pct("b0"), (pct("b1") + pct("b2")) / 2
	}
	baseline, _ := share(director.LeastRequest, 150) // about 33%
	slow, fast := share(director.PeakEWMA, 600)
	if slow > fast/3 {
		t.Errorf("slow backend got %.1f%%, fast ones %.1f%% each: want the slow one well below a third of a fast one's share", slow, fast)
	}
	if slow > baseline/4 {
		t.Errorf("slow backend got %.1f%% under peak_ewma, %.1f%% under least_request: want well below a quarter of that", slow, baseline)
	}
}

// TestWeightedShares: static weights 1, 2 and 3 give shares within ±3
// points of 1/6, 2/6 and 3/6.
func TestWeightedShares(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{policy: director.WeightedRoundRobin})
	var st resolver.State
	for i, b := range e.backends {
		st.Addresses = append(st.Addresses, resolver.Address{Addr: b.Addr(), Weight: uint32(i + 1)})
	}
	if err := e.dir.UpdateState(st); err != nil {
		t.Fatal(err)
	}
	const n = 3000
	count := spread(t, e, n, 20, nil)
	for i, b := range e.backends {
		got := float64(count[b.Name()]) / n * 100
		want := float64(i+1) / 6 * 100
		t.Logf("weight %d: %.1f%% (want %.1f%%)", i+1, got, want)
		if got < want-3 || got > want+3 {
			t.Errorf("backend %s with weight %d got %.1f%%, want %.1f±3%%", b.Name(), i+1, got, want)
		}
	}
}

// TestRingHashAffinity: the same x-user lands on the same backend, and
// adding a backend moves only some users, all to the new one.
func TestRingHashAffinity(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 4, policy: director.RingHash,
		dcfg: func(c *director.Config) { c.HashHeader = "x-user" },
		pcfg: func(c *proxy.Config) { c.PickMetadata = []string{"x-user"} },
	})
	addrs := []string{e.backends[0].Addr(), e.backends[1].Addr(), e.backends[2].Addr()}
	e.setBackends(addrs...)
	ctx := testkit.Context(t, 30*time.Second)
	const users = 200
	where := func() map[string]string {
		m := map[string]string{}
		for u := range users {
			user := fmt.Sprintf("user-%d", u)
			for range 2 { // twice: the second call must agree with the first
				var hdr metadata.MD
				if _, err := e.client.EmptyCall(metadata.AppendToOutgoingContext(ctx, "x-user", user), &testgrpc.Empty{}, grpc.Header(&hdr)); err != nil {
					t.Fatal(err)
				}
				got := testserver.BackendFromHeader(hdr)
				if prev, ok := m[user]; ok && prev != got {
					t.Fatalf("%s went to %s, then %s", user, prev, got)
				}
				m[user] = got
			}
		}
		return m
	}
	before := where()
	e.setBackends(append(addrs, e.backends[3].Addr())...)
	after := where()
	moved := 0
	for u, b := range before {
		if after[u] != b {
			moved++
			if after[u] != "b3" {
				t.Errorf("%s moved from %s to %s, not to the new backend", u, b, after[u])
			}
		}
	}
	t.Logf("adding a 4th backend moved %d of %d users (%.0f%%)", moved, users, float64(moved)/users*100)
	if moved == 0 || moved > users*40/100 {
		t.Errorf("%d of %d users moved, want some but well under half (about 1/4)", moved, users)
	}
}
