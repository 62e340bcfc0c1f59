package proxy_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestCancelledUploadsEnd: uploads (client streams sending several
// messages) that their clients cancel at random moments, through a
// backend that takes two streams at a time behind one connection, some
// of them waiting for a slot. Every call ends in the proxy: its end is
// reported (OnCallEnd) and its stream leaves the client connection.
func TestCancelledUploadsEnd(t *testing.T) {
	for _, pending := range []int{8, -1} {
		t.Run(fmt.Sprint("pending", pending), func(t *testing.T) {
			verifyNoLeaks(t)
			var mu sync.Mutex
			ends := 0
			e := newEnv(t, envOpts{backends: 1,
				tscfg: func(i int, c *testserver.Config) {
					c.ServerOptions = append(c.ServerOptions, grpc.MaxConcurrentStreams(2))
				},
				pcfg: func(c *proxy.Config) {
					c.MaxBackendConns = 1
					c.MaxBackendPending = pending
					c.BackendPendingTimeout = 60 * time.Millisecond
					c.OnCallEnd = func(proxy.CallInfo) {
						mu.Lock()
						ends++
						mu.Unlock()
					}
				},
			})
			srv := e.srv.(*proxy.Server)
			ctx := testkit.Context(t, 60*time.Second)
			const workers, calls = 8, 40
			var wg sync.WaitGroup
			for w := range workers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					rng := rand.New(rand.NewPCG(uint64(w), 9))
					for range calls {
						cctx, cancel := context.WithCancel(ctx)
						time.AfterFunc(time.Duration(10+rng.IntN(30))*time.Millisecond, cancel)
						st, err := e.client.StreamingInputCall(cctx)
						if err == nil {
							for range 1 + rng.IntN(4) {
								st.Send(&testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: make([]byte, rng.IntN(40<<10))}})
							}
							st.CloseAndRecv()
						}
						cancel()
					}
				}()
			}
			wg.Wait()
			// A call cancelled at once may never have sent its HEADERS:
			// a few fewer ends than calls are allowed, no more.
			testkit.WaitFor(ctx, t, "no stream left on the client connection", func() bool { return srv.ClientStreams() == 0 })
			wctx, wcancel := context.WithTimeout(ctx, 2*time.Second)
			defer wcancel()
			var n int
			for {
				mu.Lock()
				n = ends
				mu.Unlock()
				if n >= workers*calls || wctx.Err() != nil {
					break
				}
				time.Sleep(time.Millisecond)
			}
			if n > workers*calls || n < workers*calls-3 {
				t.Errorf("%d calls' ends of %d; %d waiting, %d pending; backend in flight %d",
					n, workers*calls, srv.Waiting(), srv.PendingAttempts(), e.backends[0].InFlight())
			}
		})
	}
}
