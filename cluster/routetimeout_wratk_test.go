package cluster_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// TestRouteTimeoutBackendFirst: a backend enforcing the grpc-timeout the
// proxy sent it (what was left of the route's timeout) gives up a moment
// before the proxy's own timer fires, and answers DEADLINE_EXCEEDED
// itself, as grpc-go's server does when its handler returns ctx.Err()
// (on a loaded machine, the proxy's timer runs late by more than the
// transit time that makes the backend's deadline later). With both
// engines the client is told, as when the backend resets the stream
// with CANCEL then, that the route's timeout passed, and the access log
// says the proxy made the status: the frame engine relayed the backend's
// own "context deadline exceeded" as the backend's answer, and
// TestRouteTimeout failed now and then under -race.
func TestRouteTimeoutBackendFirst(t *testing.T) {
	const routeTimeout = 300 * time.Millisecond
	// giveUp waits until ctx has early left before its deadline, as a
	// backend whose timer runs a moment ahead of the proxy's.
	const early = 3 * time.Millisecond
	giveUp := func(ctx context.Context) error {
		dl, ok := ctx.Deadline()
		if !ok {
			return status.Error(codes.FailedPrecondition, "the backend was sent no deadline")
		}
		select {
		case <-time.After(time.Until(dl) - early):
		case <-ctx.Done():
		}
		return status.Error(codes.DeadlineExceeded, "context deadline exceeded")
	}
	for _, engine := range cluster.Engines() {
		t.Run(engine, func(t *testing.T) {
			ts := startBackendConfig(t, testserver.Config{
				Name: "s",
				UnaryCallF: func(ctx context.Context, _ *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
					return nil, giveUp(ctx)
				},
				StreamingOutputCallF: func(_ *testgrpc.StreamingOutputCallRequest, st testgrpc.TestService_StreamingOutputCallServer) error {
					if err := st.Send(&testgrpc.StreamingOutputCallResponse{}); err != nil {
						return err
					}
					return giveUp(st.Context())
				},
			}, "127.0.0.1:0")
			f, err := cluster.LoadFile(writeConfig(t, t.TempDir(), fmt.Sprintf(`
engine: %s
clusters: [{name: slow, targets: [%s]}]
routes:
  - {name: bounded, cluster: slow, timeout: %v}
`, engine, ts.Addr(), routeTimeout)))
			if err != nil {
				t.Fatal(err)
			}
			cfg := f.ServerConfig()
			cfg.Metrics = prometheus.NewRegistry()
			logPath := fileAccessLog(t, &cfg)
			r := runServer(t, cfg)
			client := dial(t, r.addr)
			ctx := testkit.Context(t, 60*time.Second)

			check := func(what string, err error) {
				t.Helper()
				if status.Code(err) != codes.DeadlineExceeded || !strings.Contains(status.Convert(err).Message(), "route timeout") {
					t.Errorf("%s = %v, want DEADLINE_EXCEEDED naming the route timeout", what, err)
				}
			}
			_, err = client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
			check("UnaryCall", err)

			st, err := client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{})
			if err != nil {
				t.Fatal(err)
			}
			got := 0
			for {
				if _, err = st.Recv(); err != nil {
					break
				}
				got++
			}
			check("StreamingOutputCall", err)

			var lines []accessLine
			testkit.WaitFor(ctx, t, "2 access-log lines", func() bool {
				lines = readAccessLog(t, logPath)
				return len(lines) >= 2
			})
			for _, l := range lines {
				if l.Code != codes.DeadlineExceeded.String() || !strings.Contains(l.Message, "route timeout") || !l.ProxyStatus || l.Cluster != "slow" {
					t.Errorf("access-log line %+v, want DeadlineExceeded, a message naming the route timeout, proxy_status, cluster slow", l)
				}
			}
			finished := scrape(t, r.admin, "streamlb_calls_finished_total")
			if got := finished["backend="+ts.Addr()+",code=DeadlineExceeded"]; got != 2 {
				t.Errorf("streamlb_calls_finished_total = %v, want 2 DeadlineExceeded", nonZero(finished))
			}
		})
	}
}
