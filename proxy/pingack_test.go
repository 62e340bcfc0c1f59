package proxy_test

import (
	"errors"
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/proxy"
)

// settle completes the SETTINGS exchange of a raw client: the proxy's
// SETTINGS acknowledged, and its acknowledgement of ours read.
func (r *rawConn) settle() {
	r.t.Helper()
	acked, got := false, false
	r.next(func(f http2.Frame) bool {
		if s, ok := f.(*http2.SettingsFrame); ok {
			if s.IsAck() {
				acked = true
			} else if !got {
				got = true
				r.fr.WriteSettingsAck()
			}
		}
		return acked && got
	})
}

// pingAnswered reads frames for up to d and reports whether the answer to
// the PING with data came among them.
func (r *rawConn) pingAnswered(data [8]byte, d time.Duration) bool {
	r.t.Helper()
	r.nc.SetReadDeadline(time.Now().Add(d))
	defer r.nc.SetReadDeadline(time.Now().Add(20 * time.Second))
	for {
		f, err := r.fr.ReadFrame()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return false
			}
			r.t.Fatalf("reading: %v", err)
		}
		if p, ok := f.(*http2.PingFrame); ok && p.IsAck() && p.Data == data {
			return true
		}
	}
}

// TestPingAckDelay: the answer to a client's PING waits for the next
// frames the proxy writes to that client, up to Config.PingAckDelay, so
// that it costs no write of its own; a negative delay answers at once.
func TestPingAckDelay(t *testing.T) {
	ping := [8]byte{'s', 't', 'r', 'e', 'a', 'm', 'l', 'b'}
	t.Run("rides with the next write", func(t *testing.T) {
		e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.PingAckDelay = time.Hour }})
		r := dialRaw(t, e.addr)
		r.settle()
		r.fr.WritePing(false, ping)
		if r.pingAnswered(ping, 300*time.Millisecond) {
			t.Fatal("PING answered at once, with nothing else to write and an hour's delay")
		}
		// A call: its response carries the answer.
		r.headers(1, "/grpc.testing.TestService/EmptyCall", false)
		r.fr.WriteData(1, true, grpcMsg(&testgrpc.Empty{}))
		if !r.pingAnswered(ping, 10*time.Second) {
			t.Fatal("PING not answered with the call's response")
		}
	})
	for _, tc := range []struct {
		name  string
		delay time.Duration
	}{
		{"alone after the delay", 50 * time.Millisecond},
		{"at once when negative", -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.PingAckDelay = tc.delay }})
			r := dialRaw(t, e.addr)
			r.settle()
			for range 3 {
				r.fr.WritePing(false, ping)
				if !r.pingAnswered(ping, 10*time.Second) {
					t.Fatal("PING not answered")
				}
			}
		})
	}
}
