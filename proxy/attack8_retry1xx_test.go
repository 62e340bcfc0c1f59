package proxy_test

import (
	"bytes"
	"context"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestAttack8RetryAfterInterim: for a RetryOn method, a backend answers
// with a 103 block, its response headers, then UNAVAILABLE trailers and no
// message; the other backend answers OK. Headers-then-trailers
// UNAVAILABLE answers are retried (onHeaders); a 1xx block before them
// must not change that.
func TestAttack8RetryAfterInterim(t *testing.T) {
	verifyNoLeaks(t)
	for _, interim := range []bool{false, true} {
		name := "no 1xx"
		if interim {
			name = "103 first"
		}
		t.Run(name, func(t *testing.T) {
			bad := rawBackend(t, h2Frames(func(s *h2Server, f http2.Frame) bool {
				h, ok := f.(*http2.HeadersFrame)
				if !ok {
					return true
				}
				id := h.StreamID
				if interim {
					var hb bytes.Buffer
					hpack.NewEncoder(&hb).WriteField(hpack.HeaderField{Name: ":status", Value: "103"})
					s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true})
				}
				writeGRPCHeaders(s.fr, id)
				var tb bytes.Buffer
				hpack.NewEncoder(&tb).WriteField(hpack.HeaderField{Name: "grpc-status", Value: "14"})
				s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: tb.Bytes(), EndHeaders: true, EndStream: true})
				return true
			}))
			msg := payloadMsg(10)
			good := rawBackend(t, h2Frames(func(s *h2Server, f http2.Frame) bool {
				h, ok := f.(*http2.HeadersFrame)
				if !ok {
					return true
				}
				writeGRPCHeaders(s.fr, h.StreamID)
				s.fr.WriteData(h.StreamID, false, msg)
				writeOKTrailers(s.fr, h.StreamID)
				return true
			}))
			var n atomic.Int64
			picker := proxy.PickerFunc(func(context.Context, string) (string, func(error), error) {
				if n.Add(1) == 1 {
					return bad, nil, nil
				}
				return good, nil, nil
			})
			srv, err := proxy.New(proxy.Config{Picker: picker, Logger: quietLog, RetryOn: []string{"/grpc.testing.TestService/"}})
			if err != nil {
				t.Fatal(err)
			}
			ln := serveProxy(t, srv)
			cc := fixedWindowConn(t, ln.Addr().String(), 64<<10)
			ctx := testkit.Context(t, 10*time.Second)
			got := callRaw(ctx, cc, true)
			if got.code != codes.OK {
				t.Errorf("%v after %d picks; want the call retried on the good backend", got.err, n.Load())
			}
		})
	}
}
