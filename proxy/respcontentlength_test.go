package proxy_test

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
)

// TestResponseContentLength: a response whose content-length does not
// equal the sum of its DATA payloads is malformed (RFC 9113 §8.1.1), as
// is one with an invalid or conflicting content-length. A grpc-go client
// ignores content-length, so relayed as it was the client took such an
// answer as good (or as the status it carried). Now the proxy checks it,
// as Envoy's HTTP/2 codecs and x/net's client do: the client gets
// INTERNAL naming the mismatch, and the backend's stream is reset with
// PROTOCOL_ERROR. A response whose content-length matches is relayed as
// before.
func TestResponseContentLength(t *testing.T) {
	msg := grpcMsg(&testgrpc.SimpleResponse{Payload: &testgrpc.Payload{Body: make([]byte, 100)}})
	n := strconv.Itoa(len(msg))
	for _, tc := range []struct {
		name    string
		fields  []string // the response headers
		data    bool     // msg in a DATA frame, then OK trailers
		want    codes.Code
		wantMsg string // in the client's status message
		reset   bool   // the backend's stream is reset with PROTOCOL_ERROR
	}{
		{name: "matching", fields: []string{"content-length", n}, data: true, want: codes.OK},
		{name: "DATA past content-length", fields: []string{"content-length", strconv.Itoa(len(msg) - 1)}, data: true,
			want: codes.Internal, wantMsg: "content-length", reset: true},
		{name: "DATA short of content-length", fields: []string{"content-length", strconv.Itoa(len(msg) + 10)}, data: true,
			want: codes.Internal, wantMsg: "content-length", reset: true},
		{name: "conflicting content-length", fields: []string{"content-length", n, "content-length", "7"}, data: true,
			want: codes.Internal, wantMsg: "content-length", reset: true},
		{name: "invalid content-length", fields: []string{"content-length", "-1"}, data: true,
			want: codes.Internal, wantMsg: "content-length", reset: true},
		{name: "trailers-only with content-length", fields: []string{"grpc-status", "5", "content-length", "10"},
			want: codes.Internal, wantMsg: "content-length", reset: true},
		{name: "trailers-only with content-length 0", fields: []string{"grpc-status", "5", "content-length", "0"},
			want: codes.NotFound},
		{name: "repeated content-length", fields: []string{"content-length", n, "content-length", n}, data: true, want: codes.OK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			verifyNoLeaks(t)
			resets := make(chan http2.ErrCode, 4)
			bad := rawBackend(t, h2Frames(func(s *h2Server, f http2.Frame) bool {
				switch f := f.(type) {
				case *http2.DataFrame:
					if !f.StreamEnded() {
						return true
					}
					// The whole request is in: the answer.
					id := f.StreamID
					block := hpackBlock(append([]string{":status", "200", "content-type", "application/grpc"}, tc.fields...)...)
					if err := s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block, EndHeaders: true, EndStream: !tc.data}); err != nil {
						return false
					}
					if tc.data {
						if s.fr.WriteData(id, false, msg) != nil {
							return false
						}
						writeOKTrailers(s.fr, id)
					}
				case *http2.RSTStreamFrame:
					resets <- f.ErrCode
				}
				return true
			}))
			e := envBehind(t, bad, 64<<10)
			ctx := testkit.Context(t, 20*time.Second)
			_, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
			st := status.Convert(err)
			if st.Code() != tc.want || !strings.Contains(st.Message(), tc.wantMsg) {
				t.Fatalf("client got %v, want %v naming %q", err, tc.want, tc.wantMsg)
			}
			t.Logf("client got %v: %q", st.Code(), st.Message())
			if !tc.reset {
				return
			}
			select {
			case code := <-resets:
				if code != http2.ErrCodeProtocol {
					t.Errorf("backend stream reset with %v, want PROTOCOL_ERROR", code)
				}
			case <-time.After(5 * time.Second):
				t.Errorf("backend stream not reset")
			}
		})
	}
}
