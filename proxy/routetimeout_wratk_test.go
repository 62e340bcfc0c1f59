package proxy_test

import (
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc/codes"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestRouteTimeoutClientDeadlineReset: the route's timeout is a little
// shorter than the client's own deadline, so it is the call's, and the
// client resets the call with CANCEL a moment before its own deadline,
// as a gRPC client does when its deadline passes (the proxy's route timer,
// running late on a loaded machine, not fired yet). The client reports
// DEADLINE_EXCEEDED, and so must the call's report, as without a route
// timeout (TestAtk6DeadlineResetIsDeadline): the frame engine reported a
// client reset, CANCELLED (12 of 300 calls in a load run of route timeouts
// and client deadlines around 100ms).
func TestRouteTimeoutClientDeadlineReset(t *testing.T) {
	const (
		route  = 300 * time.Millisecond
		client = route + time.Millisecond // grpc-timeout "301m"
		early  = 13 * time.Millisecond    // the reset, before the client's deadline: within the proxy's slack
	)
	for _, engine := range engines {
		t.Run(engine, func(t *testing.T) {
			ts := startTestserver(t, testserver.Config{Name: "b0", Logger: quietLog})
			ends := make(callEnds, 4)
			hook := func(ci proxy.CallInfo) { ends <- ci }
			p := &routePicker{addr: ts.Addr(), calls: make(chan *proxy.Upstream, 1)}
			p.timeout.Store(int64(route))
			var srv server
			var err error
			if engine == "frame" {
				srv, err = proxy.New(proxy.Config{Picker: p, Logger: quietLog, CountCallEnd: hook})
			} else {
				srv, err = proxy.NewReference(proxy.ReferenceConfig{Picker: p, Logger: quietLog, OnCallEnd: hook})
			}
			if err != nil {
				t.Fatal(err)
			}
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			serveOn(t, srv, ln)
			ctx := testkit.Context(t, 20*time.Second)
			r := dialRaw(t, ln.Addr().String())
			sent := time.Now()
			rawCall(t, r, 1, "/grpc.testing.TestService/UnaryCall", "grpc-timeout", "301m", testserver.MetadataHang, "1")
			testkit.WaitFor(ctx, t, "the call to reach the backend", func() bool { return ts.InFlight() == 1 })
			<-time.After(client - early - time.Since(sent))
			if err := r.fr.WriteRSTStream(1, http2.ErrCodeCancel); err != nil {
				t.Fatal(err)
			}
			// DEADLINE_EXCEEDED, the client's or (should the route's
			// timer have run first) the route's.
			if ci := ends.next(t, ctx); ci.Code != codes.DeadlineExceeded {
				t.Errorf("call reported %v (%q), want DeadlineExceeded", ci.Code, ci.Message)
			}
		})
	}
}
