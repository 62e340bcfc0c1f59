package cluster_test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
)

// TestAccessLogNamesRemovedCluster: a call in flight on a cluster that a
// reload removes runs to its end (README), and its access-log line must
// still name that cluster. Before, clusterFor found no routed cluster of
// that name and the line said cluster="", though the data plane handed
// over the name.
func TestAccessLogNamesRemovedCluster(t *testing.T) {
	a := startBackend(t, "a", "127.0.0.1:0")
	b := startBackend(t, "b", "127.0.0.1:0")
	dir := t.TempDir()
	logPath := filepath.Join(dir, "access.log")
	al, err := cluster.OpenAccessLog(logPath, "json", os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { al.Close() })
	path := writeConfig(t, dir, fmt.Sprintf("clusters: [{name: x, targets: [%s]}, {name: y, targets: [%s]}]\nroutes: [{cluster: x}]\n", a.Addr(), b.Addr()))
	f, err := cluster.LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	cfg := f.ServerConfig()
	cfg.AccessLog = al
	r := runServer(t, cfg)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 20*time.Second)
	release := make(chan struct{})
	lc := startLongCall(ctx, client, release)
	if err := <-lc.ready; err != nil || lc.backend != "a" {
		t.Fatalf("long call: %v on %q, want a", err, lc.backend)
	}
	writeConfig(t, dir, fmt.Sprintf("clusters: [{name: y, targets: [%s]}]\nroutes: [{cluster: y}]\n", b.Addr()))
	if err := r.srv.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	close(release)
	if err := <-lc.done; err != nil {
		t.Fatalf("long call: %v", err)
	}
	var line accessLine
	testkit.WaitFor(ctx, t, "the long call's access-log line", func() bool {
		for _, l := range readAccessLog(t, logPath) {
			if l.Method == "/grpc.testing.TestService/FullDuplexCall" {
				line = l
				return true
			}
		}
		return false
	})
	if line.Cluster != "x" || line.Backend != a.Addr() || line.Code != "OK" {
		t.Fatalf("access-log line %+v, want cluster x, backend %s, code OK", line, a.Addr())
	}
}
