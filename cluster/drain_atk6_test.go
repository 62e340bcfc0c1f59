package cluster_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// TestAtk6DrainCutCallsAccounted stops a server whose drain timeout cuts a
// call still in flight: the call must have its access-log line, with the
// code the client got, and leave nothing in flight, for both engines.
func TestAtk6DrainCutCallsAccounted(t *testing.T) {
	for _, engine := range cluster.Engines() {
		t.Run(engine, func(t *testing.T) {
			ts := startBackend(t, "a", "127.0.0.1:0")
			logPath := filepath.Join(t.TempDir(), "access.log")
			al, err := cluster.OpenAccessLog(logPath, "json", os.Stderr)
			if err != nil {
				t.Fatal(err)
			}
			defer al.Close()
			reg := prometheus.NewRegistry()
			srv, err := cluster.NewServer(cluster.ServerConfig{Engine: engine, Logger: quiet, Metrics: reg, AccessLog: al,
				DrainTimeout: 200 * time.Millisecond, Cluster: cluster.Config{Name: "echo", Targets: []string{ts.Addr()}}})
			if err != nil {
				t.Fatal(err)
			}
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			aln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			rctx, stop := context.WithCancel(context.Background())
			defer stop()
			ran := make(chan error, 1)
			go func() { ran <- srv.Run(rctx, ln, aln) }()
			ctx := testkit.Context(t, 20*time.Second)
			client := dial(t, ln.Addr().String())
			res := make(chan error, 1)
			go func() {
				_, err := client.UnaryCall(metadata.AppendToOutgoingContext(ctx, testserver.MetadataHang, "1"), &testgrpc.SimpleRequest{})
				res <- err
			}()
			testkit.WaitFor(ctx, t, "the call to reach the backend", func() bool { return ts.InFlight() == 1 })
			stop()
			got := status.Code(<-res)
			if err := <-ran; err != nil {
				t.Fatalf("Run: %v", err)
			}
			lines := readAccessLog(t, logPath)
			if len(lines) != 1 || lines[0].Code != got.String() {
				t.Fatalf("client got %v; access log %+v, want one line with that code", got, lines)
			}
			if got != codes.Unavailable {
				t.Errorf("client got %v, want Unavailable (shutting down)", got)
			}
			fams, err := reg.Gather()
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range fams {
				switch f.GetName() {
				case "streamlb_calls_in_flight":
					for _, m := range f.GetMetric() {
						if v := m.GetGauge().GetValue(); v != 0 {
							t.Errorf("in flight %v after Run returned", v)
						}
					}
				case "streamlb_calls_finished_total":
					n := 0.0
					for _, m := range f.GetMetric() {
						n += m.GetCounter().GetValue()
					}
					if n != 1 {
						t.Errorf("calls finished %v, want 1", n)
					}
				}
			}
		})
	}
}
