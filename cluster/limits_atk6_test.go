package cluster_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// TestAtk6FileLimitRejectionsCounted refuses calls at the backend
// connection cap under a configuration file: each refusal must be counted
// in streamlb_limit_rejections_total of the cluster the call was routed to,
// as it is with the flags' one cluster, and logged under that cluster.
// Before the fix the file's clusters counted none of them (the call-end
// hook looked the cluster up by the call's backend, which a refused call
// has none of) and the log named no cluster.
func TestAtk6FileLimitRejectionsCounted(t *testing.T) {
	ts, err := testserver.New(testserver.Config{Name: "a", Logger: quiet, ServerOptions: []grpc.ServerOption{grpc.MaxConcurrentStreams(1)}})
	if err != nil {
		t.Fatal(err)
	}
	if err := ts.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ts.Stop)
	path := writeConfig(t, t.TempDir(), fmt.Sprintf(`
clusters:
  - {name: echo, targets: [%s]}
routes:
  - {cluster: echo}
`, ts.Addr()))
	f, err := cluster.LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	cfg := f.ServerConfig()
	cfg.Metrics = prometheus.NewRegistry()
	cfg.Proxy.MaxBackendConns = 1
	cfg.Proxy.MaxBackendPending = -1 // refused at once, not waiting
	logPath := jsonAccessLog(t, &cfg)
	r := runServer(t, cfg)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)

	release := holdCall(ctx, t, client, ts)
	const refused = 5
	for i := range refused {
		_, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
		if status.Code(err) != codes.Unavailable {
			t.Fatalf("call %d: %v, want UNAVAILABLE at the connection cap", i, err)
		}
	}
	release()
	var lines []accessLine
	testkit.WaitFor(ctx, t, "a line per call", func() bool {
		lines = readAccessLog(t, logPath)
		return len(lines) >= refused+1
	})
	for i, l := range lines {
		if l.Cluster != "echo" {
			t.Errorf("line %d: cluster %q (code %s), want echo", i, l.Cluster, l.Code)
		}
	}
	got := scrapeAll(t, r.admin, "streamlb_limit_rejections_total")
	if v := got["cluster=echo,limit=max_backend_conns"]; v != refused {
		t.Errorf("streamlb_limit_rejections_total = %v, want %d under cluster=echo,limit=max_backend_conns", got, refused)
	}
	// A refused call made no attempt on another backend: no retry. Before
	// the fix each counted MaxRetries (2) retries on its one backend, in
	// its line and in streamlb_retries_total{outcome="failed"}.
	for i, l := range lines {
		if l.Retries != 0 {
			t.Errorf("line %d: %d retries, want 0", i, l.Retries)
		}
	}
	if got := scrape(t, r.admin, "streamlb_retries_total"); got["outcome=failed"] != 0 {
		t.Errorf("streamlb_retries_total = %v, want no failed retries", got)
	}
	// As the README says: calls started are the calls sent to the
	// backend, the held call alone (finished Canceled: the test cancels
	// it); a refused call was never sent, and counts neither started nor
	// finished. Before: 2 more per refused call (its pick, and the pick
	// that looked for another backend and found the same), each
	// finished Canceled.
	started := scrape(t, r.admin, "streamlb_calls_started_total")["backend="+ts.Addr()]
	canceled := scrape(t, r.admin, "streamlb_calls_finished_total")["backend="+ts.Addr()+",code=Canceled"]
	if started != 1 || canceled != 1 || ts.Calls() != 1 {
		t.Errorf("started %v, finished Canceled %v, served %d; want 1, 1, 1", started, canceled, ts.Calls())
	}
	assertSettled(ctx, t, r.admin)
}

// assertSettled checks, once every call ended, that no
// streamlb_calls_in_flight series is left above 0 and that each backend's
// calls started equal its calls finished.
func assertSettled(ctx context.Context, t *testing.T, admin string) {
	t.Helper()
	var inflight, started, finished map[string]float64
	ok := func() bool {
		inflight = scrapeAll(t, admin, "streamlb_calls_in_flight")
		started = scrapeAll(t, admin, "streamlb_calls_started_total")
		fin := scrapeAll(t, admin, "streamlb_calls_finished_total")
		finished = map[string]float64{}
		for k, v := range fin {
			finished[stripLabel(k, "code")] += v
		}
		for _, v := range inflight {
			if v != 0 {
				return false
			}
		}
		for k, v := range started {
			if finished[k] != v {
				return false
			}
		}
		return true
	}
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	for !ok() {
		select {
		case <-wctx.Done():
			t.Errorf("after every call ended: in flight %v, started %v, finished %v", inflight, started, finished)
			return
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// stripLabel removes label name from a "k=v,k=v" key of scrapeLabels.
func stripLabel(key, name string) string {
	kvs := strings.Split(key, ",")
	return strings.Join(slices.DeleteFunc(kvs, func(kv string) bool { return strings.HasPrefix(kv, name+"=") }), ",")
}

// TestAtk6FileListenerLimitsCounted: under a configuration file, a call
// refused at one of the listener's own limits before it was routed
// (max_streams here) is counted in streamlb_limit_rejections_total, with
// no cluster, as the flags' one cluster counts it. Before the fix no
// series moved: the refusal belonged to no cluster and was dropped.
func TestAtk6FileListenerLimitsCounted(t *testing.T) {
	ts := startBackend(t, "a", "127.0.0.1:0")
	path := writeConfig(t, t.TempDir(), fmt.Sprintf(`
proxy: {max_streams: 1}
clusters:
  - {name: echo, targets: [%s]}
routes:
  - {cluster: echo}
`, ts.Addr()))
	r := runFile(t, path, true)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)
	release := holdCall(ctx, t, client, ts)
	const refused = 3
	for i := range refused {
		if _, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{}); status.Code(err) != codes.ResourceExhausted {
			t.Fatalf("call %d: %v, want RESOURCE_EXHAUSTED at max_streams", i, err)
		}
	}
	release()
	var got map[string]float64
	total := func() float64 {
		got = scrapeAll(t, r.admin, "streamlb_limit_rejections_total")
		n := 0.0
		for k, v := range got {
			if strings.Contains(k, "limit=max_streams") && !strings.Contains(k, "per_backend") {
				n += v
			}
		}
		return n
	}
	wctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	for total() < refused && wctx.Err() == nil {
		<-time.After(20 * time.Millisecond)
	}
	if n := total(); n != refused {
		t.Errorf("limit=max_streams counted %v in all (%v), want %d", n, nonZero(got), refused)
	}
	assertSettled(ctx, t, r.admin)
}
