package cluster_test

import (
	"fmt"
	"testing"
	"time"

	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
)

// TestAtk6BackendConnsGauge: streamlb_backend_connections follows the
// backend connections: up with a call, down when the backend dies, and
// down when a reload takes the cluster's backend away.
func TestAtk6BackendConnsGauge(t *testing.T) {
	a := startBackend(t, "a", "127.0.0.1:0")
	b := startBackend(t, "b", "127.0.0.1:0")
	dir := t.TempDir()
	conf := "drain_timeout: 200ms\nclusters: [{name: x, targets: [%s]}]\nroutes: [{cluster: x}]\n"
	path := writeConfig(t, dir, fmt.Sprintf(conf, a.Addr()))
	r := runFile(t, path, true)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 20*time.Second)
	conns := func() float64 { return scrapeAll(t, r.admin, "streamlb_backend_connections")["cluster=x"] }
	if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatal(err)
	}
	if got := conns(); got != 1 {
		t.Errorf("after a call: %v connections, want 1", got)
	}
	writeConfig(t, dir, fmt.Sprintf(conf, b.Addr()))
	if err := r.srv.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(ctx, t, "a's connection to be drained", func() bool { return conns() == 1 })
	b.Stop()
	testkit.WaitFor(ctx, t, "b's connection to go with b", func() bool { return conns() == 0 })
}
