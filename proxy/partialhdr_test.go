package proxy_test

import (
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/streamlb/streamlb/proxy"
)

// TestPartialFrameHeaderHoldsNoReadBuffer: a client connection that sent
// the first bytes of a frame header and then waits holds no pooled 64 KiB
// read buffer while it waits, as before the frame loop filled the read
// buffer up to a frame header on client connections (frameloop.go
// nextBuffered): a few bytes per connection must not pin 64 KiB each.
func TestPartialFrameHeaderHoldsNoReadBuffer(t *testing.T) {
	ping := [8]byte{'p', 'a', 'r', 't', 'i', 'a', 'l', 0}
	pingFrame := append([]byte{0, 0, 8, byte(http2.FramePing), 0, 0, 0, 0, 0}, ping[:]...)
	for _, tc := range []struct {
		name string
		// before is written, and the PING in it answered, before the
		// start of a header, start; both in one write if after is false.
		start []byte
		after bool
	}{
		// One read of the proxy's takes the PING and the byte.
		{name: "with the frame before it", start: []byte{0}},
		// The byte comes alone to a reader waiting on an empty buffer.
		{name: "alone", start: []byte{0}, after: true},
		{name: "eight bytes alone", start: make([]byte, 8), after: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			verifyNoLeaks(t)
			e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
				c.ParkAfter = -1 // parking would let go of the buffer on its own
				c.PingAckDelay = -1
			}})
			const conns = 64
			rs := make([]*rawConn, conns)
			for i := range rs {
				rs[i] = dialRaw(t, e.addr)
				rs[i].settle()
			}
			base := heapInuse()
			for _, r := range rs {
				b := pingFrame
				if !tc.after {
					b = append(b[:len(b):len(b)], tc.start...)
				}
				if _, err := r.nc.Write(b); err != nil {
					t.Fatal(err)
				}
			}
			for _, r := range rs {
				if !r.pingAnswered(ping, 10*time.Second) {
					t.Fatal("PING not answered")
				}
				if tc.after {
					if _, err := r.nc.Write(tc.start); err != nil {
						t.Fatal(err)
					}
				}
			}
			// Each reader takes the bytes and waits for the rest of the
			// frame header. Wait, bounded, for the buffers to go back.
			const limit = conns * 16 << 10
			tick := time.NewTicker(50 * time.Millisecond)
			defer tick.Stop()
			var grown int64
			for i := 0; i < 100; i++ {
				if grown = int64(heapInuse()) - int64(base); grown < limit {
					return
				}
				<-tick.C
			}
			t.Errorf("%d connections waiting for the rest of a frame header hold %d KiB more heap, want under %d KiB (a pooled read buffer each?)", conns, grown>>10, limit>>10)
		})
	}
}
