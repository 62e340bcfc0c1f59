package resolver

import (
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/naming/endpoints"

	"github.com/streamlb/streamlb/internal/etcdtest"
)

// startEtcdResolver runs an Etcd resolver for target on u, with fast
// probes and backoff, logging to the returned buffer.
func startEtcdResolver(t *testing.T, target string, opts EtcdOptions, u Updater) (*Etcd, *syncBuffer) {
	t.Helper()
	var logs *syncBuffer
	opts.Logger, logs = logCapture()
	if opts.ProbeInterval == 0 {
		opts.ProbeInterval = 200 * time.Millisecond
	}
	if opts.RequestTimeout == 0 {
		opts.RequestTimeout = time.Second
	}
	if opts.BackoffInitial == 0 {
		opts.BackoffInitial, opts.BackoffMax = 100*time.Millisecond, 500*time.Millisecond
	}
	e, err := NewEtcd(mustTarget(t, target), opts)
	if err != nil {
		t.Fatal(err)
	}
	runResolver(t, e, u)
	return e, logs
}

func TestEtcdFormatsEmbedded(t *testing.T) {
	t.Parallel()
	srv := etcdtest.Start(t)
	cli := srv.Client()
	ctx := testContext(t)

	// etcd's own naming package writes through its Manager.
	em, err := endpoints.NewManager(cli, "svc/naming")
	if err != nil {
		t.Fatal(err)
	}
	if err := em.AddEndpoint(ctx, "svc/naming/10.0.0.4:50051", endpoints.Endpoint{Addr: "10.0.0.4:50051", Metadata: map[string]string{"zone": "b"}}); err != nil {
		t.Fatal(err)
	}
	srv.Put(cli, "kitex/registry-etcd/echo/10.0.0.1:8888", kitexValue)
	srv.Put(cli, "/microservices/helloworld/b5a6c1", kratosValue)
	srv.Put(cli, "/micro/registry/greeter/greeter-7b3e", goMicroValue)
	srv.Put(cli, "user.rpc/7587869768203541778", "10.0.0.6:8080")
	srv.Put(cli, dubboKey, "")

	tests := []struct {
		name   string
		target string
		want   []string
	}{
		{"etcd naming", "/svc/naming", []string{"10.0.0.4:50051"}},
		{"kitex", "/kitex/registry-etcd/echo", []string{"10.0.0.1:8888;weight=25"}},
		{"kratos", "//microservices/helloworld", []string{"10.0.0.2:9000"}},
		{"go-micro", "//micro/registry/greeter", []string{"10.0.0.3:5000"}},
		{"go-zero", "/user.rpc?format=go-zero", []string{"10.0.0.6:8080"}},
		{"dubbo", "//dubbo/com.foo.Greeter/providers", []string{"10.0.0.5:20000"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			u := newRecUpdater()
			startEtcdResolver(t, "etcd://"+srv.Endpoint()+tc.target, EtcdOptions{}, u)
			u.waitSet(ctx, t, tc.want...)
		})
	}
}

func TestEtcdFollowsRegistrations(t *testing.T) {
	t.Parallel()
	srv := etcdtest.Start(t)
	cli := srv.Client()
	ctx := testContext(t)
	const prefix = "kitex/registry-etcd/echo/"
	kitex := func(addr string) string { return `{"network":"tcp","address":"` + addr + `","weight":10,"tags":{}}` }

	srv.Put(cli, prefix+"10.0.0.1:1", kitex("10.0.0.1:1"))
	// Keys of a sibling service sharing the prefix's spelling are not ours.
	srv.Put(cli, "kitex/registry-etcd/echo-canary/10.0.0.9:1", kitex("10.0.0.9:1"))
	srv.Put(cli, "kitex/registry-etcd/echo-canary", kitex("10.0.0.9:2"))

	u := newRecUpdater()
	_, logs := startEtcdResolver(t, "etcd://"+srv.Endpoint()+"/kitex/registry-etcd/echo", EtcdOptions{}, u)
	u.waitSet(ctx, t, "10.0.0.1:1;weight=10")

	// Registration with a lease and keep-alive, as Kitex does.
	lease, err := cli.Grant(ctx, 10)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	srv.Put(cli, prefix+"10.0.0.2:1", kitex("10.0.0.2:1"), clientv3.WithLease(lease.ID))
	u.waitSet(ctx, t, "10.0.0.1:1;weight=10", "10.0.0.2:1;weight=10")
	if d := time.Since(start); d > time.Second {
		t.Errorf("registration took %v to reach the set, want under 1s", d)
	}
	t.Logf("registration → set: %v", time.Since(start))

	// Garbage is skipped with one warning, and never empties the set.
	srv.Put(cli, prefix+"junk", "{not json")
	srv.Put(cli, prefix+"junk", "{still not json")
	srv.Put(cli, prefix+"10.0.0.1:1", "garbage overwrite")
	srv.Put(cli, prefix+"10.0.0.3:1", kitex("10.0.0.3:1"))
	u.waitSet(ctx, t, "10.0.0.1:1;weight=10", "10.0.0.2:1;weight=10", "10.0.0.3:1;weight=10")
	if n := strings.Count(logs.String(), `key=kitex/registry-etcd/echo/junk`); n != 1 {
		t.Errorf("%d warnings for the junk key, want 1; logs:\n%s", n, logs)
	}

	// Deregistration.
	start = time.Now()
	if _, err := cli.Delete(ctx, prefix+"10.0.0.3:1"); err != nil {
		t.Fatal(err)
	}
	u.waitSet(ctx, t, "10.0.0.1:1;weight=10", "10.0.0.2:1;weight=10")
	t.Logf("deregistration → set: %v", time.Since(start))

	// A revoked lease (an instance shutting down its session) removes its key.
	if _, err := cli.Revoke(ctx, lease.ID); err != nil {
		t.Fatal(err)
	}
	u.waitSet(ctx, t, "10.0.0.1:1;weight=10")

	// A lease that lapses (an instance killed) is removed within TTL + 1s.
	short, err := cli.Grant(ctx, 2)
	if err != nil {
		t.Fatal(err)
	}
	srv.Put(cli, prefix+"10.0.0.4:1", kitex("10.0.0.4:1"), clientv3.WithLease(short.ID))
	u.waitSet(ctx, t, "10.0.0.1:1;weight=10", "10.0.0.4:1;weight=10")
	granted := time.Now()
	u.waitSet(ctx, t, "10.0.0.1:1;weight=10")
	if d := time.Since(granted); d > 3*time.Second {
		t.Errorf("lapsed 2s lease removed after %v, want within 3s", d)
	}
	t.Logf("2s lease lapse → removed after %v", time.Since(granted))

	// An authoritative empty answer empties the set.
	if _, err := cli.Delete(ctx, prefix, clientv3.WithPrefix()); err != nil {
		t.Fatal(err)
	}
	u.waitSet(ctx, t)
	if _, errs := u.snapshot(); len(errs) != 0 {
		t.Errorf("ReportError calls = %v, want none", errs)
	}
}

