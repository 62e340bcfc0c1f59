package cluster_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/internal/testkit"
)

// TestCallsStartedAreCallsSent: the flags' one cluster has a backend that
// advertises SETTINGS_MAX_CONCURRENT_STREAMS=0 and a good one, picked in
// turn. The first calls picked for the zero-streams backend wait for its
// handshake, are refused by its SETTINGS and go to the good one, which
// serves every call. streamlb_calls_started_total counts the calls sent
// to each backend, as Envoy's upstream_rq_total does: none for the
// zero-streams backend, nor any finished, and for the good one what it
// served (before: the refused picks counted started and finished Canceled
// on the backend that never saw them). Every scrape shows no more
// finished than started, and all settle equal.
func TestCallsStartedAreCallsSent(t *testing.T) {
	zero := zeroStreamsServer(t)
	good := startBackend(t, "good", "127.0.0.1:0")
	r := runServer(t, cluster.ServerConfig{Metrics: prometheus.NewRegistry(),
		Cluster: cluster.Config{Name: "echo", Targets: []string{zero, good.Addr()}, Director: director.Config{Policy: director.RoundRobin, EjectAfter: -1}}})
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)
	const calls = 10
	for i := range calls {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err := client.EmptyCall(cctx, &testgrpc.Empty{})
		cancel()
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		finished := map[string]float64{}
		for k, v := range scrapeAll(t, r.admin, "streamlb_calls_finished_total") {
			finished[stripLabel(k, "code")] += v
		}
		started := scrapeAll(t, r.admin, "streamlb_calls_started_total")
		for k, v := range finished {
			if v > started[k] {
				t.Errorf("after call %d: %s finished %v, started %v", i, k, v, started[k])
			}
		}
	}
	if n := good.Calls(); n != calls {
		t.Fatalf("the good backend served %d calls, want %d", n, calls)
	}
	started := scrape(t, r.admin, "streamlb_calls_started_total")
	if v := started["backend="+zero]; v != 0 {
		t.Errorf("started on the zero-streams backend %v, want 0: no call was sent to it", v)
	}
	if v := started["backend="+good.Addr()]; v != calls {
		t.Errorf("started on the good backend %v, want the %d it served", v, calls)
	}
	for k, v := range scrape(t, r.admin, "streamlb_calls_finished_total") {
		if strings.Contains(k, "backend="+zero+",") && v != 0 {
			t.Errorf("finished %s = %v, want none", k, v)
		}
	}
	assertSettled(ctx, t, r.admin)
}
