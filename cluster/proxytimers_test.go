package cluster_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
)

// TestProxyTimerSettingsFloor: the proxy's idle timeouts and backend
// keepalive time under 1 ms are refused, naming the setting. Before,
// backend_idle_timeout: 3ns passed the check and the first backend
// connection panicked the process (time.NewTicker(0) in its idle sweep);
// idle_timeout and request_idle_timeout under 4ns were silently never
// enforced, and backend_keepalive_time: 1ns re-armed its timer every
// nanosecond on each backend connection. 1 ms is accepted and serves.
func TestProxyTimerSettingsFloor(t *testing.T) {
	for _, field := range []string{"backend_idle_timeout: 3ns", "backend_keepalive_time: 1ns", "idle_timeout: 3ns", "request_idle_timeout: 999us"} {
		text := "proxy: {" + field + "}\nclusters: [{name: a, targets: [127.0.0.1:9001]}]\nroutes: [{cluster: a}]\n"
		_, err := cluster.ParseFile("x.yaml", []byte(text))
		if err == nil || !strings.Contains(err.Error(), "line 1: proxy") || !strings.Contains(err.Error(), "minimum 1ms") {
			t.Errorf("%s: ParseFile = %v, want an error at line 1: proxy naming the minimum 1ms", field, err)
		}
	}
	a := startBackend(t, "a", "127.0.0.1:0")
	path := writeConfig(t, t.TempDir(), fmt.Sprintf(
		"proxy: {backend_idle_timeout: 1ms, backend_keepalive_time: 1ms, idle_timeout: 1ms, request_idle_timeout: 1ms}\nclusters: [{name: x, targets: [%s]}]\nroutes: [{cluster: x}]\n", a.Addr()))
	r := runFile(t, path, false)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 10*time.Second)
	testkit.WaitFor(ctx, t, "a call through a proxy with 1ms timers", func() bool {
		got, _ := backendOf(ctx, client)
		return got == "a"
	})
}