func TestEtcdOutageKeepsSet(t *testing.T) {
	// Not parallel: it stops and restarts a server on fixed ports, and a
	// parallel test of this package picking a free port could take them.
	srv := etcdtest.Start(t)
	cli := srv.Client()
	ctx := testContext(t)
	srv.Put(cli, "svc/1", "10.0.0.1:80")

	u := newRecUpdater()
	_, logs := startEtcdResolver(t, "etcd://"+srv.Endpoint()+"/svc", EtcdOptions{}, u)
	u.waitSet(ctx, t, "10.0.0.1:80")

	// Stopping takes a while: etcd gives open streams (the resolver's
	// watch) a grace period. The waits that follow get their own bound.
	stopping := time.Now()
	srv.Stop()
	t.Logf("etcd stopped in %v", time.Since(stopping))
	ctx = testContext(t)
	u.waitFor(ctx, t, "an error (logs follow on failure)", func() bool {
		_, errs := u.snapshot()
		if len(errs) < 2 && ctx.Err() != nil {
			t.Logf("resolver logs:\n%s", logs)
		}
		return len(errs) >= 2
	})
	if got, _ := u.last(); len(got) != 1 {
		t.Errorf("set during the outage = %v, want the last one kept", got)
	}
	if !strings.Contains(logs.String(), "level=WARN msg=\"etcd failed; keeping last set\"") {
		t.Errorf("no warning logged; logs:\n%s", logs)
	}

	srv.Start()
	cli2 := srv.Client()
	srv.Put(cli2, "svc/2", "10.0.0.2:80")
	u.waitSet(ctx, t, "10.0.0.1:80", "10.0.0.2:80")
	// The set is pushed by the list, and the recovery logged just after.
	waitLog(ctx, t, logs, "etcd recovered")
	states, _ := u.snapshot()
	for _, s := range states {
		if len(s.Addresses) == 0 {
			t.Errorf("an empty set was pushed: %v", states)
		}
	}
}

func TestEtcdCompactionRelists(t *testing.T) {
	t.Parallel()
	srv := etcdtest.Start(t)
	cli := srv.Client()
	ctx := testContext(t)
	srv.Put(cli, "svc/1", "10.0.0.1:80")

	u := newRecUpdater()
	var logs *syncBuffer
	opts := EtcdOptions{ProbeInterval: time.Hour, BackoffInitial: time.Hour, BackoffMax: time.Hour}
	opts.Logger, logs = logCapture()
	e, err := NewEtcd(mustTarget(t, "etcd://"+srv.Endpoint()+"/svc"), opts)
	if err != nil {
		t.Fatal(err)
	}
	// Between the first list and its watch, the registry moves on and
	// compacts away the revision the watch starts from.
	first := true
	e.afterList = func() {
		if !first {
			return
		}
		first = false
		srv.Put(cli, "svc/2", "10.0.0.2:80")
		resp := srv.Put(cli, "svc/3", "10.0.0.3:80")
		if _, err := cli.Compact(ctx, resp.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
			t.Error(err)
		}
	}
	runResolver(t, e, u)
	u.waitSet(ctx, t, "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80")
	if !strings.Contains(logs.String(), "compacted") {
		t.Errorf("compaction not logged; logs:\n%s", logs)
	}
	if _, errs := u.snapshot(); len(errs) != 0 {
		t.Errorf("ReportError calls = %v, want none (compaction re-lists at once)", errs)
	}
}
