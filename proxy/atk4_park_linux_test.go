//go:build linux

package proxy_test

import (
	"crypto/tls"
	"net"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// The parking attacks of atk4_tls_test.go: parking is Linux-only.

// TestAtk4TLSParkResume: idle TLS connections park and resume many times
// with large calls between, bytes exact.
func TestAtk4TLSParkResume(t *testing.T) {
	for _, cm := range []string{"tls", "tlswrap", "wrap", "chunk"} {
		t.Run(cm, func(t *testing.T) {
			verifyNoLeaks(t)
			w := newAtk4World(t, cm, "plain", 1, nil, func(c *proxy.Config) { c.ParkAfter = 20 * time.Millisecond })
			ctx := testkit.Context(t, 30*time.Second)
			c := w.client()
			for round := range 6 {
				atk4Calls(ctx, t, c, []int{0, 513, 16385, 70000}, 0)
				if cm == "tls" {
					waitParked(ctx, t, w.srv, 1)
				} else {
					time.Sleep(60 * time.Millisecond)
				}
				if t.Failed() {
					t.Fatalf("round %d", round)
				}
			}
		})
	}
}

// splitWriter is a net.Conn whose writes are held while hold is set and
// released by flush in two parts with a pause between.
type splitWriter struct {
	net.Conn
	mu   sync.Mutex
	hold bool
	buf  []byte
}

func (s *splitWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.hold {
		s.buf = append(s.buf, p...)
		return len(p), nil
	}
	return s.Conn.Write(p)
}

// TestAtk4TLSParkMidRecord: a TLS client sends the first part of a
// record (a PING inside) and pauses long enough for the proxy to ask its
// reader to park; the rest of the record comes later. The PING is
// answered, and so are calls after it, many times over.
func TestAtk4TLSParkMidRecord(t *testing.T) {
	verifyNoLeaks(t)
	w := newAtk4World(t, "tls", "plain", 1, nil, func(c *proxy.Config) { c.ParkAfter = 20 * time.Millisecond })
	ctx := testkit.Context(t, 20*time.Second)
	nc := dialTCP(t, w.addr)
	sw := &splitWriter{Conn: nc}
	tc := tls.Client(sw, w.a.client())
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	r := rawOver(t, tc)
	r.fr.WriteSettings()
	r.handshake()
	parkedMid := 0
	defer func() { t.Logf("parked mid-record in %d of 6 rounds", parkedMid) }()
	for round := range 6 {
		waitParked(ctx, t, w.srv, 1)
		sw.mu.Lock()
		sw.hold = true
		sw.mu.Unlock()
		data := [8]byte{'m', 'i', 'd', byte(round)}
		if err := r.fr.WritePing(false, data); err != nil {
			t.Fatal(err)
		}
		sw.mu.Lock()
		rec := sw.buf
		sw.buf, sw.hold = nil, false
		cut := []int{1, 3, 5, 6, 20, len(rec) - 1}[round]
		if _, err := nc.Write(rec[:cut]); err != nil {
			t.Fatal(err)
		}
		sw.mu.Unlock()
		time.Sleep(100 * time.Millisecond) // five ParkAfter: asked, and parked if it can
		if w.srv.Stats().ClientConnsParked == 1 {
			parkedMid++
		}
		if _, err := nc.Write(rec[cut:]); err != nil {
			t.Fatal(err)
		}
		tc.SetReadDeadline(time.Now().Add(5 * time.Second))
		f := r.next(func(f http2.Frame) bool { p, ok := f.(*http2.PingFrame); return ok && p.IsAck() })
		if got := f.(*http2.PingFrame).Data; got != data {
			t.Fatalf("round %d: PING ack %q, want %q", round, got, data)
		}
	}
}
