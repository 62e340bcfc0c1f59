package cluster_test

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestAtk6RetriesCountedOnce sends calls over a dead backend, one that
// answers UNAVAILABLE and a good one, with retries on: every call has one
// access-log line, the retries the lines show are the retries counted,
// by outcome, each backend's calls started are the calls it was sent (the
// dead one none: its connections were refused), and its calls finished
// equal its calls started, nothing left in flight.
func TestAtk6RetriesCountedOnce(t *testing.T) {
	for _, tc := range []struct {
		name string
		good bool
	}{{"then success", true}, {"then failure", false}} {
		t.Run(tc.name, func(t *testing.T) {
			bad, err := testserver.New(testserver.Config{Name: "bad", Logger: quiet, ErrorRate: 1})
			if err != nil {
				t.Fatal(err)
			}
			if err := bad.Start("127.0.0.1:0"); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(bad.Stop)
			targets := []string{testkit.DeadAddr(t), bad.Addr()}
			var good *testserver.Server
			if tc.good {
				good = startBackend(t, "good", "127.0.0.1:0")
				targets = append(targets, good.Addr())
			}
			al, logPath := openJSONLog(t)
			r := runServer(t, cluster.ServerConfig{Metrics: prometheus.NewRegistry(), AccessLog: al,
				Cluster: cluster.Config{Name: "echo", Targets: targets, Director: director.Config{EjectAfter: -1}},
				Proxy:   proxy.Config{RetryOn: []string{"grpc.testing.TestService/EmptyCall"}, MaxRetries: 2}})
			client := dial(t, r.addr)
			ctx := testkit.Context(t, 20*time.Second)
			const calls = 12
			failed := 0
			for range calls {
				if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
					if status.Code(err) != codes.Unavailable {
						t.Fatalf("EmptyCall: %v", err)
					}
					failed++
				}
			}
			var lines []accessLine
			testkit.WaitFor(ctx, t, "a line per call", func() bool {
				lines = readAccessLog(t, logPath)
				return len(lines) >= calls
			})
			if len(lines) != calls {
				t.Fatalf("%d lines for %d calls", len(lines), calls)
			}
			retriesOK, retriesNo, failedLines := 0, 0, 0
			for _, l := range lines {
				if l.Code == "OK" {
					retriesOK += l.Retries
				} else {
					retriesNo += l.Retries
					failedLines++
				}
			}
			if failedLines != failed {
				t.Errorf("%d lines failed, the client saw %d failures", failedLines, failed)
			}
			got := scrape(t, r.admin, "streamlb_retries_total")
			if got["outcome=ok"] != float64(retriesOK) || got["outcome=failed"] != float64(retriesNo) {
				t.Errorf("streamlb_retries_total = %v; the lines show %d ok, %d failed", got, retriesOK, retriesNo)
			}
			started := scrape(t, r.admin, "streamlb_calls_started_total")
			if v := started["backend="+bad.Addr()]; v != float64(bad.Calls()) {
				t.Errorf("started on bad %v, it served %d", v, bad.Calls())
			}
			if good != nil {
				if v := started["backend="+good.Addr()]; v != float64(good.Calls()) {
					t.Errorf("started on good %v, it served %d", v, good.Calls())
				}
			}
			if v := started["backend="+targets[0]]; v != 0 {
				t.Errorf("started on the dead backend %v, want 0: no call was sent to it", v)
			}
			assertSettled(ctx, t, r.admin)
		})
	}
}
