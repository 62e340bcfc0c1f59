package proxy_test

import (
	"testing"
	"time"

	"golang.org/x/net/http2"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestRequestIdleTimeout: a stream whose client never finishes its request
// ends after RequestIdleTimeout with DEADLINE_EXCEEDED in trailers and
// RST_STREAM(NO_ERROR), and its backend stream is cancelled; a stream that
// keeps sending, and one whose request is complete but whose answer is
// slow, are left alone.
func TestRequestIdleTimeout(t *testing.T) {
	const idle = 300 * time.Millisecond
	const path = "/grpc.testing.TestService/FullDuplexCall"
	tests := []struct {
		name     string
		open     func(r *rawConn)        // opens stream 1
		tick     func(r *rawConn, i int) // every 100ms while waiting, up to 12 times
		wantCode string                  // grpc-status in the trailers
		wantRST  bool
		cancels  int64 // backend streams cancelled
	}{
		{
			name:     "no DATA at all",
			open:     func(r *rawConn) { r.headers(1, path, false) },
			wantCode: "4",
			wantRST:  true,
			cancels:  1,
		},
		{
			name: "one message, then silence",
			open: func(r *rawConn) {
				r.headers(1, path, false)
				r.fr.WriteData(1, false, grpcMsg(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 10}}}))
			},
			wantCode: "4",
			wantRST:  true,
			cancels:  1,
		},
		{
			name: "keeps sending, then ends",
			open: func(r *rawConn) { r.headers(1, path, false) },
			tick: func(r *rawConn, i int) {
				req := &testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 10}}}
				if i < 11 {
					r.fr.WriteData(1, false, grpcMsg(req))
				} else {
					r.fr.WriteData(1, true, nil)
				}
			},
			wantCode: "0",
		},
		{
			name: "request complete, slow answer",
			open: func(r *rawConn) {
				r.writeFields(1, "/grpc.testing.TestService/EmptyCall", "x-delay", "800ms")
				r.fr.WriteData(1, true, grpcMsg(&testgrpc.Empty{}))
			},
			wantCode: "0",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			verifyNoLeaks(t)
			e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.RequestIdleTimeout = idle }})
			ctx := testkit.Context(t, 20*time.Second)
			r := dialRaw(t, e.addr)
			start := time.Now()
			tc.open(r)
			frames := make(chan http2.Frame)
			readErr := make(chan error, 1)
			go func() {
				for {
					f, err := r.fr.ReadFrame()
					if err != nil {
						readErr <- err
						close(frames)
						return
					}
					switch f.(type) {
					case *http2.MetaHeadersFrame, *http2.RSTStreamFrame:
						frames <- f // the Framer does not reuse frames here
					}
				}
			}()
			tick := time.NewTicker(100 * time.Millisecond)
			defer tick.Stop()
			var code string
			var ended time.Duration
			rst := false
			for i := 0; ; {
				select {
				case f, ok := <-frames:
					if !ok {
						t.Fatalf("connection ended: %v", <-readErr)
					}
					switch f := f.(type) {
					case *http2.MetaHeadersFrame:
						if f.StreamEnded() {
							code, ended = field(f, "grpc-status"), time.Since(start)
						}
					case *http2.RSTStreamFrame:
						if f.ErrCode != http2.ErrCodeNo {
							t.Errorf("RST_STREAM %v, want NO_ERROR", f.ErrCode)
						}
						rst = true
					}
				case <-tick.C:
					if tc.tick != nil && i < 12 {
						tc.tick(r, i)
					}
					i++
				case <-ctx.Done():
					t.Fatal("timed out waiting for the stream to end")
				}
				if code != "" && (rst || !tc.wantRST) {
					break
				}
			}
			r.nc.Close()
			for range frames {
			}
			t.Logf("stream ended after %v with grpc-status %s, reset %v", ended.Round(time.Millisecond), code, rst)
			if code != tc.wantCode {
				t.Errorf("grpc-status %q, want %q", code, tc.wantCode)
			}
			if tc.wantCode == "4" && (ended < idle || ended > 3*idle) {
				t.Errorf("ended after %v, want between %v and %v", ended, idle, 3*idle)
			}
			if tc.cancels > 0 {
				testkit.WaitFor(ctx, t, "the backend stream to be cancelled", func() bool { return e.backends[0].Canceled() >= tc.cancels })
			}
		})
	}
}
