package cluster_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// TestAtk6NoBackendLogged: a call routed to a cluster with no backend
// (its name has no addresses) fails UNAVAILABLE; it is
// counted once in that cluster's streamlb_pick_failures_total and logged
// under that cluster, with no backend and proxy_status, by both engines.
// Before the fix its line named no cluster.
func TestAtk6NoBackendLogged(t *testing.T) {
	for _, engine := range cluster.Engines() {
		t.Run(engine, func(t *testing.T) {
			// A name without addresses: the cluster's set stays empty.
			dns := testserver.NewDNSServer(testserver.DNSConfig{DefaultTTL: 1, Logger: quiet})
			if err := dns.Start("127.0.0.1:0"); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(dns.Stop)
			path := writeConfig(t, t.TempDir(), fmt.Sprintf(`
engine: %s
clusters:
  - {name: echo, targets: ["dns://%s/none.test:80"]}
routes:
  - {cluster: echo}
`, engine, dns.Addr()))
			f, err := cluster.LoadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			cfg := f.ServerConfig()
			cfg.Metrics = prometheus.NewRegistry()
			cfg.Warmup = 50 * time.Millisecond
			logPath := jsonAccessLog(t, &cfg)
			r := runServer(t, cfg)
			client := dial(t, r.addr)
			ctx := testkit.Context(t, 20*time.Second)
			if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); status.Code(err) != codes.Unavailable {
				t.Fatalf("EmptyCall: %v, want UNAVAILABLE", err)
			}
			var lines []accessLine
			testkit.WaitFor(ctx, t, "the line", func() bool {
				lines = readAccessLog(t, logPath)
				return len(lines) >= 1
			})
			if l := lines[len(lines)-1]; l.Cluster != "echo" || l.Backend != "" || l.Code != "Unavailable" || !l.ProxyStatus || l.Retries != 0 {
				t.Errorf("line %+v, want Unavailable in echo, no backend, proxy status, no retry", l)
			}
			if got := scrape(t, r.admin, "streamlb_pick_failures_total")[""]; got != 1 {
				t.Errorf("streamlb_pick_failures_total = %v, want 1", got)
			}
		})
	}
}
