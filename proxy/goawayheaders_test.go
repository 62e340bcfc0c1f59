package proxy_test

import (
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestHeadersAfterGoAwayMetered: during a graceful drain, HEADERS frames
// opening streams above the last stream id of the proxy's final GOAWAY
// are ignored (RFC 9113 §6.8), but their blocks are still decoded (the
// HPACK state is the connection's). They count as ignored frames
// (calm.go): a client racing the GOAWAY with a few streams is not
// punished, its open call finishes and the connection ends with
// NO_ERROR; a client that keeps sending them is cut with
// GOAWAY(ENHANCE_YOUR_CALM) instead of having the proxy decode header
// blocks for free until the drain ends. Before the fix the flood was
// taken to the last frame and answered PING as if nothing happened.
func TestHeadersAfterGoAwayMetered(t *testing.T) {
	for _, tc := range []struct {
		name  string
		late  int  // HEADERS sent above the final GOAWAY's last stream id
		flood bool // the client is to be cut
	}{
		{name: "a few racing the GOAWAY", late: 20},
		{name: "a flood", late: 20000, flood: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			verifyNoLeaks(t)
			e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
				c.ShutdownLinger = 5 * time.Second // ended by our close, not by the timer
			}})
			ctx := testkit.Context(t, 20*time.Second)
			r := dialRaw(t, e.addr)
			r.headers(1, "/grpc.testing.TestService/FullDuplexCall", false)
			r.fr.WritePing(false, [8]byte{1})
			r.next(func(f http2.Frame) bool { p, ok := f.(*http2.PingFrame); return ok && p.IsAck() })

			shut := make(chan error, 1)
			go func() { shut <- e.srv.Shutdown(ctx) }()
			r.next(func(f http2.Frame) bool { _, ok := f.(*http2.GoAwayFrame); return ok })
			ping := r.next(func(f http2.Frame) bool { p, ok := f.(*http2.PingFrame); return ok && !p.IsAck() }).(*http2.PingFrame)
			r.fr.WritePing(true, ping.Data)
			final := r.next(func(f http2.Frame) bool { _, ok := f.(*http2.GoAwayFrame); return ok }).(*http2.GoAwayFrame)
			if final.LastStreamID != 1 || final.ErrCode != http2.ErrCodeNo {
				t.Fatalf("final GOAWAY: last stream %d, %v; want 1, NO_ERROR", final.LastStreamID, final.ErrCode)
			}

			// Streams above 1, then a PING: its ack comes once the
			// proxy read them all, if it still reads.
			sent := r.flood(tc.late+1, func(i int) error {
				if i == tc.late {
					return r.fr.WritePing(false, [8]byte{2})
				}
				return r.writeHeaders(uint32(2*i+3), "/grpc.testing.TestService/EmptyCall", true)
			})
			var calm *http2.GoAwayFrame
			acked := false
			for calm == nil && !acked {
				f, err := r.fr.ReadFrame()
				if err != nil {
					break
				}
				switch f := f.(type) {
				case *http2.GoAwayFrame:
					calm = &http2.GoAwayFrame{LastStreamID: f.LastStreamID, ErrCode: f.ErrCode}
				case *http2.PingFrame:
					acked = f.IsAck() && f.Data == [8]byte{2}
				case *http2.MetaHeadersFrame, *http2.RSTStreamFrame:
					if f.Header().StreamID != 1 {
						t.Errorf("stream %d, above the final GOAWAY's last stream id, got %v", f.Header().StreamID, f)
					}
				}
			}
			n := <-sent
			if calm != nil {
				t.Logf("client wrote %d of %d frames; GOAWAY %v, last stream %d", n, tc.late+1, calm.ErrCode, calm.LastStreamID)
			} else {
				t.Logf("client wrote %d of %d frames; no GOAWAY, PING acked %v", n, tc.late+1, acked)
			}
			if tc.flood {
				if calm == nil {
					t.Fatalf("%d HEADERS above the GOAWAY: no GOAWAY (PING acked %v), want ENHANCE_YOUR_CALM", tc.late, acked)
				}
				if calm.ErrCode != http2.ErrCodeEnhanceYourCalm {
					t.Fatalf("%d HEADERS above the GOAWAY: GOAWAY %v, want ENHANCE_YOUR_CALM", tc.late, calm.ErrCode)
				}
				if calm.LastStreamID != 1 {
					t.Errorf("GOAWAY(ENHANCE_YOUR_CALM) with last stream %d, want 1", calm.LastStreamID)
				}
			} else {
				if calm != nil {
					t.Fatalf("%d HEADERS above the GOAWAY: got GOAWAY %v, want none", tc.late, calm.ErrCode)
				}
				if !acked {
					t.Fatalf("%d HEADERS above the GOAWAY: the connection ended before the PING's ack", tc.late)
				}
				// The call open before the drain finishes.
				r.fr.WriteData(1, true, nil)
				if h, ok := r.streamEnd(1).(*http2.MetaHeadersFrame); !ok || field(h, "grpc-status") != "0" {
					t.Errorf("stream 1 ended with %v, want grpc-status 0", h)
				}
			}
			r.nc.Close()
			if err := <-shut; err != nil {
				t.Errorf("Shutdown: %v", err)
			}
		})
	}
}
