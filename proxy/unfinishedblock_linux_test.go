package proxy_test

import (
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/streamlb/streamlb/internal/testkit"
)

// TestParkedInsideRefusedBlock: a client connection the Framer expects
// CONTINUATION on (after a HEADERS frame without END_HEADERS it refused
// with a stream error) does not park: parking takes a new Framer when
// the old one's buffer is large, and the new one expected nothing, so
// the client's PING that followed was answered instead of ending the
// connection (RFC 9113 §6.10).
func TestParkedInsideRefusedBlock(t *testing.T) {
	e, s := newParkEnv(t, nil)
	ctx := testkit.Context(t, 20*time.Second)
	r := dialRaw(t, e.addr)
	r.fr.AllowIllegalWrites = true
	r.handshake()
	waitParked(ctx, t, s, 1)
	r.fr.WriteRawFrame(0x77, 0, 0, make([]byte, 4000)) // read by the Framer: its buffer is 4 KB
	bad := append([]byte{200}, requestBlock(unaryPath)...)
	r.fr.WriteRawFrame(http2.FrameHeaders, http2.FlagHeadersPadded, 3, bad)
	r.next(func(f http2.Frame) bool { _, ok := f.(*http2.RSTStreamFrame); return ok })
	time.Sleep(10 * testParkAfter) // time to park, if it would
	r.fr.WritePing(false, rfcPing)
	for {
		f, err := r.fr.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		if g, ok := f.(*http2.GoAwayFrame); ok {
			if g.ErrCode != http2.ErrCodeProtocol {
				t.Fatalf("GOAWAY %v, want PROTOCOL_ERROR", g.ErrCode)
			}
			return
		}
		if p, ok := f.(*http2.PingFrame); ok && p.IsAck() {
			t.Fatal("a PING inside stream 3's unfinished block was answered after the connection parked")
		}
	}
}
