package proxy_test

import (
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestAtk5WaitingCallsSurviveBackendLoss: a backend takes 2 streams at
// a time (MAX_CONCURRENT_STREAMS) and the proxy keeps one connection to
// it, so most calls picked for it wait in the proxy for a slot. The
// backend is then hard-killed or stopped gracefully. The calls that were
// waiting never reached it: they must go to the other backend and end
// OK; only the two running on it may fail, UNAVAILABLE.
func TestAtk5WaitingCallsSurviveBackendLoss(t *testing.T) {
	for _, how := range []string{"kill", "graceful"} {
		t.Run(how, func(t *testing.T) {
			verifyNoLeaks(t)
			e := newEnv(t, envOpts{backends: 2, policy: "round_robin",
				tscfg: func(i int, c *testserver.Config) {
					*c = atk5Config(c.Name)
					if i == 0 {
						c.ServerOptions = []grpc.ServerOption{grpc.MaxConcurrentStreams(2)}
					}
				},
				pcfg: func(c *proxy.Config) { c.MaxBackendConns = 1 },
			})
			ctx := testkit.Context(t, 30*time.Second)
			const n = 30
			var wg sync.WaitGroup
			errs := make(chan error, n)
			for i := 0; i < n; i++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					st, err := e.client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{
						Payload:            &testgrpc.Payload{Body: []byte{byte(i)}},
						ResponseParameters: []*testgrpc.ResponseParameters{{Size: 10, IntervalUs: 400_000}, {Size: 10}}})
					if err == nil {
						_, err = drain(st.Recv)
					}
					errs <- err
				}()
			}
			time.Sleep(150 * time.Millisecond)
			if how == "kill" {
				e.backends[0].Stop()
			} else {
				go e.backends[0].GracefulStop()
			}
			wg.Wait()
			close(errs)
			failed := 0
			for err := range errs {
				if err != nil {
					failed++
					if status.Code(err) != codes.Unavailable || how == "graceful" {
						t.Errorf("call: %v", err)
					}
				}
			}
			t.Logf("%d of %d calls failed; backend 0 served %d", failed, n, e.backends[0].Calls())
			if failed > 2 {
				t.Errorf("%d calls failed; only the 2 running on the lost backend may", failed)
			}
		})
	}
}
