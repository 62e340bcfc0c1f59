package proxy_test

import (
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestAtk6TornResponseReportedAsSeen: a backend dies in the middle of a
// message too large to hold back, part of which the client already has.
// The proxy can no longer end the call with trailers and resets the
// stream; the client reports the reset's status, and so must the call's
// report (access log, streamlb_calls_finished_total). Before the fix the
// client saw INTERNAL and the proxy reported UNAVAILABLE.
func TestAtk6TornResponseReportedAsSeen(t *testing.T) {
	msg := payloadMsg(200 << 10) // over the 128 KiB hold-back
	bad := rawBackend(t, func(nc net.Conn) {
		s, err := acceptH2(nc)
		if err != nil || s.hello() != nil {
			return
		}
		s.serve(func(f http2.Frame) bool {
			if h, ok := f.(*http2.HeadersFrame); ok {
				writeGRPCHeaders(s.fr, h.StreamID)
				s.fr.WriteData(h.StreamID, false, msg[:16<<10])
				s.fr.WritePing(false, [8]byte{'t', 'o', 'r', 'n'})
			}
			if p, ok := f.(*http2.PingFrame); ok && p.IsAck() {
				return false // the proxy has the first part: die
			}
			return true
		})
	})
	ends := make(callEnds, 4)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.CountCallEnd = func(ci proxy.CallInfo) { ends <- ci } }})
	e.setBackends(bad)
	ctx := testkit.Context(t, 20*time.Second)
	st, err := e.client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = drain(st.Recv)
	ci := ends.next(t, ctx)
	if got := status.Code(err); ci.Code != got {
		t.Errorf("client got %v (%v); the proxy reported %v (%q)", got, err, ci.Code, ci.Message)
	}
}
