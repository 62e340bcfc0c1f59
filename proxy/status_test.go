package proxy

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// errNoBackendLike stands in for director.ErrNoBackend, which proxy must
// not import: a sentinel the Picker returns, possibly wrapped.
var errNoBackendLike = errors.New("director: no usable backend")

// okStatusError is a Picker error that carries status OK, which cannot
// end a failed call.
type okStatusError struct{}

func (okStatusError) Error() string              { return "picker error with status OK" }
func (okStatusError) GRPCStatus() *status.Status { return status.New(codes.OK, "fine") }

func TestStatusOf(t *testing.T) {
	t.Parallel()
	const (
		be     = "10.0.0.7:50051"
		method = "/pkg.Svc/Get"
	)
	refused := errors.New("dial tcp 10.0.0.7:50051: connect: connection refused")
	cases := []struct {
		name     string
		f        failure
		wantCode codes.Code
		wantMsg  string
		wantHTTP int // zero means 200
	}{
		// Picker errors.
		{
			name:     "picker sentinel",
			f:        failure{kind: failNoBackend, method: method, cause: errNoBackendLike},
			wantCode: codes.Unavailable,
			wantMsg:  "streamlb: no backend for /pkg.Svc/Get: director: no usable backend",
		},
		{
			name:     "picker sentinel wrapped",
			f:        failure{kind: failNoBackend, method: method, cause: fmt.Errorf("ring hash: %w", errNoBackendLike)},
			wantCode: codes.Unavailable,
			wantMsg:  "streamlb: no backend for /pkg.Svc/Get: ring hash: director: no usable backend",
		},
		{
			name:     "picker status kept",
			f:        failure{kind: failNoBackend, method: method, cause: status.Error(codes.ResourceExhausted, "quota exceeded")},
			wantCode: codes.ResourceExhausted,
			wantMsg:  "quota exceeded",
		},
		{
			name:     "picker status wrapped kept",
			f:        failure{kind: failNoBackend, method: method, cause: fmt.Errorf("policy: %w", status.Error(codes.PermissionDenied, "tenant blocked"))},
			wantCode: codes.PermissionDenied,
			wantMsg:  "policy: rpc error: code = PermissionDenied desc = tenant blocked", // status.FromError keeps the whole text
		},
		{
			name:     "picker status OK is not a status to fail with",
			f:        failure{kind: failNoBackend, method: method, cause: okStatusError{}},
			wantCode: codes.Unavailable,
			wantMsg:  "streamlb: no backend for /pkg.Svc/Get: picker error with status OK",
		},
		{
			name:     "picker context canceled",
			f:        failure{kind: failNoBackend, method: method, cause: context.Canceled},
			wantCode: codes.Canceled,
			wantMsg:  "streamlb: no backend for /pkg.Svc/Get: context canceled",
		},
		{
			name:     "picker context deadline wrapped",
			f:        failure{kind: failNoBackend, method: method, cause: fmt.Errorf("waiting for ready: %w", context.DeadlineExceeded)},
			wantCode: codes.DeadlineExceeded,
			wantMsg:  "streamlb: no backend for /pkg.Svc/Get: waiting for ready: context deadline exceeded",
		},
		// Limits and shutdown.
		{
			name:     "shutting down",
			f:        failure{kind: failShuttingDown},
			wantCode: codes.Unavailable,
			wantMsg:  "streamlb: server is shutting down",
		},
		{
			name:     "too many calls",
			f:        failure{kind: failTooManyCalls, limit: 1000},
			wantCode: codes.ResourceExhausted,
			wantMsg:  "streamlb: too many concurrent calls (limit 1000)",
		},
		{
			name:     "backend full",
			f:        failure{kind: failBackendFull, backend: be, limit: 5},
			wantCode: codes.ResourceExhausted,
			wantMsg:  "streamlb: backend 10.0.0.7:50051 is at its concurrency limit (limit 5)",
		},
		// Backend connection.
		{
			name:     "dial refused",
			f:        failure{kind: failDial, backend: be, cause: refused},
			wantCode: codes.Unavailable,
			wantMsg:  "streamlb: backend 10.0.0.7:50051: connecting: dial tcp 10.0.0.7:50051: connect: connection refused",
		},
		{
			name:     "connection lost with cause",
			f:        failure{kind: failConnLost, backend: be, cause: errNoSettings},
			wantCode: codes.Unavailable,
			wantMsg:  "streamlb: backend connection to 10.0.0.7:50051 lost: backend sent no HTTP/2 SETTINGS in time",
		},
		{
			name:     "connection lost without cause",
			f:        failure{kind: failConnLost, backend: be},
			wantCode: codes.Unavailable,
			wantMsg:  "streamlb: backend connection to 10.0.0.7:50051 lost",
		},
		{
			name:     "connection closed by us says no more",
			f:        failure{kind: failConnLost, backend: be, cause: fmt.Errorf("writer: %w", errClosed)},
			wantCode: codes.Unavailable,
			wantMsg:  "streamlb: backend connection to 10.0.0.7:50051 lost",
		},
		{
			name:     "connection failed before the attempt was queued",
			f:        failure{kind: failConnLost, backend: be, cause: fmt.Errorf("connecting: %w", refused)},
			wantCode: codes.Unavailable,
			wantMsg:  "streamlb: backend connection to 10.0.0.7:50051 lost: connecting: dial tcp 10.0.0.7:50051: connect: connection refused",
		},
		{
			name:     "over the backend's stream limit",
			f:        failure{kind: failOverLimit, backend: be, limit: 1},
			wantCode: codes.Unavailable,
			wantMsg:  "streamlb: backend 10.0.0.7:50051: its SETTINGS_MAX_CONCURRENT_STREAMS (1) left the call no stream slot",
		},
		// Backend stream.
		{
			name:     "refused stream",
			f:        failure{kind: failRefused, backend: be},
			wantCode: codes.Unavailable,
			wantMsg:  "streamlb: backend 10.0.0.7:50051 refused the stream (REFUSED_STREAM)",
		},
		{
			name:     "goaway",
			f:        failure{kind: failGoAway, backend: be},
			wantCode: codes.Unavailable,
			wantMsg:  "streamlb: backend 10.0.0.7:50051 is going away (GOAWAY) and did not process the call",
		},
		{
			name:     "backend answered unavailable",
			f:        failure{kind: failBackendUnavailable, backend: be},
			wantCode: codes.Unavailable,
			wantMsg:  "streamlb: backend 10.0.0.7:50051 answered UNAVAILABLE",
		},
		{
			name:     "backend protocol error",
			f:        failure{kind: failBackendProtocol, backend: be, h2code: http2.ErrCodeProtocol},
			wantCode: codes.Internal,
			wantMsg:  "streamlb: protocol error from backend 10.0.0.7:50051: PROTOCOL_ERROR",
		},
		{
			name:     "backend reset cancel",
			f:        failure{kind: failBackendReset, backend: be, h2code: http2.ErrCodeCancel},
			wantCode: codes.Canceled,
			wantMsg:  "streamlb: backend 10.0.0.7:50051 reset the stream: CANCEL",
		},
		{
			name:     "backend reset refused",
			f:        failure{kind: failBackendReset, backend: be, h2code: http2.ErrCodeRefusedStream},
			wantCode: codes.Unavailable,
			wantMsg:  "streamlb: backend 10.0.0.7:50051 reset the stream: REFUSED_STREAM",
		},
		{
			name:     "backend reset enhance your calm",
			f:        failure{kind: failBackendReset, backend: be, h2code: http2.ErrCodeEnhanceYourCalm},
			wantCode: codes.ResourceExhausted,
			wantMsg:  "streamlb: backend 10.0.0.7:50051 reset the stream: ENHANCE_YOUR_CALM",
		},
		{
			name:     "backend reset inadequate security",
			f:        failure{kind: failBackendReset, backend: be, h2code: http2.ErrCodeInadequateSecurity},
			wantCode: codes.PermissionDenied,
			wantMsg:  "streamlb: backend 10.0.0.7:50051 reset the stream: INADEQUATE_SECURITY",
		},
		{
			name:     "backend reset internal",
			f:        failure{kind: failBackendReset, backend: be, h2code: http2.ErrCodeInternal},
			wantCode: codes.Internal,
			wantMsg:  "streamlb: backend 10.0.0.7:50051 reset the stream: INTERNAL_ERROR",
		},
		{
			name:     "backend reset unknown code",
			f:        failure{kind: failBackendReset, backend: be, h2code: 0xff},
			wantCode: codes.Unknown,
			wantMsg:  "streamlb: backend 10.0.0.7:50051 reset the stream: unknown error code 0xff",
		},
		// Client side and deadline.
		{
			name:     "deadline",
			f:        failure{kind: failDeadline, method: method},
			wantCode: codes.DeadlineExceeded,
			wantMsg:  "streamlb: deadline exceeded (grpc-timeout) waiting for /pkg.Svc/Get",
		},
		{
			name:     "client reset",
			f:        failure{kind: failClientReset},
			wantCode: codes.Canceled,
			wantMsg:  "streamlb: client reset the stream",
		},
		{
			name:     "client gone",
			f:        failure{kind: failClientGone},
			wantCode: codes.Canceled,
			wantMsg:  "streamlb: client connection closed",
		},
		{
			name:     "client stream error",
			f:        failure{kind: failClientStream, h2code: http2.ErrCodeProtocol},
			wantCode: codes.Canceled,
			wantMsg:  "streamlb: stream error from the client: PROTOCOL_ERROR; the proxy reset the stream",
		},
		// Requests that are not gRPC.
		{
			name:     "headers too large",
			f:        failure{kind: failHeadersTooLarge},
			wantCode: codes.ResourceExhausted,
			wantMsg:  "streamlb: request header list too large",
			wantHTTP: http.StatusRequestHeaderFieldsTooLarge,
		},
		{
			name:     "malformed grpc-timeout",
			f:        failure{kind: failBadRequest, cause: errors.New(`malformed grpc-timeout "1X": unknown unit`)},
			wantCode: codes.Internal,
			wantMsg:  `streamlb: malformed request headers: malformed grpc-timeout "1X": unknown unit`,
			wantHTTP: http.StatusBadRequest,
		},
		{
			name:     "method not POST",
			f:        failure{kind: failBadMethod, detail: "GET"},
			wantCode: codes.Internal,
			wantMsg:  `streamlb: method "GET" not allowed, gRPC uses POST`,
			wantHTTP: http.StatusMethodNotAllowed,
		},
		{
			name:     "content-type not gRPC",
			f:        failure{kind: failBadContentType, detail: "application/json"},
			wantCode: codes.InvalidArgument,
			wantMsg:  `streamlb: invalid gRPC request content-type "application/json"`,
			wantHTTP: http.StatusUnsupportedMediaType,
		},
		// Proxy bugs.
		{
			name:     "internal with cause",
			f:        failure{kind: failInternal, cause: errors.New("pool returned a plain error")},
			wantCode: codes.Internal,
			wantMsg:  "streamlb: internal error: pool returned a plain error",
		},
		{
			name:     "zero failure",
			f:        failure{},
			wantCode: codes.Internal,
			wantMsg:  "streamlb: internal error (failure kind 0)",
		},
		{
			name:     "unknown kind",
			f:        failure{kind: failKind(99)},
			wantCode: codes.Internal,
			wantMsg:  "streamlb: internal error (failure kind 99)",
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			st, httpStatus := statusOf(tc.f)
			if st.Code() != tc.wantCode || st.Message() != tc.wantMsg {
				t.Errorf("statusOf = %v %q, want %v %q", st.Code(), st.Message(), tc.wantCode, tc.wantMsg)
			}
			wantHTTP := tc.wantHTTP
			if wantHTTP == 0 {
				wantHTTP = http.StatusOK
			}
			if httpStatus != wantHTTP {
				t.Errorf("HTTP status = %d, want %d", httpStatus, wantHTTP)
			}
			// The other faces of a failure say the same thing.
			if got := tc.f.Error(); got != tc.wantMsg {
				t.Errorf("Error() = %q, want %q", got, tc.wantMsg)
			}
			got, ok := status.FromError(tc.f.statusErr())
			if !ok || got.Code() != tc.wantCode || got.Message() != tc.wantMsg {
				t.Errorf("statusErr() = %v %q (status %v), want %v %q", got.Code(), got.Message(), ok, tc.wantCode, tc.wantMsg)
			}
		})
	}
}

