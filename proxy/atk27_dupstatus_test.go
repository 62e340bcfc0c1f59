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

// TestAtk27DuplicateGRPCStatus: a backend's final block with grpc-status
// twice is relayed as it is, and grpc-go's client takes the last one
// (http2_client.go operateHeaders overwrites its code field by field), as
// grpc-java's Metadata.get does. The proxy took the first: the call was
// reported (access log, streamlb_calls_finished_total, the director's
// outcome) with a status the client never saw, and an answer the client
// reads as OK was taken for UNAVAILABLE and retried on a --retry-on
// method, running the call again.
func TestAtk27DuplicateGRPCStatus(t *testing.T) {
	testTrailerRows(t, []trailerRow{
		{name: "trailers-only OK then NOT_FOUND", statuses: []string{"0", "5"}, want: codes.NotFound},
		{name: "trailers-only UNAVAILABLE then NOT_FOUND", statuses: []string{"14", "5"}, want: codes.NotFound},
		{name: "trailers-only NOT_FOUND then UNAVAILABLE", statuses: []string{"5", "14"}, want: codes.OK, retried: true},
		{name: "trailers OK then NOT_FOUND", statuses: []string{"0", "5"}, headers: true, want: codes.NotFound},
		{name: "trailers UNAVAILABLE then OK", statuses: []string{"14", "0"}, headers: true, want: codes.OK},
	})
}

// trailerRow is a backend's answer for testTrailerRows: its grpc-status
// fields, then extra fields, ending the stream.
type trailerRow struct {
	name     string
	statuses []string
	extra    []string
	headers  bool // response headers and a message before the trailers
	want     codes.Code
	// retried: the answer is UNAVAILABLE as the client reads it, and
	// trailers-only, so the call goes to the testserver (OK).
	retried bool
}

// testTrailerRows has a raw backend, beside a testserver, answer a call of
// a --retry-on method with each row's trailers (retryOnRawAnswer).
func testTrailerRows(t *testing.T, rows []trailerRow) {
	for _, tc := range rows {
		t.Run(tc.name, func(t *testing.T) {
			retryOnRawAnswer(t, tc.want, tc.retried, func(fr *http2.Framer, id uint32) bool {
				var trailers []string
				if !tc.headers {
					trailers = []string{":status", "200", "content-type", "application/grpc"}
				} else {
					if fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hpackBlock(":status", "200", "content-type", "application/grpc"), EndHeaders: true}) != nil ||
						fr.WriteData(id, false, grpcMsg(&testgrpc.Empty{})) != nil {
						return false
					}
				}
				for _, s := range tc.statuses {
					trailers = append(trailers, "grpc-status", s)
				}
				trailers = append(trailers, tc.extra...)
				return fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hpackBlock(trailers...), EndHeaders: true, EndStream: true}) == nil
			})
		})
	}
}

// retryOnRawAnswer has a raw backend, beside a testserver, answer a call
// of a --retry-on method with answer, and checks that the proxy reports
// (CountCallEnd) what the client got, want, and that the call was retried
// on the testserver (which answers OK) exactly when retried: the answers
// the client reads as UNAVAILABLE, and those only.
func retryOnRawAnswer(t *testing.T, want codes.Code, retried bool, answer func(fr *http2.Framer, id uint32) bool) {
	t.Helper()
	ends := make(callEnds, 8)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		c.CountCallEnd = func(ci proxy.CallInfo) { ends <- ci }
		c.RetryOn = []string{"/grpc.testing.TestService/"}
	}})
	var asked atomic.Int32
	bad := rawBackend(t, h2Backend(func(fr *http2.Framer, id uint32) bool {
		asked.Add(1)
		return answer(fr, id)
	}))
	e.setBackends(bad, e.backends[0].Addr())
	ctx := testkit.Context(t, 20*time.Second)
	// Round robin over the raw backend and a testserver: calls until one
	// reached the raw backend (the director's order is not the test's to
	// know); a retry would go to the testserver.
	var got codes.Code
	var err error
	var ci proxy.CallInfo
	for range 4 {
		_, err = e.client.EmptyCall(ctx, &testgrpc.Empty{})
		ci = ends.next(t, ctx)
		if asked.Load() > 0 {
			got = status.Code(err)
			break
		}
	}
	if asked.Load() != 1 {
		t.Fatalf("raw backend %s asked %d times, want 1 (last call: %+v)", bad, asked.Load(), ci)
	}
	if got != want {
		t.Errorf("client got %v (%v), want %v", got, err, want)
	}
	if ci.Code != got {
		t.Errorf("client got %v, proxy reported %v", got, ci.Code)
	}
	wantAttempts, wantLast := 1, bad
	if retried {
		wantAttempts, wantLast = 2, e.backends[0].Addr()
	}
	if ci.Attempts != wantAttempts || ci.Backend != wantLast {
		t.Errorf("call made %d attempts, the last on %s; want %d, the last on %s (raw backend %s)", ci.Attempts, ci.Backend, wantAttempts, wantLast, bad)
	}
}

// TestAtk27TrailersMalformedForClient: grpc-go's client reads a final
// block with a grpc-status that is not a number as UNKNOWN wherever that
// field is (it stops at it), and one with a -bin field that is not base64
// (decodeMetadataHeader) as INTERNAL, whatever its grpc-status. The proxy
// reported the last grpc-status (OK, NOT_FOUND), and retried a
// trailers-only UNAVAILABLE the client reads as INTERNAL.
func TestAtk27TrailersMalformedForClient(t *testing.T) {
	testTrailerRows(t, []trailerRow{
		{name: "malformed then OK", statuses: []string{"x", "0"}, headers: true, want: codes.Unknown},
		{name: "OK, a -bin field not base64", statuses: []string{"0"}, extra: []string{"x-detail-bin", "!!!!"}, headers: true, want: codes.Internal},
		{name: "NOT_FOUND, details not base64", statuses: []string{"5"}, extra: []string{"grpc-status-details-bin", "a"}, headers: true, want: codes.Internal},
		{name: "trailers-only UNAVAILABLE, a -bin field not base64", statuses: []string{"14"}, extra: []string{"x-detail-bin", "@@"}, want: codes.Internal},
		{name: "NOT_FOUND, -bin fields padded and not", statuses: []string{"5"}, extra: []string{"x-a-bin", "AQI=", "x-b-bin", "AQI"}, headers: true, want: codes.NotFound},
	})
}
