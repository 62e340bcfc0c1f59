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

const unaryCall = "/grpc.testing.TestService/UnaryCall"

// timeoutPicker is the director as a proxy.UpstreamPicker that gives the
// calls of one method a route timeout, so that the proxy itself ends
// them with DEADLINE_EXCEEDED while the client, which set no deadline,
// waits for the answer (no client cancel races the proxy's own status).
type timeoutPicker struct {
	d       *director.Director
	method  string
	timeout time.Duration
}

func (p timeoutPicker) Pick(ctx context.Context, method string) (string, func(error), error) {
	return p.d.Pick(ctx, method)
}

func (p timeoutPicker) PickUpstream(ctx context.Context, method string, _ *proxy.Upstream, avoid []string) (proxy.UpstreamPick, error) {
	addr, done, err := p.d.PickExcluding(ctx, method, avoid)
	pk := proxy.UpstreamPick{Addr: addr, Done: done}
	if method == p.method {
		pk.Timeout = p.timeout
	}
	return pk, err
}

// TestRetryBudgetCountsBackendAnswers: gRFC A6 counts the answers of
// servers, and grpc-go's throttler (clientconn.go retryThrottler) gives
// back tokenRatio for a call that ended OK only and takes a token for a
// retryable code (here UNAVAILABLE) only. The proxy's own statuses are no
// backend's answer: a DEADLINE_EXCEEDED the proxy made because the call's
// time ran out while the backend had not answered must not refill the
// bucket, nor may a backend's NOT_FOUND (not a success). A backend that
// cannot be reached (connection refused) still takes tokens, as grpc-go's
// UNAVAILABLE for a stream that ended before any header does; otherwise a
// fleet whose every backend is down would never throttle. A call its
// client cancelled is no answer either (it refilled the bucket as a
// success before).
//
// EmptyCall fails UNAVAILABLE on every backend: 100 calls empty the
// bucket of 10 tokens (ratio 1: each success gives back a whole token).
// After each kind of outcome that must not refill it, 10 failing calls
// must make no retry. Before, each proxy-made DEADLINE_EXCEEDED and each
// backend NOT_FOUND or client cancel gave back a token: the bucket was
// full again and the 10 calls made about 5 retries.
func TestRetryBudgetCountsBackendAnswers(t *testing.T) {
	verifyNoLeaks(t)
	var cancelled atomic.Int64
	e := newEnv(t, envOpts{backends: 3,
		tscfg: func(_ int, c *testserver.Config) {
			c.EmptyCallF = func(context.Context, *testgrpc.Empty) (*testgrpc.Empty, error) {
				return nil, status.Error(codes.Unavailable, "down")
			}
			c.UnaryCallF = func(ctx context.Context, in *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
				switch in.GetResponseSize() {
				case 1: // never answers: the route's timeout ends the call
					<-ctx.Done()
					return nil, ctx.Err()
				case 2:
					return nil, status.Error(codes.NotFound, "no such thing")
				}
				return &testgrpc.SimpleResponse{}, nil
			}
		},
		pcfg: func(c *proxy.Config) {
			c.Picker = timeoutPicker{d: c.Picker.(*director.Director), method: unaryCall, timeout: 50 * time.Millisecond}
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
	live := []string{e.backends[0].Addr(), e.backends[1].Addr(), e.backends[2].Addr()}
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
	// retries makes 10 failing calls and returns the retries they made.
	retries := func() int64 {
		t.Helper()
		before := served()
		fail(10)
		return served() - before - 10
	}
	unary := func(n int, size int32, want codes.Code) {
		t.Helper()
		for range n {
			_, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: size})
			if status.Code(err) != want {
				t.Fatalf("UnaryCall(size %d): got %v, want %v", size, err, want)
			}
		}
	}
	fail(100) // the bucket is empty

	unary(20, 1, codes.DeadlineExceeded)
	if n := retries(); n != 0 {
		t.Errorf("after 20 calls the proxy ended DEADLINE_EXCEEDED (no backend answer), 10 failing calls made %d retries, want 0: the proxy's own statuses gave back retry tokens", n)
	}

	unary(20, 2, codes.NotFound)
	if n := retries(); n != 0 {
		t.Errorf("after 20 NOT_FOUND answers, 10 failing calls made %d retries, want 0: a backend's error was counted a success", n)
	}

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
	if n := retries(); n != 0 {
		t.Errorf("after %d client cancels, 10 failing calls made %d retries, want 0: the cancels gave back retry tokens", cancels, n)
	}

	// The control: OK answers do refill the bucket (20 tokens, capped at
	// 10), so the failing calls retry again until half is spent.
	unary(20, 0, codes.OK)
	if n := retries(); n == 0 {
		t.Fatal("after 20 OK answers, 10 failing calls made no retry: successes did not refill the bucket; the test proves nothing")
	}

	// A fleet that refuses connections drains the bucket too: refill it,
	// fail 30 calls on backends that are all down, and the failing
	// backends must find it empty.
	unary(20, 0, codes.OK)
	e.setBackends(testkit.DeadAddr(t), testkit.DeadAddr(t), testkit.DeadAddr(t))
	for range 30 {
		if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); status.Code(err) != codes.Unavailable {
			t.Fatalf("got %v, want UNAVAILABLE from backends that refuse connections", err)
		}
	}
	e.setBackends(live...)
	if n := retries(); n != 0 {
		t.Errorf("after 30 calls failed on backends refusing connections, 10 failing calls made %d retries, want 0: unreachable backends took no retry token", n)
	}
}
