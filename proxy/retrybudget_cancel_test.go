package proxy_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestRetryBudgetClientCancel: a call the client cancels is no response
// of a backend, so it neither takes retry tokens nor gives them back
// (gRFC A6 counts the server's answers). Every backend fails EmptyCall
// with UNAVAILABLE: 100 calls empty the bucket of 10 tokens, then 20
// calls cancelled by their client pass, and 10 more failing calls must
// still find the bucket empty: not retried. Before, each cancel gave back
// the ratio (1 token here) as a success would, the bucket was full again
// and the 10 calls made about 5 retries.
func TestRetryBudgetClientCancel(t *testing.T) {
	verifyNoLeaks(t)
	var cancelled atomic.Int64
	e := newEnv(t, envOpts{backends: 3,
		tscfg: func(_ int, c *testserver.Config) {
			c.EmptyCallF = func(context.Context, *testgrpc.Empty) (*testgrpc.Empty, error) {
				return nil, status.Error(codes.Unavailable, "down")
			}
		},
		pcfg: func(c *proxy.Config) {
			c.RetryOn = []string{emptyCall}
			c.RetryBudget = 10
			c.RetryBudgetRatio = 1
			c.CountCallEnd = func(ci proxy.CallInfo) {
				if ci.Code == codes.Canceled {
					cancelled.Add(1)
				}
			}
		},
		dcfg: func(c *director.Config) { c.EjectAfter = -1 },
	})
	ctx := testkit.Context(t, 30*time.Second)
	served := func() (n int64) {
		for _, b := range e.backends {
			n += b.Calls()
		}
		return n
	}
	fail := func(calls int) {
		t.Helper()
		for range calls {
			if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); status.Code(err) != codes.Unavailable {
				t.Fatalf("got %v, want UNAVAILABLE from backends that all fail", err)
			}
		}
	}
	fail(100) // the bucket is empty

	const cancels = 20
	for range cancels {
		cctx, cancel := context.WithCancel(ctx)
		st, err := e.client.FullDuplexCall(cctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := st.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 1}}}); err != nil {
			t.Fatal(err)
		}
		if _, err := st.Recv(); err != nil { // at the backend, answering
			t.Fatal(err)
		}
		cancel()
		if _, err := st.Recv(); status.Code(err) != codes.Canceled {
			t.Fatalf("cancelled call: got %v, want CANCELLED", err)
		}
	}
	testkit.WaitFor(ctx, t, "the proxy to end the cancelled calls", func() bool { return cancelled.Load() == cancels })

	before := served()
	fail(10)
	if retries := served() - before - 10; retries != 0 {
		t.Errorf("10 failing calls after %d client cancels made %d retries, want 0: the cancels gave back retry tokens", cancels, retries)
	}
}
