package cluster_test

import (
	"context"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// scrape fetches /metrics and returns the samples of family name as
// "label=value,label=value" -> value, leaving out the cluster label.
func scrape(t *testing.T, admin, name string) map[string]float64 {
	t.Helper()
	return scrapeLabels(t, admin, name, false)
}

// scrapeAll is scrape keeping the cluster label.
func scrapeAll(t *testing.T, admin, name string) map[string]float64 {
	t.Helper()
	return scrapeLabels(t, admin, name, true)
}

func scrapeLabels(t *testing.T, admin, name string, keepCluster bool) map[string]float64 {
	t.Helper()
	resp, err := http.Get(admin + "/metrics")
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics = %d", resp.StatusCode)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse /metrics: %v", err)
	}
	out := make(map[string]float64)
	fam, ok := fams[name]
	if !ok {
		return out
	}
	for _, m := range fam.GetMetric() {
		var labels []string
		for _, l := range m.GetLabel() {
			if keepCluster || l.GetName() != "cluster" {
				labels = append(labels, l.GetName()+"="+l.GetValue())
			}
		}
		v := m.GetCounter().GetValue() + m.GetGauge().GetValue() + float64(m.GetHistogram().GetSampleCount())
		out[strings.Join(labels, ",")] = v
	}
	return out
}

// TestMetricsMatchBackends scrapes /metrics after calls through one
// connection and checks the per-backend counts against the backends' own
// counters, with failures counted under their status code.
func TestMetricsMatchBackends(t *testing.T) {
	var targets []string
	backends := map[string]*testserver.Server{}
	for _, name := range []string{"a", "b", "c"} {
		ts := startBackend(t, name, "127.0.0.1:0")
		backends[ts.Addr()] = ts
		targets = append(targets, ts.Addr())
	}
	r := runServer(t, cluster.ServerConfig{Metrics: prometheus.NewRegistry(), Cluster: cluster.Config{Name: "echo", Targets: targets}})
	client := dial(t, r.addr)
	const calls, failing = 90, 9
	for i := range calls {
		ctx := t.Context()
		if i < failing {
			ctx = metadata.AppendToOutgoingContext(ctx, testserver.MetadataFailCode, "5") // NOT_FOUND
		}
		_, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{}, grpc.WaitForReady(true))
		if want := codes.OK; i < failing {
			want = codes.NotFound
			if status.Code(err) != want {
				t.Fatalf("call %d: %v, want %v", i, err, want)
			}
		} else if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
	}

	started := scrape(t, r.admin, "streamlb_calls_started_total")
	finished := scrape(t, r.admin, "streamlb_calls_finished_total")
	var total, notFound float64
	for addr, ts := range backends {
		if got, want := started["backend="+addr], float64(ts.Calls()); got != want {
			t.Errorf("started{backend=%s} = %v, want the backend's own count %v", addr, got, want)
		}
		ok, nf := finished["backend="+addr+",code=OK"], finished["backend="+addr+",code=NotFound"]
		if ok+nf != float64(ts.Calls()) {
			t.Errorf("finished{backend=%s} = %v OK + %v NotFound, want %d in all", addr, ok, nf, ts.Calls())
		}
		total += ok + nf
		notFound += nf
	}
	if total != calls || notFound != failing {
		t.Errorf("finished calls = %v (%v NotFound), want %d (%d)", total, notFound, calls, failing)
	}
	if got := scrape(t, r.admin, "streamlb_calls_in_flight"); len(got) != 3 {
		t.Errorf("in-flight series = %v, want one per backend", got)
	} else {
		for k, v := range got {
			if v != 0 {
				t.Errorf("in flight %s = %v after all calls ended", k, v)
			}
		}
	}
	if got := scrape(t, r.admin, "streamlb_backends"); got[""] != 3 {
		t.Errorf("streamlb_backends = %v, want 3", got)
	}
	if got := scrape(t, r.admin, "streamlb_cluster_ready"); got[""] != 1 {
		t.Errorf("streamlb_cluster_ready = %v, want 1", got)
	}
	if got := scrape(t, r.admin, "streamlb_call_duration_seconds"); len(got) != 3 {
		t.Errorf("duration histograms = %v, want one per backend", got)
	}
}

// TestDNSLookupMetrics follows a name on a real DNS server and counts its
// lookups: successes while the server answers, errors once it is gone
// (the last set is kept, and the resolver's errors are counted too).
func TestDNSLookupMetrics(t *testing.T) {
	ts := startBackend(t, "a", "127.0.0.1:0")
	_, port, _ := net.SplitHostPort(ts.Addr())
	dns := testserver.NewDNSServer(testserver.DNSConfig{DefaultTTL: 1, Logger: quiet})
	if err := dns.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			dns.Stop()
		}
	})
	dns.SetA("echo.test", "127.0.0.1")
	r := runServer(t, cluster.ServerConfig{Metrics: prometheus.NewRegistry(), Cluster: cluster.Config{
		Targets:    []string{"dns://" + dns.Addr() + "/echo.test:" + port},
		DNSRefresh: 100 * time.Millisecond,
	}})
	ctx := testkit.Context(t, 30*time.Second)
	testkit.WaitFor(ctx, t, "two successful lookups", func() bool {
		return scrape(t, r.admin, "streamlb_dns_lookups_total")["result=ok"] >= 2
	})
	dns.Stop()
	stopped = true
	testkit.WaitFor(ctx, t, "a failed lookup", func() bool {
		return scrape(t, r.admin, "streamlb_dns_lookups_total")["result=error"] >= 1
	})
	if got := scrape(t, r.admin, "streamlb_resolver_errors_total")[""]; got < 1 {
		t.Errorf("streamlb_resolver_errors_total = %v, want at least 1", got)
	}
	if got := scrape(t, r.admin, "streamlb_backends")[""]; got != 1 {
		t.Errorf("streamlb_backends = %v after the DNS server went away, want the last set (1)", got)
	}
}

