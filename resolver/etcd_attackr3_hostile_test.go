package resolver

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/streamlb/streamlb/internal/etcdtest"
)

// TestAttackR3EtcdOneKeyManyEndpoints: a single Kratos registration whose
// endpoints list holds 30,000 grpc:// endpoints (a 900 KiB value, under
// etcd's 1.5 MiB request limit) made a set of 30,000 backends from one
// key. Like a DNS answer, a registry's set must be bounded
// (MaxAddresses); over the bound the last set is kept and the error names
// the count and the limit. A good key beside it keeps the set it had.
func TestAttackR3EtcdOneKeyManyEndpoints(t *testing.T) {
	t.Parallel()
	const maxSet = 10000 // MaxAddresses
	srv := etcdtest.Start(t)
	cli := srv.Client()
	ctx := testContext(t)
	srv.Put(cli, "/microservices/big/good", `{"id":"good","name":"big","endpoints":["grpc://10.9.0.1:9000"]}`)

	u := newRecUpdater()
	startEtcdResolver(t, "etcd://"+srv.Endpoint()+"//microservices/big", EtcdOptions{}, u)
	u.waitSet(ctx, t, "10.9.0.1:9000")

	eps := make([]string, 30000)
	for i := range eps {
		eps[i] = fmt.Sprintf("grpc://10.%d.%d.%d:9000", 10+i>>16, byte(i>>8), byte(i))
	}
	v, err := json.Marshal(map[string]any{"id": "huge", "name": "big", "endpoints": eps})
	if err != nil {
		t.Fatal(err)
	}
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	srv.Put(cli, "/microservices/big/huge", string(v))
	u.waitFor(within(t, 10*time.Second), t, "a new set or an error", func() bool {
		states, errs := u.snapshot()
		return len(states) > 1 || len(errs) > 0
	})
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	states, errs := u.snapshot()
	got := len(states[len(states)-1].Addresses)
	t.Logf("value of %d KiB: last set %d backends, %d errors, %.1f MiB allocated", len(v)>>10, got, len(errs), float64(after.TotalAlloc-before.TotalAlloc)/(1<<20))
	if got > maxSet {
		t.Errorf("one key made a set of %d backends, want at most %d", got, maxSet)
	}
	if len(errs) == 0 || !strings.Contains(errs[0].Error(), fmt.Sprint(maxSet)) {
		t.Errorf("errors = %v, want one naming the limit %d", errs, maxSet)
	}
}

