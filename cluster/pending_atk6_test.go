package cluster_test

import (
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
)

// TestAtk6CancelWhileConnecting: calls waiting for a backend that never
// finishes its HTTP/2 handshake, cancelled or run out of deadline by
// their clients: each has its line with the client's code, and nothing
// stays in flight.
func TestAtk6CancelWhileConnecting(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { ln.Close(); <-done })
	go func() {
		defer close(done)
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c)
			go io.Copy(io.Discard, c) // silent: never sends SETTINGS
		}
	}()
	for _, engine := range cluster.Engines() {
		t.Run(engine, func(t *testing.T) {
			al, logPath := openJSONLog(t)
			r := runServer(t, cluster.ServerConfig{Engine: engine, Metrics: prometheus.NewRegistry(), AccessLog: al,
				Cluster: cluster.Config{Name: "echo", Targets: []string{ln.Addr().String()}}})
			client := dial(t, r.addr)
			ctx := testkit.Context(t, 20*time.Second)
			cctx, cancel := context.WithCancel(ctx)
			res := make(chan error, 1)
			go func() { _, err := client.EmptyCall(cctx, &testgrpc.Empty{}); res <- err }()
			testkit.WaitFor(ctx, t, "the call to be picked", func() bool {
				return scrape(t, r.admin, "streamlb_calls_in_flight")["backend="+ln.Addr().String()] == 1
			})
			cancel()
			if err := <-res; status.Code(err) != codes.Canceled {
				t.Fatalf("cancelled call: %v", err)
			}
			dctx, dcancel := context.WithTimeout(ctx, 300*time.Millisecond)
			defer dcancel()
			_, err = client.EmptyCall(dctx, &testgrpc.Empty{})
			if status.Code(err) != codes.DeadlineExceeded {
				t.Fatalf("call with a deadline: %v", err)
			}
			var lines []accessLine
			testkit.WaitFor(ctx, t, "two lines", func() bool {
				lines = readAccessLog(t, logPath)
				return len(lines) >= 2
			})
			if lines[0].Code != "Canceled" || lines[1].Code != "DeadlineExceeded" {
				t.Errorf("lines %+v, want Canceled then DeadlineExceeded", lines)
			}
			assertSettled(ctx, t, r.admin)
		})
	}
}