// TestEndBlocks checks the header blocks a cut-short response ends with:
// the proxy's status as trailers-only or trailers, or the backend's own
// answer untouched.
func TestEndBlocks(t *testing.T) {
	t.Parallel()
	backendTrailersOnly := []hpack.HeaderField{
		{Name: ":status", Value: "200"},
		{Name: "content-type", Value: "application/grpc+proto"},
		{Name: "grpc-status", Value: "14"},
		{Name: "grpc-message", Value: "backend says: draining %E2%9C%93"},
		{Name: "x-backend-id", Value: "pod-a"},
	}
	backendHeaders := []hpack.HeaderField{{Name: ":status", Value: "200"}, {Name: "content-type", Value: "application/grpc"}, {Name: "x-backend-id", Value: "pod-b"}}
	backendTrailers := []hpack.HeaderField{{Name: "grpc-status", Value: "14"}, {Name: "grpc-message", Value: "overloaded"}}
	cases := []struct {
		name         string
		f            failure
		trailersOnly bool
		answer       [][]hpack.HeaderField
		want         [][]hpack.HeaderField
		wantCode     codes.Code
		wantMsg      string
	}{
		{
			name:         "trailers-only before response headers",
			f:            failure{kind: failDeadline, method: "/pkg.Svc/Get"},
			trailersOnly: true,
			want: [][]hpack.HeaderField{{
				{Name: ":status", Value: "200"},
				{Name: "content-type", Value: "application/grpc"},
				{Name: "grpc-status", Value: "4"},
				{Name: "grpc-message", Value: "streamlb: deadline exceeded (grpc-timeout) waiting for /pkg.Svc/Get"},
			}},
			wantCode: codes.DeadlineExceeded,
			wantMsg:  "streamlb: deadline exceeded (grpc-timeout) waiting for /pkg.Svc/Get",
		},
		{
			name: "trailers after response headers",
			f:    failure{kind: failConnLost, backend: "10.0.0.7:50051"},
			want: [][]hpack.HeaderField{{
				{Name: "grpc-status", Value: "14"},
				{Name: "grpc-message", Value: "streamlb: backend connection to 10.0.0.7:50051 lost"},
			}},
			wantCode: codes.Unavailable,
			wantMsg:  "streamlb: backend connection to 10.0.0.7:50051 lost",
		},
		{
			name:         "early abort carries the HTTP status",
			f:            failure{kind: failBadContentType, detail: "text/plain"},
			trailersOnly: true,
			want: [][]hpack.HeaderField{{
				{Name: ":status", Value: "415"},
				{Name: "content-type", Value: "application/grpc"},
				{Name: "grpc-status", Value: "3"},
				{Name: "grpc-message", Value: `streamlb: invalid gRPC request content-type "text/plain"`},
			}},
			wantCode: codes.InvalidArgument,
			wantMsg:  `streamlb: invalid gRPC request content-type "text/plain"`,
		},
		{
			name:         "message percent-encoded",
			f:            failure{kind: failNoBackend, method: "/pkg.Svc/Get", cause: errors.New("100% gone ✓")},
			trailersOnly: true,
			want: [][]hpack.HeaderField{{
				{Name: ":status", Value: "200"},
				{Name: "content-type", Value: "application/grpc"},
				{Name: "grpc-status", Value: "14"},
				{Name: "grpc-message", Value: "streamlb: no backend for /pkg.Svc/Get: 100%25 gone %E2%9C%93"},
			}},
			wantCode: codes.Unavailable,
			wantMsg:  "streamlb: no backend for /pkg.Svc/Get: 100% gone ✓",
		},
		{
			name:         "backend trailers-only answer passes through",
			f:            failure{kind: failBackendUnavailable, backend: "10.0.0.7:50051"},
			trailersOnly: true,
			answer:       [][]hpack.HeaderField{backendTrailersOnly},
			want:         [][]hpack.HeaderField{backendTrailersOnly},
			wantCode:     codes.Unavailable,
			wantMsg:      "backend returned status",
		},
		{
			name:         "backend headers and trailers pass through",
			f:            failure{kind: failBackendUnavailable, backend: "10.0.0.7:50051"},
			trailersOnly: true,
			answer:       [][]hpack.HeaderField{backendHeaders, backendTrailers},
			want:         [][]hpack.HeaderField{backendHeaders, backendTrailers},
			wantCode:     codes.Unavailable,
			wantMsg:      "backend returned status",
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, result := endBlocks(tc.f, tc.trailersOnly, tc.answer)
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("blocks mismatch (-want +got):\n%s", diff)
			}
			st, _ := status.FromError(result)
			if st.Code() != tc.wantCode || st.Message() != tc.wantMsg {
				t.Errorf("outcome = %v %q, want %v %q", st.Code(), st.Message(), tc.wantCode, tc.wantMsg)
			}
		})
	}
}

