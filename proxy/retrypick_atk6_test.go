package proxy_test

import (
	"context"
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

// noRetryPicker picks from d for a call's first attempt and has nothing
// for a retry, as a director whose set emptied meanwhile.
type noRetryPicker struct{ d *director.Director }

func (p noRetryPicker) Pick(ctx context.Context, m string) (string, func(error), error) {
	return p.d.Pick(ctx, m)
}

func (p noRetryPicker) PickExcluding(context.Context, string, []string) (string, func(error), error) {
	return "", nil, director.ErrNoBackend
}

// TestAtk6RetryWithoutBackendIsNoAttempt: a call whose backend answers a
// retryable UNAVAILABLE, and whose retry finds no backend to pick, made one
// attempt. Before the fix its CallInfo said two (Attempts counted the pick
// that failed), so the access log said retries=1 and
// streamlb_retries_total{outcome="failed"} counted a retry no backend saw.
func TestAtk6RetryWithoutBackendIsNoAttempt(t *testing.T) {
	verifyNoLeaks(t)
	ends := make(callEnds, 4)
	e := newEnv(t, envOpts{backends: 1,
		tscfg: func(_ int, c *testserver.Config) { c.ErrorRate = 1 },
		pcfg: func(c *proxy.Config) {
			c.CountCallEnd = func(ci proxy.CallInfo) { ends <- ci }
			c.RetryOn = []string{"/grpc.testing.TestService/UnaryCall"}
			c.Picker = noRetryPicker{d: c.Picker.(*director.Director)}
		},
		dcfg: func(c *director.Config) { c.EjectAfter = -1 },
	})
	ctx := testkit.Context(t, 20*time.Second)
	_, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("UnaryCall: %v, want the backend's UNAVAILABLE", err)
	}
	ci := ends.next(t, ctx)
	if ci.Attempts != 1 || ci.Backend != e.backends[0].Addr() || ci.Code != codes.Unavailable {
		t.Errorf("CallInfo: %d attempts, backend %s, code %v; want 1 attempt on %s, Unavailable", ci.Attempts, ci.Backend, ci.Code, e.backends[0].Addr())
	}
	if got := e.backends[0].Calls(); got != 1 {
		t.Errorf("backend served %d calls, want 1", got)
	}
}
