package cluster_test

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
)

// TestAttackR4RateLimitedAccessLog: a call a route's rate limit refused
// has its access-log line name the limit (README, Access log: "limit: The
// limit that refused the call (with RESOURCE_EXHAUSTED)"), as the
// proxy's own limits do, and the cluster its route sends calls to.
// Before, the line had code ResourceExhausted with no limit key and
// cluster "": only the message told it from max_streams and the rest.
func TestAttackR4RateLimitedAccessLog(t *testing.T) {
	a := startBackend(t, "a", "127.0.0.1:0")
	path := writeConfig(t, t.TempDir(), fmt.Sprintf("clusters: [{name: a, targets: [%s]}]\nroutes:\n  - {name: slow, cluster: a, rate_limit: {rate: 0.001, burst: 1}}\n", a.Addr()))
	f, err := cluster.LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	cfg := f.ServerConfig()
	var logs syncBuffer
	cfg.AccessLog = cluster.NewAccessLog(slog.NewJSONHandler(&logs, nil))
	r := runServer(t, cfg)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 20*time.Second)
	if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatalf("first call (the burst): %v", err)
	}
	_, err = client.EmptyCall(ctx, &testgrpc.Empty{})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("second call: %v, want RESOURCE_EXHAUSTED", err)
	}
	testkit.WaitFor(ctx, t, "2 access-log lines", func() bool { return strings.Count(logs.String(), "\n") >= 2 })
	lines := strings.Split(strings.TrimSpace(logs.String()), "\n")
	var rec struct {
		Code    string `json:"code"`
		Cluster string `json:"cluster"`
		Limit   string `json:"limit"`
	}
	if err := json.Unmarshal([]byte(lines[1]), &rec); err != nil {
		t.Fatalf("access-log line %q: %v", lines[1], err)
	}
	if rec.Code != "ResourceExhausted" || rec.Limit != "rate_limit" || rec.Cluster != "a" {
		t.Errorf("rate-limited call's access-log line %s: want code ResourceExhausted, limit rate_limit, cluster a", lines[1])
	}
}
