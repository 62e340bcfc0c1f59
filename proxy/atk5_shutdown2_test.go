package proxy_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestAtk5ShutdownsOverlap: calls that never end on their own (the
// backend waits for the client) hold a Shutdown without a deadline;
// then a second Shutdown whose deadline passes, or a Close, ends them.
// Both calls return, every call ends UNAVAILABLE, and nothing leaks.
func TestAtk5ShutdownsOverlap(t *testing.T) {
	for _, how := range []string{"second shutdown with a deadline", "close"} {
		t.Run(how, func(t *testing.T) {
			verifyNoLeaks(t)
			e := newEnv(t, envOpts{backends: 2, tscfg: func(i int, c *testserver.Config) {
				c.FullDuplexCallF = func(st testgrpc.TestService_FullDuplexCallServer) error {
					<-st.Context().Done()
					return status.FromContextError(st.Context().Err()).Err()
				}
			}})
			ctx := testkit.Context(t, 30*time.Second)
			const n = 20
			ended := make(chan error, n)
			started := make(chan struct{}, n)
			for i := 0; i < n; i++ {
				go func() {
					st, err := e.client.FullDuplexCall(ctx)
					if err != nil {
						started <- struct{}{}
						ended <- err
						return
					}
					err = st.Send(&testgrpc.StreamingOutputCallRequest{})
					started <- struct{}{}
					if err == nil {
						_, err = st.Recv()
					}
					ended <- err
				}()
			}
			for i := 0; i < n; i++ {
				<-started
			}
			time.Sleep(100 * time.Millisecond)
			srv := e.srv.(*proxy.Server)
			first := make(chan error, 1)
			go func() { first <- srv.Shutdown(context.Background()) }()
			time.Sleep(100 * time.Millisecond)
			select {
			case err := <-first:
				t.Fatalf("Shutdown returned %v with calls in flight", err)
			default:
			}
			if how == "close" {
				srv.Close()
			} else {
				sctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
				if err := srv.Shutdown(sctx); !errors.Is(err, context.DeadlineExceeded) {
					t.Errorf("second Shutdown: %v", err)
				}
				cancel()
			}
			select {
			case err := <-first:
				t.Logf("first Shutdown: %v", err)
			case <-time.After(10 * time.Second):
				t.Fatal("the first Shutdown did not return")
			}
			for i := 0; i < n; i++ {
				select {
				case err := <-ended:
					if status.Code(err) != codes.Unavailable {
						t.Errorf("call: %v, want UNAVAILABLE", err)
					}
				case <-time.After(10 * time.Second):
					t.Fatal("a call hung")
				}
			}
		})
	}
}
