package cluster_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
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
			r, logPath := serveLogged(t, writeConfig(t, t.TempDir(), fmt.Sprintf(`
engine: %s
clusters: [{name: slow, targets: [%s]}]
routes:
  - {name: bounded, cluster: slow, timeout: %v}
`, engine, ts.Addr(), routeTimeout)))
			client := dial(t, r.addr)
			ctx := testkit.Context(t, 60*time.Second)

			check := func(what string, err error) {
				t.Helper()
				if status.Code(err) != codes.DeadlineExceeded || !strings.Contains(status.Convert(err).Message(), "route timeout") {
					t.Errorf("%s = %v, want DEADLINE_EXCEEDED naming the route timeout", what, err)
				}
			}
			_, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
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

// TestRouteTimeoutTornMessage: the route's timeout passes while a large
// response message is partly written to a client that does not read (a
// small window), the rest of it still at the backend. The frame engine
// cannot end the call with trailers there and resets the stream with
// CANCEL, which grpc-go's client reports as DEADLINE_EXCEEDED only once
// its own deadline passed: this client's is far off, so it sees
// CANCELLED. The access log and streamlb_calls_finished_total must say
// what the client saw (they said DEADLINE_EXCEEDED), with either engine.
func TestRouteTimeoutTornMessage(t *testing.T) {
	const routeTimeout = 300 * time.Millisecond
	for _, engine := range cluster.Engines() {
		t.Run(engine, func(t *testing.T) {
			ts := startBackendConfig(t, testserver.Config{
				Name: "s",
				StreamingOutputCallF: func(_ *testgrpc.StreamingOutputCallRequest, st testgrpc.TestService_StreamingOutputCallServer) error {
					// Under the grpc-proxy engine's 4 MiB message limit.
					if err := st.Send(&testgrpc.StreamingOutputCallResponse{Payload: &testgrpc.Payload{Body: make([]byte, 3<<20)}}); err != nil {
						return err
					}
					<-st.Context().Done()
					return st.Context().Err()
				},
			}, "127.0.0.1:0")
			r, logPath := serveLogged(t, writeConfig(t, t.TempDir(), fmt.Sprintf(`
engine: %s
clusters: [{name: slow, targets: [%s]}]
routes:
  - {name: bounded, cluster: slow, timeout: %v}
`, engine, ts.Addr(), routeTimeout)))
			// Fixed 64 KiB windows: the client's transport takes that
			// much of the message and no more until the call reads.
			cc, err := grpc.NewClient(r.addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
				grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10),
				grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20)))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { cc.Close() })
			client := testgrpc.NewTestServiceClient(cc)
			ctx := testkit.Context(t, 60*time.Second)
			cctx, cancel := context.WithTimeout(ctx, 30*time.Second) // far later than the route's
			defer cancel()
			st, err := client.StreamingOutputCall(cctx, &testgrpc.StreamingOutputCallRequest{})
			if err != nil {
				t.Fatal(err)
			}
			// Not reading until the route's timeout has surely passed.
			time.Sleep(routeTimeout + 500*time.Millisecond)
			for err == nil {
				_, err = st.Recv()
			}
			code := status.Code(err)
			if code != codes.DeadlineExceeded && code != codes.Canceled {
				t.Fatalf("Recv = %v, want DEADLINE_EXCEEDED or CANCELLED", err)
			}
			var lines []accessLine
			testkit.WaitFor(ctx, t, "the access-log line", func() bool {
				lines = readAccessLog(t, logPath)
				return len(lines) >= 1
			})
			if l := lines[0]; l.Code != code.String() || !strings.Contains(l.Message, "route timeout") {
				t.Errorf("access-log line %+v, want code %v (the client's: %v) and a message naming the route timeout", l, code, err)
			}
			finished := scrape(t, r.admin, "streamlb_calls_finished_total")
			if got := finished["backend="+ts.Addr()+",code="+code.String()]; got != 1 {
				t.Errorf("streamlb_calls_finished_total = %v, want 1 %v (the client's code)", nonZero(finished), code)
			}
		})
	}
}
