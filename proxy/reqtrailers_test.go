package proxy_test

import (
	"testing"
	"time"

	"golang.org/x/net/http2"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
)

// TestRequestTrailers: a client may end its request with trailers (RFC
// 9113 §8.1). gRPC has none, and a grpc-go backend closes its whole
// connection on them, so they must not reach it: a call on the same
// backend connection from another client lives on (found by
// FuzzClientFrames). Trailers with a pseudo-header are malformed and cost
// their stream.
func TestRequestTrailers(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	ctx := testkit.Context(t, 20*time.Second)
	st, err := e.client.FullDuplexCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ping := func(when string) {
		t.Helper()
		st.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 1}}})
		if _, err := st.Recv(); err != nil {
			t.Fatalf("good stream %s: %v", when, err)
		}
	}
	ping("before")
	for _, tc := range []struct {
		name     string
		trailers []string
		wantRST  bool
	}{
		{name: "regular field", trailers: []string{"x-t", "v"}},
		{name: "empty", trailers: nil},
		{name: "pseudo-header", trailers: []string{":path", "/x"}, wantRST: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := dialRaw(t, e.addr)
			r.headers(1, "/grpc.testing.TestService/UnaryCall", false)
			r.fr.WriteData(1, false, grpcMsg(&testgrpc.SimpleRequest{ResponseSize: 10}))
			r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hpackBlock(tc.trailers...), EndHeaders: true, EndStream: true})
			got := r.streamEnd(1)
			if tc.wantRST {
				wantRST(http2.ErrCodeProtocol)(t, got)
			} else if h, ok := got.(*http2.MetaHeadersFrame); !ok || field(h, "grpc-status") != "0" {
				t.Errorf("got %v, want trailers with grpc-status 0", got)
			}
			ping("after another client's request trailers")
		})
	}
}
