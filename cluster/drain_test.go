package cluster_test

import (
	"context"
	"net"
	"testing"
	"time"

	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// TestDrainKeepsClusterRunning: during a graceful drain the cluster keeps
// running (health checks, ejection), so the picks made while streams finish
// (retries, streams racing the GOAWAY) still avoid a backend that fails its
// health checks. The cluster used to stop when the drain began, and the
// director then counted every backend healthy again.
func TestDrainKeepsClusterRunning(t *testing.T) {
	good := startBackend(t, "good", "127.0.0.1:0")
	bad := startBackend(t, "bad", "127.0.0.1:0")
	bad.SetServing(false)
	srv, err := cluster.NewServer(cluster.ServerConfig{
		Logger:       quiet,
		DrainTimeout: 10 * time.Second,
		Cluster: cluster.Config{Targets: []string{good.Addr(), bad.Addr()}, Director: director.Config{
			HealthCheckInterval: 50 * time.Millisecond, HealthCheckService: testserver.ServiceName,
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- srv.Run(ctx, ln, nil) }()
	unhealthy := func() bool {
		for _, b := range srv.Cluster().Backends() {
			if b.Addr == bad.Addr() {
				return !b.Healthy
			}
		}
		return false
	}
	wctx := testkit.Context(t, 10*time.Second)
	testkit.WaitFor(wctx, t, "the NOT_SERVING backend to be unhealthy", unhealthy)
	// A call that hangs keeps the drain open.
	client := dial(t, ln.Addr().String())
	hctx, hcancel := context.WithCancel(metadata.AppendToOutgoingContext(context.Background(), testserver.MetadataHang, "1"))
	callDone := make(chan struct{})
	go func() { client.EmptyCall(hctx, &testgrpc.Empty{}); close(callDone) }()
	testkit.WaitFor(wctx, t, "the hanging call at the good backend", func() bool { return good.InFlight() > 0 })
	cancel() // SIGTERM: drain starts
	// Give a stopped director time to forget health, as it used to.
	time.Sleep(300 * time.Millisecond)
	select {
	case <-ran:
		t.Fatal("Run returned before the hanging call ended")
	default:
	}
	if !unhealthy() {
		t.Errorf("during the drain, the NOT_SERVING backend %s counts as healthy again (director.Run already stopped)", bad.Addr())
		picked := 0
		for range 10 {
			addr, done, err := srv.Cluster().Picker().Pick(context.Background(), "/x/y")
			if err == nil {
				if addr == bad.Addr() {
					picked++
				}
				done(nil)
			}
		}
		t.Errorf("%d of 10 picks during the drain went to the NOT_SERVING backend", picked)
	}
	hcancel()
	<-callDone
	if err := <-ran; err != nil {
		t.Fatal(err)
	}
}
