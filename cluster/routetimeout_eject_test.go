package cluster_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/testserver"
)

// TestRouteTimeoutEjectsHungBackend: with the frame engine, a route's
// timeout that passes while the backend has the whole request and has
// sent nothing counts towards the backend's outlier ejection (proxy's
// Unanswered), as Envoy counts its upstream timeouts: a backend that
// accepts calls and never answers is ejected after ejection.after of them
// in a row, and the calls after that all go to the backend that answers.
// A client's own deadline, shorter than the route's, never ejects: the
// hung backend keeps getting its share. Before, route timeouts counted for
// nothing and the hung backend got every other call for ever.
//
// The backend is sent what is left of the route's timeout as its
// grpc-timeout, and its own timer may run out a moment before the
// proxy's: its trailers-only DEADLINE_EXCEEDED then ends the call
// ("backend gives up first", which answers 10 ms early). That is the same
// unanswered call and must eject the same; it counted for nothing, and
// under load (a CI run: the hung backend got 5 calls) the race made the
// first case fail.
func TestRouteTimeoutEjectsHungBackend(t *testing.T) {
	for _, tc := range []struct {
		name          string
		routeTimeout  time.Duration
		clientTimeout time.Duration
		early         time.Duration // the hung backend answers DEADLINE_EXCEEDED this long before its deadline
		ejected       bool
	}{
		{name: "route timeout", routeTimeout: 150 * time.Millisecond, ejected: true},
		{name: "backend gives up first", routeTimeout: 150 * time.Millisecond, early: 10 * time.Millisecond, ejected: true},
		{name: "client deadline", routeTimeout: 20 * time.Second, clientTimeout: 150 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hung := startBackendConfig(t, testserver.Config{
				Name: "hung",
				UnaryCallF: func(ctx context.Context, _ *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
					if d, ok := ctx.Deadline(); ok && tc.early > 0 {
						select {
						case <-time.After(time.Until(d) - tc.early):
							return nil, status.Error(codes.DeadlineExceeded, "hung: deadline")
						case <-ctx.Done():
						}
					}
					<-ctx.Done()
					return nil, status.FromContextError(ctx.Err()).Err()
				},
			}, "127.0.0.1:0")
			good := startBackend(t, "good", "127.0.0.1:0")
			r, _ := serveLogged(t, writeConfig(t, t.TempDir(), fmt.Sprintf(`
engine: frame
clusters:
  - name: c
    targets: [%s, %s]
    policy: round_robin
    ejection: {after: 2, base: 1m, max_percent: 50}
routes:
  - {name: bounded, cluster: c, timeout: %v}
`, hung.Addr(), good.Addr(), tc.routeTimeout)))
			client := dial(t, r.addr)
			const calls = 16
			var codesSeen []codes.Code
			for i := range calls {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				if tc.clientTimeout > 0 {
					ctx, cancel = context.WithTimeout(context.Background(), tc.clientTimeout)
				}
				_, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
				cancel()
				code := status.Code(err)
				codesSeen = append(codesSeen, code)
				switch {
				case code == codes.OK:
				case code != codes.DeadlineExceeded:
					t.Fatalf("call %d: %v, want OK or DEADLINE_EXCEEDED", i, err)
				case tc.clientTimeout == 0 && !strings.Contains(status.Convert(err).Message(), "route timeout"):
					t.Fatalf("call %d: %v, want the route timeout's status", i, err)
				}
			}
			late := 0 // timed-out calls in the second half
			for _, c := range codesSeen[calls/2:] {
				if c == codes.DeadlineExceeded {
					late++
				}
			}
			if tc.ejected && late != 0 {
				t.Errorf("codes %v: %d calls of the second half timed out, want none (the hung backend ejected)", codesSeen, late)
			}
			if !tc.ejected && late == 0 {
				t.Errorf("codes %v: no call of the second half reached the hung backend, want its share (a client's deadline ejects nothing)", codesSeen)
			}
			if tc.ejected && hung.Calls() > 4 {
				t.Errorf("the hung backend got %d calls, want at most 4 (ejected after 2 in a row)", hung.Calls())
			}
		})
	}
}
