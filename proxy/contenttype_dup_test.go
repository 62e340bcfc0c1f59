package proxy_test

import (
	"net"
	"slices"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
)

// TestDuplicateContentType: a request with more than one content-type
// field. grpc-go's server (operateHeaders) takes the request if any of
// them is gRPC's, ignores the others, and uses the last gRPC one; the
// proxy took the last field, whatever it was, so its answer depended on
// the order: application/grpc then text/plain got HTTP 415 from the proxy
// (a call a grpc-go backend serves directly), and text/plain then
// application/grpc went through with both fields relayed, a content-type
// a backend other than grpc-go may read otherwise (the first one, or the
// values joined with a comma, as Envoy's header map does, which no gRPC
// server accepts). Now the proxy takes what grpc-go takes, in either
// order, and relays the one content-type grpc-go uses, so every backend
// sees the request as the proxy judged it. Requests with no gRPC
// content-type are still refused 415, as grpc-go refuses them.
//
// Each case goes to a grpc-go server directly and through the proxy (the
// answers must agree), and through the proxy to a raw backend that
// records the content-type fields it is sent.
func TestDuplicateContentType(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	seen := make(chan []string, 1)
	raw := rawBackend(t, contentTypeRecorder(seen))
	e2 := envBehind(t, raw, 64<<10)
	const path = "/grpc.testing.TestService/EmptyCall"
	for _, tc := range []struct {
		name     string
		types    []string
		status   string   // grpc-status, direct and through the proxy
		relayed  []string // content-type fields the backend gets
		httpCode string   // :status of the answer
	}{
		{name: "one", types: []string{"application/grpc"}, status: "0", httpCode: "200", relayed: []string{"application/grpc"}},
		{name: "gRPC then text/plain", types: []string{"application/grpc", "text/plain"}, status: "0", httpCode: "200", relayed: []string{"application/grpc"}},
		{name: "text/plain then gRPC", types: []string{"text/plain", "application/grpc"}, status: "0", httpCode: "200", relayed: []string{"application/grpc"}},
		{name: "two gRPC subtypes", types: []string{"application/grpc+json", "application/grpc+proto"}, status: "0", httpCode: "200", relayed: []string{"application/grpc+proto"}},
		{name: "the same twice", types: []string{"application/grpc", "application/grpc"}, status: "0", httpCode: "200", relayed: []string{"application/grpc"}},
		{name: "none gRPC", types: []string{"text/plain", "text/html"}, status: "3", httpCode: "415"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fields := []string{":method", "POST", ":scheme", "http", ":path", path, ":authority", "x", "te", "trailers"}
			for _, ct := range tc.types {
				fields = append(fields, "content-type", ct)
			}
			call := func(addr string) (httpCode, grpcStatus string) {
				r := dialRaw(t, addr)
				r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hpackBlock(fields...), EndHeaders: true})
				r.fr.WriteData(1, true, grpcMsg(&testgrpc.Empty{}))
				for {
					f := r.streamEnd(1)
					h, ok := f.(*http2.MetaHeadersFrame)
					if !ok {
						t.Fatalf("%s: stream reset: %v", addr, f)
					}
					// The :status of a trailers-only answer, or of the
					// headers before the trailers.
					if s := field(h, ":status"); s != "" {
						httpCode = s
					}
					if h.StreamEnded() {
						if httpCode == "" {
							httpCode = "200"
						}
						return httpCode, field(h, "grpc-status")
					}
				}
			}
			dc, ds := call(e.backends[0].Addr())
			pc, ps := call(e.addr)
			t.Logf("grpc-go directly: %s grpc-status %s; through the proxy: %s grpc-status %s", dc, ds, pc, ps)
			if ds != tc.status || dc != tc.httpCode {
				t.Fatalf("grpc-go directly: :status %s grpc-status %s, want %s and %s (the test's premise)", dc, ds, tc.httpCode, tc.status)
			}
			if pc != dc || ps != ds {
				t.Errorf("through the proxy: :status %s grpc-status %s, want grpc-go's %s and %s", pc, ps, dc, ds)
			}
			if tc.relayed == nil {
				return
			}
			_, rs := call(e2.addr)
			ctx := testkit.Context(t, 5*time.Second)
			select {
			case got := <-seen:
				if !slices.Equal(got, tc.relayed) {
					t.Errorf("backend got content-type %q, want %q", got, tc.relayed)
				}
			case <-ctx.Done():
				t.Fatalf("the raw backend got no request (grpc-status %s)", rs)
			}
		})
	}
}

// contentTypeRecorder is a raw HTTP/2 backend that sends the content-type
// values of each request it gets to seen, and answers it OK with an
// empty message.
func contentTypeRecorder(seen chan<- []string) func(net.Conn) {
	return func(nc net.Conn) {
		s, err := acceptH2(nc)
		if err != nil || s.hello() != nil {
			return
		}
		dec := hpack.NewDecoder(4096, nil) // the connection's: the proxy's encoder indexes
		s.serve(func(f http2.Frame) bool {
			switch f := f.(type) {
			case *http2.HeadersFrame:
				hf, err := dec.DecodeFull(f.HeaderBlockFragment())
				if err != nil {
					return false
				}
				var cts []string
				for _, h := range hf {
					if h.Name == "content-type" {
						cts = append(cts, h.Value)
					}
				}
				seen <- cts
			case *http2.DataFrame:
				if f.StreamEnded() {
					writeGRPCHeaders(s.fr, f.StreamID)
					s.fr.WriteData(f.StreamID, false, grpcMsg(&testgrpc.Empty{}))
					writeOKTrailers(s.fr, f.StreamID)
				}
			}
			return true
		})
	}
}
