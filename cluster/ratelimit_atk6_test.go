package cluster_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
)

// limitLine is an access-log line with its limit and proxy_status keys.
type limitLine struct {
	accessLine
	Limit string `json:"limit"`
}

// TestAtk6RateLimitedCallLogged: a call a route's rate limit refuses is
// logged with limit=rate_limit, proxy_status and the route's cluster, and
// counted once in streamlb_route_rate_limited_total, for both engines.
func TestAtk6RateLimitedCallLogged(t *testing.T) {
	for _, engine := range cluster.Engines() {
		t.Run(engine, func(t *testing.T) {
			ts := startBackend(t, "a", "127.0.0.1:0")
			path := writeConfig(t, t.TempDir(), fmt.Sprintf(`
engine: %s
clusters:
  - {name: echo, targets: [%s]}
routes:
  - {name: slow, cluster: echo, rate_limit: {rate: 0.001, burst: 1}}
`, engine, ts.Addr()))
			f, err := cluster.LoadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			cfg := f.ServerConfig()
			cfg.Metrics = prometheus.NewRegistry()
			logPath := jsonAccessLog(t, &cfg)
			r := runServer(t, cfg)
			client := dial(t, r.addr)
			ctx := testkit.Context(t, 20*time.Second)
			if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
				t.Fatal(err)
			}
			if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); status.Code(err) != codes.ResourceExhausted {
				t.Fatalf("second call: %v, want RESOURCE_EXHAUSTED", err)
			}
			var lines []accessLine
			testkit.WaitFor(ctx, t, "two lines", func() bool {
				lines = readAccessLog(t, logPath)
				return len(lines) >= 2
			})
			var l limitLine
			raw, _ := os.ReadFile(logPath)
			var last []byte
			for _, b := range splitLines(raw) {
				last = b
			}
			if err := jsonUnmarshal(last, &l); err != nil {
				t.Fatal(err)
			}
			if l.Code != "ResourceExhausted" || l.Limit != "rate_limit" || l.Cluster != "echo" || !l.ProxyStatus || l.Backend != "" {
				t.Errorf("line %+v, want ResourceExhausted, limit rate_limit, cluster echo, proxy_status, no backend", l)
			}
			if got := scrape(t, r.admin, "streamlb_route_rate_limited_total"); got["route=slow"] != 1 {
				t.Errorf("streamlb_route_rate_limited_total = %v, want 1", got)
			}
			assertSettled(ctx, t, r.admin)
		})
	}
}

func splitLines(b []byte) [][]byte {
	var out [][]byte
	for _, l := range bytes.Split(b, []byte("\n")) {
		if len(l) > 0 {
			out = append(out, l)
		}
	}
	return out
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }
