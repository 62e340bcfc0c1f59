package proxy_test

import (
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestAtk27AnswersWithoutGRPCStatus: a backend's answer that a gRPC
// client reads without a grpc-status is relayed as it is, and the call
// must be reported (access log, streamlb_calls_finished_total, the
// director's outcome, which ejection counts) and retried as the client
// reads it. grpc-go's client (http2_client.go operateHeaders) reads a
// response whose headers name no gRPC content-type by its :status alone
// (HTTPStatusConvTab: 503, 502, 504 and 429 UNAVAILABLE, 404
// UNIMPLEMENTED, any other UNKNOWN), as an HTTP proxy's 503 page in front
// of a backend, and fails a gRPC response that ends with DATA, without
// trailers, INTERNAL. The proxy reported the first UNKNOWN (or OK, with
// a grpc-status 0 the client ignores) and the second OK: a backend
// answering 503 for every call was never UNAVAILABLE to outlier ejection,
// one cutting every call short was a success, and a trailers-only 503 on
// a --retry-on method was not retried.
func TestAtk27AnswersWithoutGRPCStatus(t *testing.T) {
	for _, tc := range []struct {
		name   string
		fields []string
		body   string // DATA with END_STREAM after the headers; none: the headers end the stream
		split  bool   // body in two DATA frames: the response hold-back holds the first
		want   codes.Code
		// retried: UNAVAILABLE as the client reads it, trailers-only, so
		// the --retry-on call goes to the testserver (OK).
		retried bool
	}{
		{name: "503 page", fields: []string{":status", "503", "content-type", "text/html"}, body: "<html>no</html>", want: codes.OK, retried: true},
		{name: "502 page in two frames", fields: []string{":status", "502", "content-type", "text/html"}, body: "<html>bad gateway</html>", split: true, want: codes.OK, retried: true},
		{name: "404 page", fields: []string{":status", "404", "content-type", "text/html"}, body: "<html>no</html>", want: codes.Unimplemented},
		{name: "200 page", fields: []string{":status", "200", "content-type", "text/html"}, body: "<html></html>", want: codes.Unknown},
		{name: "trailers-only 404", fields: []string{":status", "404"}, want: codes.Unimplemented},
		{name: "trailers-only 502 with grpc-status 0", fields: []string{":status", "502", "grpc-status", "0"}, want: codes.OK, retried: true},
		{name: "trailers-only 503", fields: []string{":status", "503", "content-type", "text/plain"}, want: codes.OK, retried: true},
		{name: "gRPC message without trailers", fields: []string{":status", "200", "content-type", "application/grpc"}, body: "\x00\x00\x00\x00\x00", want: codes.Internal},
		{name: "gRPC message held back, without trailers", fields: []string{":status", "200", "content-type", "application/grpc"}, body: "\x00\x00\x00\x00\x02\x08\x01", split: true, want: codes.Internal},
	} {
		t.Run(tc.name, func(t *testing.T) {
			retryOnRawAnswer(t, tc.want, tc.retried, func(fr *http2.Framer, id uint32) bool {
				if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hpackBlock(tc.fields...), EndHeaders: true, EndStream: tc.body == ""}); err != nil || tc.body == "" {
					return err == nil
				}
				body := []byte(tc.body)
				if tc.split {
					if fr.WriteData(id, false, body[:3]) != nil {
						return false
					}
					body = body[3:]
				}
				return fr.WriteData(id, true, body) == nil
			})
		})
	}
}

// TestAtk27HeldHeadersReleasedThenTrailers: response headers of a
// --retry-on method held back, then released on their own when the hold
// ends (releaseHeldHeaders, not enqueueDown), and trailers after them:
// the call is reported with the trailers' status. Unrecorded, the
// trailers were taken for a trailers-only block without :status or gRPC
// content-type, and a call the client saw OK (TestChaosSoak's long bidi
// calls) was reported UNKNOWN.
func TestAtk27HeldHeadersReleasedThenTrailers(t *testing.T) {
	proxy.SetHeldHeadersMax(t, 10*time.Millisecond)
	ends := make(callEnds, 4)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		c.CountCallEnd = func(ci proxy.CallInfo) { ends <- ci }
		c.RetryOn = []string{"/grpc.testing.TestService/"}
	}})
	release := make(chan struct{})
	bad := rawBackend(t, h2Backend(func(fr *http2.Framer, id uint32) bool {
		if fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hpackBlock(":status", "200", "content-type", "application/grpc"), EndHeaders: true}) != nil {
			return false
		}
		<-release // the client has the headers: the hold ended
		return fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hpackBlock("grpc-status", "5"), EndHeaders: true, EndStream: true}) == nil
	}))
	e.setBackends(bad)
	ctx := testkit.Context(t, 20*time.Second)
	st, err := e.client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Header(); err != nil {
		t.Fatalf("headers: %v", err)
	}
	close(release)
	_, err = st.Recv()
	got := status.Code(err)
	ci := ends.next(t, ctx)
	if got != codes.NotFound || ci.Code != got {
		t.Errorf("client got %v (%v), proxy reported %v (%q); want NotFound both", got, err, ci.Code, ci.Message)
	}
}

// TestAtk27PageRetriesExhausted: a 503 page retried on a --retry-on
// method until no retry is left is answered with its headers, the body
// dropped: the client and the report read UNAVAILABLE.
func TestAtk27PageRetriesExhausted(t *testing.T) {
	ends := make(callEnds, 4)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		c.CountCallEnd = func(ci proxy.CallInfo) { ends <- ci }
		c.RetryOn = []string{"/grpc.testing.TestService/"}
	}})
	var asked atomic.Int32
	bad := rawBackend(t, h2Backend(func(fr *http2.Framer, id uint32) bool {
		asked.Add(1)
		if fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hpackBlock(":status", "503", "content-type", "text/html"), EndHeaders: true}) != nil {
			return false
		}
		return fr.WriteData(id, true, []byte("<html>busy</html>")) == nil
	}))
	e.setBackends(bad)
	ctx := testkit.Context(t, 20*time.Second)
	_, err := e.client.EmptyCall(ctx, &testgrpc.Empty{})
	ci := ends.next(t, ctx)
	if got := status.Code(err); got != codes.Unavailable || ci.Code != got {
		t.Errorf("client got %v (%v), proxy reported %v; want Unavailable both", got, err, ci.Code)
	}
	if ci.Attempts < 2 || int(asked.Load()) != ci.Attempts {
		t.Errorf("%d attempts reported, the backend asked %d times; want the call retried", ci.Attempts, asked.Load())
	}
}
