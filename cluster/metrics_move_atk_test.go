package cluster_test

import (
	"context"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestMetricsMovedWaiter: calls wait for a slot on one of a full
// backend's two connections, and a slot comes free on the other, which
// the queue moves them to. The metered Picker's done (pooled) is called
// once per pick: the move called the new pick's done at once and again at
// the call's end, which ran a pooled done after its return (the proxy
// died on a nil backend, or counted another call's end twice).
func TestMetricsMovedWaiter(t *testing.T) {
	ts := startBackendConfig(t, testserver.Config{Name: "a", ServerOptions: []grpc.ServerOption{grpc.MaxConcurrentStreams(1)}}, "127.0.0.1:0")
	r := runServer(t, cluster.ServerConfig{
		Metrics: prometheus.NewRegistry(),
		Proxy:   proxy.Config{MaxBackendConns: 2, MaxBackendPending: 8, BackendPendingTimeout: 10 * time.Second},
		Cluster: cluster.Config{Name: "echo", Targets: []string{ts.Addr()}},
	})
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)
	for range 2 { // learns the backend's SETTINGS
		if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}, grpc.WaitForReady(true)); err != nil {
			t.Fatal(err)
		}
	}
	hold := func() (release func()) {
		want := ts.InFlight() + 1
		hctx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(ctx, testserver.MetadataHang, "1"))
		held := make(chan struct{})
		go func() { defer close(held); client.EmptyCall(hctx, &testgrpc.Empty{}) }()
		testkit.WaitFor(ctx, t, "the held call on the backend", func() bool { return ts.InFlight() == want })
		return func() { cancel(); <-held }
	}
	// Either held call may share a connection with the waiting call:
	// releasing the other's moves it. Both orders.
	for round := range 2 {
		testkit.WaitFor(ctx, t, "no call on the backend", func() bool { return ts.InFlight() == 0 })
		relA := hold()
		relB := hold()
		res := make(chan error, 1)
		go func() {
			_, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
			res <- err
		}()
		testkit.WaitFor(ctx, t, "a call waiting", func() bool {
			return scrapeAll(t, r.admin, "streamlb_calls_waiting")["cluster=echo"] == 1
		})
		if round == 0 {
			relA()
		} else {
			relB()
		}
		if err := <-res; err != nil {
			t.Errorf("round %d: waiting call: %v", round, err)
		}
		relA()
		relB()
	}
	for range 20 { // calls that would reuse a returned done
		if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
			t.Fatal(err)
		}
	}
	testkit.WaitFor(ctx, t, "nothing in flight", func() bool {
		return scrape(t, r.admin, "streamlb_calls_in_flight")["backend="+ts.Addr()] == 0
	})
	started := scrape(t, r.admin, "streamlb_calls_started_total")["backend="+ts.Addr()]
	var finished float64
	for _, v := range scrape(t, r.admin, "streamlb_calls_finished_total") {
		finished += v
	}
	if started != finished {
		t.Errorf("calls started %v, finished %v: want every started call finished once", started, finished)
	}
}
