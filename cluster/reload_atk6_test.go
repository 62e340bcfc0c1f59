package cluster_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// TestAtk6ReloadRemovesCallsCluster: a reload replaces the cluster a call
// is running on with another cluster, on the same backend and on another;
// when the call ends, its line names the cluster it ran on, and the new
// cluster's metrics do not count it. For both engines.
func TestAtk6ReloadRemovesCallsCluster(t *testing.T) {
	for _, engine := range cluster.Engines() {
		for _, same := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/same backend %v", engine, same), func(t *testing.T) {
				a := startBackend(t, "a", "127.0.0.1:0")
				b := a
				if !same {
					b = startBackend(t, "b", "127.0.0.1:0")
				}
				dir := t.TempDir()
				conf := "engine: %s\nclusters: [{name: %s, targets: [%s]}]\nroutes: [{cluster: %s}]\n"
				path := writeConfig(t, dir, fmt.Sprintf(conf, engine, "old", a.Addr(), "old"))
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
				// Ends after the reload, with a 10-byte answer.
				res := make(chan error, 1)
				go func() {
					_, err := client.UnaryCall(metadata.AppendToOutgoingContext(ctx, testserver.MetadataDelay, "500ms"), &testgrpc.SimpleRequest{ResponseSize: 10})
					res <- err
				}()
				testkit.WaitFor(ctx, t, "the call to reach a", func() bool { return a.InFlight() == 1 })
				writeConfig(t, dir, fmt.Sprintf(conf, engine, "new", b.Addr(), "new"))
				if err := r.srv.Reload(ctx); err != nil {
					t.Fatal(err)
				}
				if err := <-res; err != nil {
					t.Fatalf("call: %v", status.Convert(err))
				}
				var lines []accessLine
				testkit.WaitFor(ctx, t, "the line", func() bool {
					lines = readAccessLog(t, logPath)
					return len(lines) == 1
				})
				if l := lines[0]; l.Cluster != "old" || l.Backend != a.Addr() {
					t.Errorf("line: cluster %q backend %s, want old and %s", l.Cluster, l.Backend, a.Addr())
				}
				if got := scrapeAll(t, r.admin, "streamlb_response_bytes_total"); got["backend="+b.Addr()+",cluster=new"] != 0 {
					t.Errorf("new cluster counted the old cluster's call: %v", got)
				}
			})
		}
	}
}
