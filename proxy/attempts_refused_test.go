package proxy_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestAttemptsNotCountRefusals: two backends take one stream each, over
// one connection each, and each holds a call. A third call is refused by
// both at the connection cap: a refusal is not an attempt (the call was
// not sent), so with the wait queue on the call waits for a slot on one
// of them and, served there once the held calls end, counts one attempt
// (CallInfo.Attempts 1, no retry in the access log); with the queue off
// it fails UNAVAILABLE having made none. Before, the refusal at the
// first backend counted: 2 attempts (the access log's retries=1) for a
// call sent once, or never.
func TestAttemptsNotCountRefusals(t *testing.T) {
	for _, queue := range []bool{true, false} {
		t.Run(map[bool]string{true: "queue", false: "noqueue"}[queue], func(t *testing.T) {
			verifyNoLeaks(t)
			var mu sync.Mutex
			var ends []proxy.CallInfo
			e := newEnv(t, envOpts{backends: 2, policy: "round_robin",
				tscfg: func(i int, c *testserver.Config) {
					c.ServerOptions = []grpc.ServerOption{grpc.MaxConcurrentStreams(1)}
				},
				pcfg: func(c *proxy.Config) {
					c.MaxBackendConns = 1
					c.MaxBackendPending = 8
					if !queue {
						c.MaxBackendPending = -1
					}
					c.BackendPendingTimeout = 20 * time.Second
					c.OnCallEnd = func(ci proxy.CallInfo) {
						mu.Lock()
						ends = append(ends, ci)
						mu.Unlock()
					}
				}})
			srv := e.srv.(*proxy.Server)
			ctx := testkit.Context(t, 30*time.Second)
			// One call to each backend: their SETTINGS (one stream) are
			// known.
			for range 2 {
				if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
					t.Fatal(err)
				}
			}
			hctx, release := context.WithCancel(metadata.AppendToOutgoingContext(ctx, testserver.MetadataHang, "1"))
			defer release()
			held := make(chan error, 2)
			for range 2 {
				go func() {
					_, err := e.client.EmptyCall(hctx, &testgrpc.Empty{})
					held <- err
				}()
			}
			testkit.WaitFor(ctx, t, "a call held on each backend", func() bool {
				return e.backends[0].InFlight() == 1 && e.backends[1].InFlight() == 1
			})
			cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			defer cancel()
			third := make(chan error, 1)
			go func() {
				_, err := e.client.EmptyCall(cctx, &testgrpc.Empty{})
				third <- err
			}()
			if queue {
				testkit.WaitFor(ctx, t, "the third call waiting", func() bool { return srv.Waiting() == 1 })
				release()
				if err := <-third; err != nil {
					t.Fatalf("the call that waited: %v", err)
				}
			} else {
				if err := <-third; status.Code(err) != codes.Unavailable {
					t.Fatalf("the refused call: %v, want UNAVAILABLE", err)
				}
				release()
			}
			for range 2 {
				<-held
			}
			want := 5 // 2 warm-up, 2 held, the third
			testkit.WaitFor(ctx, t, "a call end per call", func() bool {
				mu.Lock()
				defer mu.Unlock()
				return len(ends) == want
			})
			mu.Lock()
			defer mu.Unlock()
			n := 0
			for _, ci := range ends {
				if ci.Code == codes.Canceled {
					continue // a held call
				}
				n++
				wantAttempts := 1
				if ci.Code == codes.Unavailable {
					wantAttempts = 0
				}
				if ci.Attempts != wantAttempts {
					t.Errorf("call ended %v on %q after %d attempts, want %d", ci.Code, ci.Backend, ci.Attempts, wantAttempts)
				}
			}
			if n != 3 {
				t.Errorf("%d calls ended other than CANCELLED, want 3", n)
			}
		})
	}
}
