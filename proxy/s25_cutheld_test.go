package proxy_test

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestS25CutReleasesHeldRequestBytes: a client sends echo requests on a
// bidi stream and never reads (as TestH2llRequestIdleClientNotReading):
// the proxy ends up holding request bytes its backend does not take. The
// call is cut, by RequestIdleTimeout or by its route's timeout. The
// backend stream goes at once; the client's stream stays in the table
// until the client reads the rest of the message it was being sent and
// its status. The request bytes the proxy held for the backend are
// dropped with the backend stream, and must no longer count as held
// then, not only when the client finally reads (or never). The client,
// when it reads, still gets DEADLINE_EXCEEDED.
func TestS25CutReleasesHeldRequestBytes(t *testing.T) {
	for _, cut := range []string{"request idle", "route timeout"} {
		t.Run(cut, func(t *testing.T) {
			verifyNoLeaks(t)
			ts := startTestserver(t, testserver.Config{Name: "echo", Logger: quietLog})
			cfg := proxy.Config{Logger: quietLog}
			switch cut {
			case "request idle":
				cfg.Picker = pickerTo(ts.Addr())
				cfg.RequestIdleTimeout = 300 * time.Millisecond
			case "route timeout":
				p := &routePicker{addr: ts.Addr(), calls: make(chan *proxy.Upstream, 1)}
				p.timeout.Store(int64(time.Second))
				cfg.Picker = p
			}
			srv, err := proxy.New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			ln := serveProxy(t, srv)
			client := testgrpc.NewTestServiceClient(fixedWindowConn(t, ln.Addr().String(), 64<<10))
			ctx := testkit.Context(t, 30*time.Second)
			cctx, cancel := context.WithCancel(ctx)
			defer cancel()
			st, sent := sendWithoutReading(t, cctx, client)
			testkit.WaitFor(ctx, t, "the call on the backend", func() bool { return ts.InFlight() == 1 })
			testkit.WaitFor(ctx, t, "request bytes held", func() bool { return srv.MaxHeldBytes() > 0 })
			testkit.WaitFor(ctx, t, "the cut (the backend's handler ended)", func() bool { return ts.InFlight() == 0 })
			if srv.ClientStreams() != 1 {
				t.Fatalf("client streams after the cut: %d, want the one waiting for its client to read", srv.ClientStreams())
			}
			wctx, wcancel := context.WithTimeout(ctx, 2*time.Second)
			for srv.MaxHeldBytes() != 0 && wctx.Err() == nil {
				time.Sleep(10 * time.Millisecond)
			}
			wcancel()
			if n, s := srv.MaxHeldBytes(), srv.ClientStreams(); n != 0 {
				t.Errorf("%d request bytes still counted held 2s after the cut, with %d client stream(s) waiting for the client to read; want 0", n, s)
			}
			// The client reads now: its answers, then the status.
			var rerr error
			for i := 0; i < 100_000 && rerr == nil; i++ {
				_, rerr = st.Recv()
			}
			if status.Code(rerr) != codes.DeadlineExceeded {
				t.Errorf("the client read %v, want DEADLINE_EXCEEDED", rerr)
			}
			cancel()
			<-sent
			testkit.WaitFor(ctx, t, "no client streams", func() bool { return srv.ClientStreams() == 0 })
		})
	}
}
