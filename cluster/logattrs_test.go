package cluster_test

import (
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
)

// TestClusterLogsNameComponentOnce: the log lines of a configuration
// file's clusters carry cluster=NAME and the component of the part that
// logged (resolver, director, proxy) once. Before, they also carried the
// file loader's component=config: "component=config cluster=a
// component=director".
func TestClusterLogsNameComponentOnce(t *testing.T) {
	a := startBackend(t, "a", "127.0.0.1:0")
	dir := t.TempDir()
	path := writeConfig(t, dir, fmt.Sprintf("clusters: [{name: a, targets: [%s]}]\nroutes: [{cluster: a}]\n", a.Addr()))
	f, err := cluster.LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	cfg := f.ServerConfig()
	var logs syncBuffer
	cfg.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	r := runServer(t, cfg)
	ctx := testkit.Context(t, 20*time.Second)
	if got, err := backendOf(ctx, dial(t, r.addr)); err != nil || got != "a" {
		t.Fatalf("call: backend %q, %v; want a", got, err)
	}
	var named int
	for _, line := range strings.Split(logs.String(), "\n") {
		if n := strings.Count(line, "component="); n > 1 {
			t.Errorf("component named %d times: %s", n, line)
		}
		if strings.Contains(line, "cluster=a") && strings.Contains(line, "component=") {
			named++
		}
	}
	if named == 0 {
		t.Errorf("no line names both the cluster and its component:\n%s", logs.String())
	}
}
