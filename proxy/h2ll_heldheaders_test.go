package proxy_test

import (
	"context"
	"testing"
	"time"

	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestH2llRetryOnBidiHeadersFirst: a bidi method named in --retry-on, on a
// backend that sends its response headers at once and its messages only
// in answer to the client's. A client that reads the response headers
// (grpc-go's ClientStream.Header, which blocks until they come) before it
// sends its first message gets them at once from the backend directly;
// through the proxy it must get them too, not wait for a first response
// message that the backend sends only after the client's.
func TestH2llRetryOnBidiHeadersFirst(t *testing.T) {
	directAndRetryOn(t, "/grpc.testing.TestService/FullDuplexCall", func(t *testing.T, ctx context.Context, client testgrpc.TestServiceClient) {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		st, err := client.FullDuplexCall(cctx)
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		h, err := st.Header()
		took := time.Since(start)
		if err != nil || len(h.Get(testserver.HeaderBackend)) == 0 || took > time.Second {
			t.Fatalf("response headers before the first message: %v, %v after %v, want the backend's at once", h, err, took.Round(time.Millisecond))
		}
		if err := st.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 10}}}); err != nil {
			t.Fatal(err)
		}
		if _, err := st.Recv(); err != nil {
			t.Fatal(err)
		}
		st.CloseSend()
		if _, err := st.Recv(); err == nil {
			t.Error("an answer after CloseSend")
		}
	})
}

// TestH2llRetryOnWatchHeaders: a server-streaming method named in
// --retry-on whose backend sends its response headers at once and its
// first message 3 s later (a watch, waiting for its first event). A
// client that reads the headers first gets them at once directly; through
// the proxy they must not wait for the first event either (the proxy
// holds them back for a retry, for a second at most).
func TestH2llRetryOnWatchHeaders(t *testing.T) {
	directAndRetryOn(t, "/grpc.testing.TestService/StreamingOutputCall", func(t *testing.T, ctx context.Context, client testgrpc.TestServiceClient) {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		st, err := client.StreamingOutputCall(cctx, &testgrpc.StreamingOutputCallRequest{
			ResponseParameters: []*testgrpc.ResponseParameters{{Size: 10, IntervalUs: 3_000_000}}})
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		h, err := st.Header()
		took := time.Since(start)
		if err != nil || len(h.Get(testserver.HeaderBackend)) == 0 || took > 2*time.Second {
			t.Errorf("response headers of a watch: %v, %v after %v, want the backend's well before its first message (3s)", h, err, took.Round(time.Millisecond))
		}
		if _, err := st.Recv(); err != nil {
			t.Fatal(err)
		}
	})
}

// directAndRetryOn runs body against a testserver directly, then through
// a proxy that names method in --retry-on (whose response headers it
// holds back for a retry): the client must see the same either way.
func directAndRetryOn(t *testing.T, method string, body func(t *testing.T, ctx context.Context, client testgrpc.TestServiceClient)) {
	verifyNoLeaks(t)
	ts := startTestserver(t, testserver.Config{Name: "b", Logger: quietLog})
	srv, err := proxy.New(proxy.Config{Picker: pickerTo(ts.Addr()), Logger: quietLog, RetryOn: []string{method}})
	if err != nil {
		t.Fatal(err)
	}
	ln := serveProxy(t, srv)
	ctx := testkit.Context(t, 20*time.Second)
	for _, via := range []struct{ name, addr string }{{"direct", ts.Addr()}, {"proxy", ln.Addr().String()}} {
		t.Run(via.name, func(t *testing.T) {
			body(t, ctx, testgrpc.NewTestServiceClient(e2eConn(t, via.addr)))
		})
	}
}