// TestUnsentFailuresNeutral: a call that failed while it waited for a
// slot, never opened on its backend, tells the client its status
// (UNAVAILABLE at the wait's timeout, RESOURCE_EXHAUSTED when shed for its
// connection's buffer budget) and the Picker's done CANCELLED, which
// counts neither for nor against the backend. Shed for the budget, the
// director was told RESOURCE_EXHAUSTED, which it takes for the backend
// answering.
func TestUnsentFailuresNeutral(t *testing.T) {
	for _, tc := range []struct {
		f    failure
		want codes.Code
	}{
		{failure{kind: failQueueTimeout, backend: "b:1", limit: 5000}, codes.Unavailable},
		{failure{kind: failConnBudget, limit: 1 << 20, unsent: true}, codes.ResourceExhausted},
	} {
		_, err := endBlocks(tc.f, true, nil)
		var cs ClientStatus
		if status.Code(err) != codes.Canceled || !errors.As(err, &cs) || cs.ClientCode() != tc.want {
			t.Errorf("%+v: done sees %v (client code %v), want CANCELLED, client %v", tc.f, status.Code(err), cs, tc.want)
		}
	}
	// Sent to the client in the clear: a budget refusal of a call that
	// was not waiting is what it was.
	if _, err := endBlocks(failure{kind: failConnBudget, limit: 1 << 20}, true, nil); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("budget refusal: done sees %v, want RESOURCE_EXHAUSTED", status.Code(err))
	}
}
