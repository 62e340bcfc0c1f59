package proxy_test

import (
	"strconv"
	"testing"

	"golang.org/x/net/http2"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
)

// TestMalformedRequests: a request RFC 9113 calls malformed (§8.1.1) is a
// stream error of type PROTOCOL_ERROR and is not relayed, as x/net's and
// grpc-go's servers treat it: connection-specific fields (§8.2.2), te other
// than "trailers", a missing or empty pseudo-header (§8.3.1), a
// content-length that the DATA does not add up to. Before, the
// connection-specific fields were dropped and the rest relayed, a missing
// pseudo-header was answered with HTTP 400, and the content-length went to
// the backend unchecked (h2spec's sections 8.1.2.2, 8.1.2.3, 8.1.2.6). The
// stream alone ends: a call on the same connection goes on, and the
// backend never sees the request.
func TestMalformedRequests(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	const unary = "/grpc.testing.TestService/UnaryCall"
	msg := grpcMsg(&testgrpc.SimpleRequest{ResponseSize: 10})
	grpcFields := func(extra ...string) []string {
		return append([]string{":method", "POST", ":scheme", "http", ":path", unary, ":authority", "x", "content-type", "application/grpc"}, extra...)
	}
	for _, tc := range []struct {
		name   string
		fields []string
		data   [][]byte // DATA frames, the last with END_STREAM; none: END_STREAM on HEADERS
	}{
		{name: "connection", fields: grpcFields("te", "trailers", "connection", "keep-alive"), data: [][]byte{msg}},
		{name: "keep-alive", fields: grpcFields("keep-alive", "timeout=5"), data: [][]byte{msg}},
		{name: "proxy-connection", fields: grpcFields("proxy-connection", "close"), data: [][]byte{msg}},
		{name: "transfer-encoding", fields: grpcFields("transfer-encoding", "chunked"), data: [][]byte{msg}},
		{name: "upgrade", fields: grpcFields("upgrade", "h2c"), data: [][]byte{msg}},
		{name: "te gzip", fields: grpcFields("te", "gzip"), data: [][]byte{msg}},
		{name: "te trailers, gzip", fields: grpcFields("te", "trailers, gzip"), data: [][]byte{msg}},
		{name: "no :method", fields: []string{":scheme", "http", ":path", unary, "content-type", "application/grpc"}, data: [][]byte{msg}},
		{name: "no :scheme", fields: []string{":method", "POST", ":path", unary, "content-type", "application/grpc"}, data: [][]byte{msg}},
		{name: "no :path", fields: []string{":method", "POST", ":scheme", "http", "content-type", "application/grpc"}, data: [][]byte{msg}},
		{name: "empty :path", fields: []string{":method", "POST", ":scheme", "http", ":path", "", "content-type", "application/grpc"}, data: [][]byte{msg}},
		{name: "content-length not a number", fields: grpcFields("content-length", "ten"), data: [][]byte{msg}},
		{name: "content-length negative", fields: grpcFields("content-length", "-1"), data: [][]byte{msg}},
		{name: "content-lengths differ", fields: grpcFields("content-length", "5", "content-length", "6"), data: [][]byte{msg}},
		{name: "content-length, no DATA", fields: grpcFields("content-length", "5")},
		{name: "content-length over the DATA", fields: grpcFields("content-length", strconv.Itoa(len(msg)+1)), data: [][]byte{msg}},
		{name: "content-length under the DATA", fields: grpcFields("content-length", strconv.Itoa(len(msg)-1)), data: [][]byte{msg[:5], msg[5:]}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := e.backends[0].Calls()
			r := dialRaw(t, e.addr)
			// A good call on the same connection, open across the bad one.
			r.headers(1, "/grpc.testing.TestService/FullDuplexCall", false)
			r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: hpackBlock(tc.fields...), EndHeaders: true, EndStream: len(tc.data) == 0})
			for i, d := range tc.data {
				r.fr.WriteData(3, i == len(tc.data)-1, d)
			}
			wantRST(http2.ErrCodeProtocol)(t, r.streamEnd(3))
			// The good call on stream 1 is answered.
			r.fr.WriteData(1, true, grpcMsg(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 3}}}))
			end, ok := r.streamEnd(1).(*http2.MetaHeadersFrame)
			if !ok {
				t.Fatal("the good call beside it was reset")
			}
			if s := field(end, "grpc-status"); s != "0" {
				t.Errorf("the good call beside it ended with grpc-status %q, want 0", s)
			}
			// Only the good call reached the backend.
			if n := e.backends[0].Calls() - before; n != 1 {
				t.Errorf("the backend saw %d calls, want 1 (the malformed request must not be relayed)", n)
			}
		})
	}
}

// TestContentLengthKept: a request whose DATA adds up to its
// content-length, in one frame or several, or with none and a length of
// 0, is relayed and answered as any other.
func TestContentLengthKept(t *testing.T) {
	e := newEnv(t, envOpts{backends: 1})
	msg := grpcMsg(&testgrpc.SimpleRequest{ResponseSize: 10})
	for _, tc := range []struct {
		name   string
		data   [][]byte
		padded bool // padding does not count in the content-length (RFC 9113 §6.1)
	}{
		{name: "one frame", data: [][]byte{msg}},
		{name: "three frames", data: [][]byte{msg[:2], msg[2:7], msg[7:]}},
		{name: "padded frames", data: [][]byte{msg[:3], msg[3:]}, padded: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := dialRaw(t, e.addr)
			r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: requestBlock("/grpc.testing.TestService/UnaryCall", "content-length", strconv.Itoa(len(msg))), EndHeaders: true})
			for i, d := range tc.data {
				if tc.padded {
					r.fr.WriteDataPadded(1, i == len(tc.data)-1, d, make([]byte, 17))
				} else {
					r.fr.WriteData(1, i == len(tc.data)-1, d)
				}
			}
			end, ok := r.streamEnd(1).(*http2.MetaHeadersFrame)
			if !ok {
				t.Fatal("stream reset")
			}
			if s := field(end, "grpc-status"); s != "0" {
				t.Errorf("grpc-status %q, want 0", s)
			}
		})
	}
	// A zero length and END_STREAM on the HEADERS: well formed, though
	// the backend finds no message in it.
	r := dialRaw(t, e.addr)
	r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: requestBlock("/grpc.testing.TestService/UnaryCall", "content-length", "0"), EndHeaders: true, EndStream: true})
	end, ok := r.streamEnd(1).(*http2.MetaHeadersFrame)
	if !ok {
		t.Fatal("stream reset")
	}
	if s := field(end, "grpc-status"); s == "" {
		t.Errorf("no grpc-status in the answer to an empty request with content-length 0")
	}
}
