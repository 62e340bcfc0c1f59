package proxy_test

import (
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestAtk6StatusNotSentNotReported: the backend answered a
// server-streaming call in full, but the client stopped reading (its
// window closed) and reset the call, its deadline passed say, before the
// proxy could write the rest and the trailers. The client never got the
// backend's OK; the call must not be reported OK. Before the fix it was
// (access log code=OK, calls_finished_total{code="OK"}) for a call whose
// client saw CANCELLED or DEADLINE_EXCEEDED.
func TestAtk6StatusNotSentNotReported(t *testing.T) {
	for _, how := range []string{"RST_STREAM", "connection closed"} {
		t.Run(how, func(t *testing.T) { testStatusNotSent(t, how) })
	}
}

func testStatusNotSent(t *testing.T, how string) {
	ends := make(callEnds, 4)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.CountCallEnd = func(ci proxy.CallInfo) { ends <- ci } }})
	ctx := testkit.Context(t, 20*time.Second)
	// A 1000-byte stream window: the 8 KiB answer all fits in the
	// proxy's window toward the backend, but not in the client's.
	r := dialRawPreface(t, e.addr)
	r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1000})
	req := &testgrpc.StreamingOutputCallRequest{}
	for range 2 {
		req.ResponseParameters = append(req.ResponseParameters, &testgrpc.ResponseParameters{Size: 4 << 10})
	}
	r.headers(1, "/grpc.testing.TestService/StreamingOutputCall", false)
	if err := r.fr.WriteData(1, true, grpcMsg(req)); err != nil {
		t.Fatal(err)
	}
	got := 0
	for got < 1000 {
		if d, ok := r.next(func(f http2.Frame) bool { _, ok := f.(*http2.DataFrame); return ok }).(*http2.DataFrame); ok {
			got += len(d.Data())
		}
	}
	testkit.WaitFor(ctx, t, "the backend to finish the call", func() bool { return e.backends[0].InFlight() == 0 })
	if how == "RST_STREAM" {
		if err := r.fr.WriteRSTStream(1, http2.ErrCodeCancel); err != nil {
			t.Fatal(err)
		}
	} else {
		r.nc.Close()
	}
	if ci := ends.next(t, ctx); ci.Code != codes.Canceled || !ci.ProxyStatus {
		t.Errorf("call reported %v (%q, proxy status %v), want Canceled: the client never read the backend's status", ci.Code, ci.Message, ci.ProxyStatus)
	}
}
