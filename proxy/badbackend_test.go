package proxy_test

import (
	"github.com/streamlb/streamlb/internal/testkit"

	"context"
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"
)

// TestBadBackend puts one misbehaving backend beside a good one: every
// call ends within its deadline with a clear status (success when the
// proxy could retry it elsewhere), and the proxy keeps serving.
func TestBadBackend(t *testing.T) {
	for _, tc := range []struct {
		name  string
		serve func(net.Conn)
		// codes the client may see; OK when the call can go elsewhere.
		want []codes.Code
	}{
		{name: "silent", want: []codes.Code{codes.OK}, serve: func(nc net.Conn) {
			io.Copy(io.Discard, nc) // accepts TCP, never answers
		}},
		{name: "garbage", want: []codes.Code{codes.OK}, serve: func(nc net.Conn) {
			io.WriteString(nc, "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n\x00\x00\x00garbage")
			io.Copy(io.Discard, nc)
		}},
		{name: "GOAWAY before processing", want: []codes.Code{codes.OK}, serve: h2Backend(func(fr *http2.Framer, id uint32) bool {
			fr.WriteGoAway(0, http2.ErrCodeNo, nil)
			return false
		})},
		{name: "GOAWAY with the stream active, then close", want: []codes.Code{codes.OK, codes.Unavailable}, serve: h2Backend(func(fr *http2.Framer, id uint32) bool {
			fr.WriteGoAway(id, http2.ErrCodeNo, nil)
			return false
		})},
		{name: "resets every stream REFUSED_STREAM", want: []codes.Code{codes.OK}, serve: h2Backend(func(fr *http2.Framer, id uint32) bool {
			return fr.WriteRSTStream(id, http2.ErrCodeRefusedStream) == nil
		})},
		{name: "resets every stream INTERNAL_ERROR", want: []codes.Code{codes.OK, codes.Internal}, serve: h2Backend(func(fr *http2.Framer, id uint32) bool {
			return fr.WriteRSTStream(id, http2.ErrCodeInternal) == nil
		})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			verifyNoLeaks(t)
			e := newEnv(t, envOpts{backends: 1})
			bad := rawBackend(t, tc.serve)
			e.setBackends(bad, e.backends[0].Addr())
			ctx := testkit.Context(t, 60*time.Second)
			// A call must end with a status, not run into its deadline:
			// OK means the proxy gave up on the bad backend well before it
			// (the handshake wait is at most a quarter of the deadline)
			// and went elsewhere. How long that took is logged, not
			// asserted: these machines are shared and noisy.
			const deadline = 4 * time.Second
			got := map[codes.Code]int{}
			for i := range 12 {
				cctx, cancel := context.WithTimeout(ctx, deadline)
				start := time.Now()
				_, err := e.client.EmptyCall(cctx, &testgrpc.Empty{})
				took := time.Since(start)
				cancel()
				code := status.Code(err)
				got[code]++
				if !containsCode(tc.want, code) {
					t.Errorf("call %d: %v after %v, want one of %v", i, err, took, tc.want)
				}
				if took > deadline/2 {
					t.Logf("call %d took %v of its %v deadline", i, took, deadline)
				}
			}
			t.Logf("outcomes: %v; backends: %+v", got, e.dir.Backends())
			// The proxy still serves, straight to the good backend.
			e.setBackends(e.backends[0].Addr())
			if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
				t.Errorf("after the bad backend: %v", err)
			}
		})
	}
}

func containsCode(cs []codes.Code, c codes.Code) bool {
	for _, x := range cs {
		if x == c {
			return true
		}
	}
	return false
}