// TestBackendConnsOverflowMetric: calls refused because every connection
// to their backend is full (--max-backend-conns) are counted under their
// own label of streamlb_limit_rejections_total, and a burst of them is
// logged once, not once per call.
func TestBackendConnsOverflowMetric(t *testing.T) {
	ts, err := testserver.New(testserver.Config{Name: "a", Logger: quiet, ServerOptions: []grpc.ServerOption{grpc.MaxConcurrentStreams(1)}})
	if err != nil {
		t.Fatal(err)
	}
	if err := ts.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ts.Stop)
	var logs syncBuffer
	r := runServer(t, cluster.ServerConfig{
		Metrics: prometheus.NewRegistry(),
		Logger:  slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn})),
		Proxy:   proxy.Config{MaxBackendConns: 1, MaxBackendPending: -1},
		Cluster: cluster.Config{Name: "echo", Targets: []string{ts.Addr()}},
	})
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)
	// One call holds the only stream of the only connection allowed.
	release := holdCall(ctx, t, client, ts)
	const refused = 50
	start := time.Now()
	for i := range refused {
		_, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
		if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "every connection") {
			t.Fatalf("call %d: %v, want UNAVAILABLE at the connection cap", i, err)
		}
	}
	burst := time.Since(start)
	if err := release(); status.Code(err) != codes.Canceled {
		t.Errorf("held call: %v, want CANCELLED", err)
	}
	// A call is counted when both its sides are done, which may be a
	// moment after its client had the answer (the client's END_STREAM
	// follows the refusal), and call ends are delivered to the metrics
	// on a goroutine of their own: wait for the count, then check it.
	var got map[string]float64
	testkit.WaitFor(ctx, t, "the refusals to be counted", func() bool {
		got = scrape(t, r.admin, "streamlb_limit_rejections_total")
		return got["limit=max_backend_conns"] >= refused
	})
	if got["limit=max_backend_conns"] != refused {
		t.Errorf("streamlb_limit_rejections_total = %v, want %d under limit=max_backend_conns", got, refused)
	}
	if got["limit=max_streams"] != 0 {
		t.Errorf("streamlb_limit_rejections_total = %v: counted under another limit too", got)
	}
	lines := strings.Count(logs.String(), "max backend connections")
	// Once per second at most, whatever the burst's length on a slow machine.
	if maxLines := 1 + int(burst/time.Second); lines < 1 || lines > maxLines {
		t.Errorf("%d log lines for %d refusals in %v, want 1 to %d:\n%s", lines, refused, burst, maxLines, logs.String())
	}
}

// holdCall starts a call that ts holds (testserver.MetadataHang) and waits
// until ts has it in flight. release cancels it and returns its error.
// TestCallsWaitingMetric: a call waiting for a slot on a backend whose
// connections are all full (--max-backend-pending) is counted in
// streamlb_calls_waiting{cluster} while it waits, and goes through when
// the slot comes free.
func TestCallsWaitingMetric(t *testing.T) {
	ts, err := testserver.New(testserver.Config{Name: "a", Logger: quiet, ServerOptions: []grpc.ServerOption{grpc.MaxConcurrentStreams(1)}})
	if err != nil {
		t.Fatal(err)
	}
	if err := ts.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ts.Stop)
	r := runServer(t, cluster.ServerConfig{
		Metrics: prometheus.NewRegistry(),
		Logger:  quiet,
		Proxy:   proxy.Config{MaxBackendConns: 1},
		Cluster: cluster.Config{Name: "echo", Targets: []string{ts.Addr()}},
	})
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)
	release := holdCall(ctx, t, client, ts)
	waited := make(chan error, 1)
	go func() {
		_, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
		waited <- err
	}()
	testkit.WaitFor(ctx, t, "streamlb_calls_waiting 1", func() bool {
		return scrapeAll(t, r.admin, "streamlb_calls_waiting")["cluster=echo"] == 1
	})
	if err := release(); status.Code(err) != codes.Canceled {
		t.Errorf("held call: %v, want CANCELLED", err)
	}
	if err := <-waited; err != nil {
		t.Errorf("waiting call: %v", err)
	}
	if got := scrapeAll(t, r.admin, "streamlb_calls_waiting"); got["cluster=echo"] != 0 {
		t.Errorf("streamlb_calls_waiting = %v after the wait, want 0", got)
	}
	if got := scrape(t, r.admin, "streamlb_limit_rejections_total"); got["limit=max_backend_conns"] != 0 {
		t.Errorf("streamlb_limit_rejections_total = %v: a call that waited and went through counted as refused", got)
	}
}

func holdCall(ctx context.Context, t *testing.T, client testgrpc.TestServiceClient, ts *testserver.Server) (release func() error) {
	t.Helper()
	hctx, hang := context.WithCancel(metadata.AppendToOutgoingContext(ctx, testserver.MetadataHang, "1"))
	held := make(chan error, 1)
	go func() {
		_, err := client.UnaryCall(hctx, &testgrpc.SimpleRequest{}, grpc.WaitForReady(true))
		held <- err
	}()
	testkit.WaitFor(ctx, t, "the held call to reach the backend", func() bool { return ts.InFlight() == 1 })
	return func() error {
		hang()
		return <-held
	}
}
