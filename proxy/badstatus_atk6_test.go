package proxy_test

import (
	"bytes"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestAtk6BackendStatusAsClientSeesIt: a backend's trailers are relayed
// as they are, so the status the proxy reports for the call (access log,
// streamlb_calls_finished_total) must be the one a gRPC client reads from
// them. A grpc-status that is not a 32-bit number is INTERNAL to grpc-go
// ("transport: malformed grpc-status"); the proxy reported UNKNOWN, or,
// for a number over 32 bits, a code no client sees.
func TestAtk6BackendStatusAsClientSeesIt(t *testing.T) {
	for _, tc := range []struct {
		name, value string
	}{
		{name: "not a number", value: "abc"},
		{name: "over 32 bits", value: "4294967310"},
		{name: "negative", value: "-1"},
		{name: "a code beyond the known", value: "99"},
		{name: "a known code", value: "5"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ends := make(callEnds, 4)
			e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.CountCallEnd = func(ci proxy.CallInfo) { ends <- ci } }})
			bad := rawBackend(t, h2Backend(func(fr *http2.Framer, id uint32) bool {
				var hb bytes.Buffer
				enc := hpack.NewEncoder(&hb)
				for _, f := range [][2]string{{":status", "200"}, {"content-type", "application/grpc"}, {"grpc-status", tc.value}} {
					enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
				}
				return fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true, EndStream: true}) == nil
			}))
			e.setBackends(bad)
			ctx := testkit.Context(t, 20*time.Second)
			_, err := e.client.EmptyCall(ctx, &testgrpc.Empty{})
			got := status.Code(err)
			ci := ends.next(t, ctx)
			t.Logf("grpc-status %q: client %v (%v), proxy %v", tc.value, got, err, ci.Code)
			if ci.Code != got {
				t.Errorf("grpc-status %q: client got %v, proxy reported %v", tc.value, got, ci.Code)
			}
		})
	}
}
