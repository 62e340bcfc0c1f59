package cluster_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// mdBlock, set on a UnaryCall, makes deadlineBackend's handler wait for
// the call's context to end instead of answering.
const mdBlock = "x-test-block"

// deadlineBackend starts a testserver whose UnaryCall and EmptyCall
// record, on the returned func's channel, the time the call's context had
// left when the handler started (-1: no deadline), as the backend read it
// from the grpc-timeout it was sent.
func deadlineBackend(t *testing.T, name string) (*testserver.Server, func() time.Duration) {
	t.Helper()
	left := make(chan time.Duration, 16)
	record := func(ctx context.Context) {
		d := time.Duration(-1)
		if dl, ok := ctx.Deadline(); ok {
			d = time.Until(dl)
		}
		left <- d
	}
	ts := startBackendConfig(t, testserver.Config{
		Name: name,
		UnaryCallF: func(ctx context.Context, _ *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
			record(ctx)
			if md, _ := metadata.FromIncomingContext(ctx); len(md.Get(mdBlock)) > 0 {
				<-ctx.Done()
				return nil, status.FromContextError(ctx.Err()).Err()
			}
			return &testgrpc.SimpleResponse{}, nil
		},
		EmptyCallF: func(ctx context.Context, _ *testgrpc.Empty) (*testgrpc.Empty, error) {
			record(ctx)
			return &testgrpc.Empty{}, nil
		},
	}, "127.0.0.1:0")
	return ts, func() time.Duration {
		select {
		case d := <-left:
			return d
		case <-time.After(10 * time.Second):
			t.Fatal("the backend's handler did not run")
			return 0
		}
	}
}

// TestRouteTimeout runs calls through a route with a 200ms timeout, with
// each engine, to a backend that can be made to never answer. Such a call
// ends DEADLINE_EXCEEDED, saying it was the route's timeout, no sooner
// than 200ms and well before the client's own (longer, or none)
// deadline; the backend was sent a grpc-timeout of at most 200ms and its
// call is cancelled. A shorter client deadline still wins, and is what
// the backend gets. A call that answers in time is not affected, and a
// route without a timeout sends the backend no deadline of its own. The
// access log and metrics count the timed-out call in its cluster.
func TestRouteTimeout(t *testing.T) {
	const routeTimeout = 200 * time.Millisecond
	for _, engine := range cluster.Engines() {
		t.Run(engine, func(t *testing.T) {
			ts, backendLeft := deadlineBackend(t, "s")
			r, logPath := serveLogged(t, writeConfig(t, t.TempDir(), fmt.Sprintf(`
engine: %s
clusters: [{name: slow, targets: [%s]}]
routes:
  - name: bounded
    match: {method_prefix: /grpc.testing.TestService/Unary}
    cluster: slow
    timeout: %v
  - {name: open, cluster: slow}
`, engine, ts.Addr(), routeTimeout)))
			client := dial(t, r.addr)
			ctx := testkit.Context(t, 60*time.Second)
			blocked := metadata.AppendToOutgoingContext(context.Background(), mdBlock, "1")

			var mu sync.Mutex
			timedOut := 0 // calls ended by the route's timeout
			for _, tc := range []struct {
				name   string
				client time.Duration // the client's deadline; 0: none
				block  bool
				// code is the call's; routeTimedOut: its message names
				// the route's timeout; maxLeft: the most the backend's
				// deadline may have left (-1: it must have none).
				code          codes.Code
				routeTimedOut bool
				maxLeft       time.Duration
			}{
				{name: "no client deadline", block: true, code: codes.DeadlineExceeded, routeTimedOut: true, maxLeft: routeTimeout},
				{name: "longer client deadline", client: 20 * time.Second, block: true, code: codes.DeadlineExceeded, routeTimedOut: true, maxLeft: routeTimeout},
				{name: "shorter client deadline", client: 100 * time.Millisecond, block: true, code: codes.DeadlineExceeded, maxLeft: 100 * time.Millisecond},
				{name: "answered in time", code: codes.OK, maxLeft: routeTimeout},
			} {
				t.Run(tc.name, func(t *testing.T) {
					// Not ctx, which has a deadline of its own; cancelled
					// (CANCELLED, no deadline) if the route's timeout does
					// not end the call.
					cctx := context.Background()
					if tc.block {
						cctx = blocked
					}
					cctx, cancel := context.WithCancel(cctx)
					defer time.AfterFunc(10*time.Second, cancel).Stop()
					if tc.client > 0 {
						cctx, cancel = context.WithTimeout(cctx, tc.client)
					}
					defer cancel()
					canceled := ts.Canceled()
					start := time.Now()
					_, err := client.UnaryCall(cctx, &testgrpc.SimpleRequest{})
					took := time.Since(start)
					if status.Code(err) != tc.code {
						t.Fatalf("UnaryCall = %v, want %v", err, tc.code)
					}
					if got := strings.Contains(status.Convert(err).Message(), "route timeout"); got != tc.routeTimedOut {
						t.Errorf("UnaryCall = %v: names the route timeout: %v, want %v", err, got, tc.routeTimedOut)
					}
					if tc.routeTimedOut {
						mu.Lock()
						timedOut++
						mu.Unlock()
						// The timer starts after the client did: never
						// sooner. Later only by a loaded machine's delays.
						if took < routeTimeout-10*time.Millisecond || took > 5*time.Second {
							t.Errorf("UnaryCall timed out after %v, want about %v", took, routeTimeout)
						}
					}
					if left := backendLeft(); left <= 0 || left > tc.maxLeft {
						t.Errorf("backend's deadline had %v left, want above 0 and at most %v", left, tc.maxLeft)
					}
					if tc.block {
						testkit.WaitFor(ctx, t, "the backend's call to be cancelled", func() bool { return ts.Canceled() > canceled })
					}
				})
			}
			t.Run("route without timeout", func(t *testing.T) {
				if _, err := client.EmptyCall(context.Background(), &testgrpc.Empty{}); err != nil {
					t.Fatal(err)
				}
				if left := backendLeft(); left != -1 {
					t.Errorf("backend's deadline had %v left, want none (no route timeout, no client deadline)", left)
				}
			})

			var lines []accessLine
			testkit.WaitFor(ctx, t, "5 access-log lines", func() bool {
				lines = readAccessLog(t, logPath)
				return len(lines) >= 5
			})
			n := 0
			for _, l := range lines {
				if strings.Contains(l.Message, "route timeout") {
					n++
					if l.Cluster != "slow" || l.Code != codes.DeadlineExceeded.String() || !l.ProxyStatus {
						t.Errorf("access-log line of a timed-out call %+v, want cluster slow, code DeadlineExceeded, proxy_status", l)
					}
				}
			}
			if n != timedOut {
				t.Errorf("%d access-log lines name the route timeout, want %d", n, timedOut)
			}
			// Counted as the cluster's DEADLINE_EXCEEDED calls: the two
			// route timeouts, and the shorter client deadline's.
			finished := scrape(t, r.admin, "streamlb_calls_finished_total")
			if got := finished["backend="+ts.Addr()+",code=DeadlineExceeded"]; got != 3 {
				t.Errorf("streamlb_calls_finished_total = %v, want 3 DeadlineExceeded for the backend", finished)
			}
		})
	}
}
