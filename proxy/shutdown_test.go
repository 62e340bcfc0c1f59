package proxy_test

import (
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestTwoStepGoAway: Server.Shutdown ends a client connection in two steps
// (RFC 9113 §6.8): GOAWAY with 2^31-1 and a PING; after the PING's ack, or
// ShutdownPingTimeout, GOAWAY with the real last stream id. A stream the
// client opened in between is served, one opened after the second GOAWAY
// is ignored, the stream open before finishes, last-stream-id never
// increases, and the connection then closes.
func TestTwoStepGoAway(t *testing.T) {
	tests := []struct {
		name        string
		ack         bool          // the client acknowledges the PING
		pingTimeout time.Duration // Config.ShutdownPingTimeout
		minWait     time.Duration // least time between the two GOAWAYs
	}{
		{name: "ping acked", ack: true, pingTimeout: time.Minute},
		{name: "ping not acked", ack: false, pingTimeout: 500 * time.Millisecond, minWait: 400 * time.Millisecond},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			verifyNoLeaks(t)
			e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
				c.ShutdownPingTimeout = tc.pingTimeout
				c.ShutdownLinger = 5 * time.Second // ended by our close, not by the timer
			}})
			ctx := testkit.Context(t, 20*time.Second)
			r := dialRaw(t, e.addr)
			r.next(func(f http2.Frame) bool { _, ok := f.(*http2.SettingsFrame); return ok })
			r.headers(1, "/grpc.testing.TestService/FullDuplexCall", false)
			// A PING round trip: stream 1 is open at the proxy.
			r.fr.WritePing(false, [8]byte{1})
			r.next(func(f http2.Frame) bool { p, ok := f.(*http2.PingFrame); return ok && p.IsAck() })

			shut := make(chan error, 1)
			go func() { shut <- e.srv.Shutdown(ctx) }()

			first := r.next(func(f http2.Frame) bool { _, ok := f.(*http2.GoAwayFrame); return ok }).(*http2.GoAwayFrame)
			firstAt := time.Now()
			if first.LastStreamID != 1<<31-1 || first.ErrCode != http2.ErrCodeNo {
				t.Fatalf("first GOAWAY: last stream %d, %v; want %d, NO_ERROR", first.LastStreamID, first.ErrCode, uint32(1<<31-1))
			}
			ping := r.next(func(f http2.Frame) bool { p, ok := f.(*http2.PingFrame); return ok && !p.IsAck() }).(*http2.PingFrame)
			// Stream 3 was on its way when the GOAWAY left: it is served.
			r.headers(3, "/grpc.testing.TestService/EmptyCall", false)
			r.fr.WriteData(3, true, grpcMsg(&testgrpc.Empty{}))
			if tc.ack {
				r.fr.WritePing(true, ping.Data)
			}
			var second *http2.GoAwayFrame
			ended := map[uint32]string{}
			for second == nil || len(ended) < 2 {
				f, err := r.fr.ReadFrame()
				if err != nil {
					t.Fatalf("reading: %v (second GOAWAY %v, ended %v)", err, second, ended)
				}
				switch f := f.(type) {
				case *http2.GoAwayFrame:
					if second != nil {
						t.Fatalf("a third GOAWAY: %v", f)
					}
					second = &http2.GoAwayFrame{LastStreamID: f.LastStreamID, ErrCode: f.ErrCode}
					if w := time.Since(firstAt); w < tc.minWait {
						t.Errorf("second GOAWAY after %v, want at least %v", w, tc.minWait)
					}
					// Opened after the real last id: ignored.
					r.headers(5, "/grpc.testing.TestService/EmptyCall", false)
					r.fr.WriteData(5, true, grpcMsg(&testgrpc.Empty{}))
					// Stream 1 may end now.
					r.fr.WriteData(1, true, nil)
				case *http2.MetaHeadersFrame:
					if f.StreamEnded() {
						ended[f.StreamID] = field(f, "grpc-status")
					}
				case *http2.RSTStreamFrame:
					t.Fatalf("stream %d reset: %v", f.StreamID, f.ErrCode)
				}
			}
			if second.LastStreamID != 3 || second.ErrCode != http2.ErrCodeNo {
				t.Errorf("second GOAWAY: last stream %d, %v; want 3, NO_ERROR", second.LastStreamID, second.ErrCode)
			}
			if second.LastStreamID > first.LastStreamID {
				t.Errorf("last-stream-id increased from %d to %d", first.LastStreamID, second.LastStreamID)
			}
			if ended[1] != "0" || ended[3] != "0" {
				t.Errorf("streams ended with grpc-status %v, want 0 for 1 and 3", ended)
			}
			// Then the proxy half-closes (the linger), with nothing for 5.
			for {
				f, err := r.fr.ReadFrame()
				if err != nil {
					var ne net.Error
					if errors.As(err, &ne) && ne.Timeout() {
						t.Fatalf("connection still open: %v", err)
					}
					break
				}
				if h, ok := f.(*http2.MetaHeadersFrame); ok && h.StreamID == 5 {
					t.Errorf("stream 5, opened after the final GOAWAY, got an answer")
				}
				if g, ok := f.(*http2.GoAwayFrame); ok {
					t.Errorf("a third GOAWAY: %v", g)
				}
			}
			r.nc.Close()
			if err := <-shut; err != nil {
				t.Errorf("Shutdown: %v", err)
			}
		})
	}
}

// TestShutdownDuringPreface: a shutdown that starts while a client is
// still sending its preface still sends SETTINGS first (RFC 9113 §3.4),
// then the GOAWAYs.
func TestShutdownDuringPreface(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.ShutdownPingTimeout = 100 * time.Millisecond }})
	ctx := testkit.Context(t, 20*time.Second)
	nc, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(15 * time.Second))
	io.WriteString(nc, http2.ClientPreface[:10])
	// The proxy counts the connection once it accepted it; a Shutdown
	// before that would just close the listener.
	testkit.WaitFor(ctx, t, "the connection to be accepted", func() bool { return e.srv.(*proxy.Server).ClientConns() == 1 })
	shut := make(chan error, 1)
	go func() { shut <- e.srv.Shutdown(ctx) }()
	testkit.WaitFor(ctx, t, "the listener to close", func() bool {
		c, err := net.DialTimeout("tcp", e.addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err != nil
	})
	io.WriteString(nc, http2.ClientPreface[10:])
	fr := http2.NewFramer(nc, nc)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	fr.WriteSettings()
	var kinds []string
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			break
		}
		kinds = append(kinds, f.Header().Type.String())
		if p, ok := f.(*http2.PingFrame); ok && !p.IsAck() {
			fr.WritePing(true, p.Data)
		}
	}
	nc.Close()
	if len(kinds) == 0 || kinds[0] != "SETTINGS" {
		t.Errorf("frames sent: %v, want SETTINGS first", kinds)
	}
	n := 0
	for _, k := range kinds {
		if k == "GOAWAY" {
			n++
		}
	}
	if n != 2 {
		t.Errorf("frames sent: %v, want two GOAWAYs", kinds)
	}
	if err := <-shut; err != nil {
		t.Errorf("Shutdown: %v", err)
	}
}
