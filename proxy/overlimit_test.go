package proxy_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestOverLimitAtHandshakeWaitsBounded: three calls take slots on a new
// backend connection on the assumed limit, before the backend's SETTINGS;
// the SETTINGS then say MAX_CONCURRENT_STREAMS 1, and the one call opened
// hangs on the backend. The two left over wait for a slot as calls at the
// connection cap do: counted as waiting, and failing with UNAVAILABLE at
// BackendPendingTimeout, not left waiting as long as the backend's call
// runs (before: uncounted, until the client's deadline). With the wait
// queue off they fail at once with UNAVAILABLE (the connection cap is 1,
// so no other connection can take them). The opened call succeeds once
// the backend answers, and nothing stays pending.
func TestOverLimitAtHandshakeWaitsBounded(t *testing.T) {
	const pendingTimeout = 1500 * time.Millisecond
	for _, queue := range []bool{true, false} {
		t.Run(map[bool]string{true: "queue", false: "noqueue"}[queue], func(t *testing.T) {
			verifyNoLeaks(t)
			gate := make(chan struct{})
			b := &settingsBackend{gate: gate}
			addr := rawBackend(t, b.serve)
			e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
				c.MaxBackendConns = 1
				c.BackendPendingTimeout = pendingTimeout
				c.HandshakeTimeout = 20 * time.Second // the calls wait for the handshake, not elsewhere
				if !queue {
					c.MaxBackendPending = -1
				}
			}})
			e.setBackends(addr)
			srv := e.srv.(*proxy.Server)
			ctx := testkit.Context(t, 30*time.Second)
			hang := metadata.AppendToOutgoingContext(ctx, "x-hang", "1")
			type result struct {
				err error
				end time.Time
			}
			res := make(chan result, 3)
			var start time.Time
			for range 3 {
				go func() {
					cctx, cancel := context.WithTimeout(hang, 10*time.Second)
					defer cancel()
					_, err := e.client.EmptyCall(cctx, &testgrpc.Empty{})
					res <- result{err, time.Now()}
				}()
			}
			testkit.WaitFor(ctx, t, "three calls waiting for the handshake", func() bool { return srv.PendingAttempts() == 3 })
			start = time.Now()
			close(gate)
			if queue {
				testkit.WaitFor(ctx, t, "two calls counted as waiting", func() bool { return srv.Waiting() == 2 })
			}
			for range 2 {
				r := <-res
				at := r.end.Sub(start)
				st := status.Convert(r.err)
				want := "every connection is at its stream limit"
				if queue {
					want = "no slot came free within"
				}
				if st.Code() != codes.Unavailable || !strings.Contains(st.Message(), want) {
					t.Errorf("call over the backend's limit: %v after %v, want UNAVAILABLE %q", r.err, at, want)
				}
				if at > 8*time.Second {
					t.Errorf("call over the backend's limit ended after %v, not within its bound", at)
				}
				t.Logf("over the limit: %v after %v", st.Code(), at)
			}
			testkit.WaitFor(ctx, t, "the held call on the backend", func() bool {
				b.mu.Lock()
				defer b.mu.Unlock()
				return len(b.held) == 1
			})
			if n := srv.Waiting(); n != 0 {
				t.Errorf("%d calls still counted waiting", n)
			}
			b.release()
			if r := <-res; r.err != nil {
				t.Errorf("the call the backend took: %v", r.err)
			}
			testkit.WaitFor(ctx, t, "nothing pending", func() bool { return srv.Waiting() == 0 && srv.PendingAttempts() == 0 })
		})
	}
}
