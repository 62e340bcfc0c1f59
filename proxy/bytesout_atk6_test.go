package proxy_test

import (
	"testing"
	"time"

	"golang.org/x/net/http2"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestAtk6BytesOutAreSent: a client that stops granting window and then
// resets a server-streaming call received only some of the response; the
// call's ResponseBytes (bytes_out, streamlb_response_bytes_total) must be
// what it was sent, not what the proxy had queued for it.
func TestAtk6BytesOutAreSent(t *testing.T) {
	ends := make(callEnds, 4)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.CountCallEnd = func(ci proxy.CallInfo) { ends <- ci } }})
	ctx := testkit.Context(t, 20*time.Second)
	r := dialRaw(t, e.addr)
	req := &testgrpc.StreamingOutputCallRequest{}
	for range 64 {
		req.ResponseParameters = append(req.ResponseParameters, &testgrpc.ResponseParameters{Size: 16 << 10})
	}
	r.headers(1, "/grpc.testing.TestService/StreamingOutputCall", false)
	if err := r.fr.WriteData(1, true, grpcMsg(req)); err != nil {
		t.Fatal(err)
	}
	// Read what the default windows (65535) let through, granting none:
	// the proxy can send no more, and holds the rest of what the backend
	// sent queued.
	got := 0
	for got < 65535 {
		if d, ok := r.next(func(f http2.Frame) bool { _, ok := f.(*http2.DataFrame); return ok }).(*http2.DataFrame); ok {
			got += len(d.Data())
		}
	}
	if err := r.fr.WriteRSTStream(1, http2.ErrCodeCancel); err != nil {
		t.Fatal(err)
	}
	ci := ends.next(t, ctx)
	if ci.ResponseBytes != int64(got) {
		t.Errorf("ResponseBytes %d, the client was sent %d", ci.ResponseBytes, got)
	}
}