// TestAttackR3EtcdManyKeysChurn: 3,000 keys written one by one from 8
// writers (0.3-0.5 s), a key put and deleted 500 times in a row while they
// stay, a marker key, then all 3,000 deleted by one prefix delete: the set
// follows each step, the churned key is not left behind, and a key with
// a bad port or duplicate address changes nothing. At Debug, each push
// logged its diff computed in O(N·M) (slices.Contains per address): the
// set was complete 18-20 s after the last of the 3,000 puts (3,001
// pushes), and the 500 pairs took 17 s (at Info 1.2 s and 0.8 s).
func TestAttackR3EtcdManyKeysChurn(t *testing.T) {
	t.Parallel()
	srv := etcdtest.Start(t)
	cli := srv.Client()
	ctx := testContext(t)
	srv.Put(cli, "churn/base", "10.210.0.1:1")
	u := newRecUpdater()
	// At Debug, as an operator debugging a registry runs it: every push
	// also logs the backends added and removed.
	e, err := NewEtcd(mustTarget(t, "etcd://"+srv.Endpoint()+"/churn?format=go-zero"), EtcdOptions{
		Logger:        slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelDebug})),
		ProbeInterval: 200 * time.Millisecond, RequestTimeout: time.Second,
		BackoffInitial: 100 * time.Millisecond, BackoffMax: 500 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	runResolver(t, e, u)
	u.waitSet(ctx, t, "10.210.0.1:1")
	has := func(addr string) bool {
		states, _ := u.snapshot()
		return slices.ContainsFunc(states[len(states)-1].Addresses, func(a Address) bool { return a.Addr == addr })
	}
	size := func() int {
		states, _ := u.snapshot()
		return len(states[len(states)-1].Addresses)
	}

	const n = 3000
	start := time.Now()
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for i := w; i < n; i += 8 {
				if _, err := cli.Put(ctx, fmt.Sprintf("churn/many/%d", i), fmt.Sprintf("10.211.%d.%d:9000", i>>8, byte(i))); err != nil {
					t.Errorf("put: %v", err)
					return
				}
			}
		})
	}
	wg.Wait()
	putsDone := time.Now()
	t.Logf("%d puts took %v", n, putsDone.Sub(start).Round(time.Millisecond))
	// The writers' own time varies; what is bounded is how far the set
	// lags behind them: 18.9 s before, 0.67 s after, so the bound leaves
	// this machine's noise a factor of 9. The race detector slows the
	// resolver about 4×.
	bound := 6 * time.Second
	if raceEnabled {
		bound *= 4
	}
	waitQuiet(within(t, 60*time.Second), t, u, fmt.Sprint(n+1, " backends"), func() bool { return size() == n+1 })
	states, _ := u.snapshot()
	lag := time.Since(putsDone)
	t.Logf("%d keys → set: %v after the first put, %v after the last, %d sets pushed", n, time.Since(start).Round(time.Millisecond), lag.Round(time.Millisecond), len(states))
	if lag > bound {
		t.Errorf("the set was complete %v after the last of %d puts, want within %v", lag.Round(time.Millisecond), n, bound)
	}

	srv.Put(cli, "churn/dup", "10.210.0.1:1")     // the base's address again
	srv.Put(cli, "churn/badport", "10.210.0.2:0") // skipped with a warning
	start = time.Now()
	for range 500 {
		srv.Put(cli, "churn/flap", "10.212.0.1:1")
		if _, err := cli.Delete(ctx, "churn/flap"); err != nil {
			t.Fatal(err)
		}
	}
	srv.Put(cli, "churn/marker", "10.212.0.2:1")
	waitQuiet(within(t, 20*time.Second), t, u, "the marker", func() bool { return has("10.212.0.2:1") })
	if has("10.212.0.1:1") || has("10.210.0.2:0") || size() != n+2 {
		t.Errorf("set of %d (flapping key %v, bad port %v), want %d without either", size(), has("10.212.0.1:1"), has("10.210.0.2:0"), n+2)
	}
	took := time.Since(start)
	t.Logf("500 put/delete pairs followed in %v", took.Round(time.Millisecond))
	if took > 2*bound {
		t.Errorf("500 put/delete pairs took %v to follow, want under %v", took.Round(time.Millisecond), 2*bound)
	}

	start = time.Now()
	if _, err := cli.Delete(ctx, "churn/many/", clientv3.WithPrefix()); err != nil {
		t.Fatal(err)
	}
	u.waitSet(within(t, 10*time.Second), t, "10.210.0.1:1", "10.212.0.2:1")
	t.Logf("prefix delete of %d keys → set: %v", n, time.Since(start).Round(time.Millisecond))
}

// waitQuiet is recUpdater.waitFor without the dump of every state, which
// is far too large here.
func waitQuiet(ctx context.Context, t *testing.T, u *recUpdater, what string, cond func() bool) {
	t.Helper()
	for !cond() {
		select {
		case <-ctx.Done():
			states, errs := u.snapshot()
			t.Fatalf("timed out waiting for %s; %d states, last of %d, errs = %v", what, len(states), len(states[len(states)-1].Addresses), errs)
		case <-u.notify:
		}
	}
}

// TestAttackR3EtcdListBound: etcd's client takes responses of up to 2
// GiB, and a list holds every value under the prefix at once, so keys of
// etcd's largest value (1.5 MiB) under a registry's prefix had the proxy
// hold them all. A response is now bounded (MaxResponseBytes, 64 MiB by
// default): here three values of 400 KiB beside a good key, against a
// bound of 1 MiB, make the list fail with the bound named, and no set.
func TestAttackR3EtcdListBound(t *testing.T) {
	t.Parallel()
	srv := etcdtest.Start(t)
	cli := srv.Client()
	srv.Put(cli, "/reg/bound/good", "10.9.1.1:9000")
	for i := range 3 {
		srv.Put(cli, fmt.Sprintf("/reg/bound/big%d", i), strings.Repeat("x", 400<<10))
	}
	u := newRecUpdater()
	startEtcdResolver(t, "etcd://"+srv.Endpoint()+"//reg/bound", EtcdOptions{MaxResponseBytes: 1 << 20}, u)
	u.waitFor(within(t, 20*time.Second), t, "a set or an error", func() bool {
		states, errs := u.snapshot()
		return len(states) > 0 || len(errs) > 0
	})
	states, errs := u.snapshot()
	if len(states) > 0 {
		t.Errorf("a list of 1.2 MiB against a 1 MiB bound pushed a set of %d, want none", len(states[len(states)-1].Addresses))
	}
	if len(errs) == 0 || !strings.Contains(errs[0].Error(), "larger than max") {
		t.Errorf("errors = %v, want the list refused as larger than the bound", errs)
	}
}
