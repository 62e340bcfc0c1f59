package proxy_test

import (
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// TestEmptyContinuationFlood: x/net's Framer bounds CONTINUATION frames
// by header bytes (CVE-2023-45288) but loops over empty ones inside
// ReadFrame, where the glitch budget never sees them. A client that opens
// a header block and then sends empty CONTINUATION frames must lose its
// connection, not hold it and a reader busy for ever.
func TestEmptyContinuationFlood(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	good := startGoodClient(t, e)
	r := dialRaw(t, e.addr)
	r.nc.SetDeadline(time.Now().Add(15 * time.Second))
	block := requestBlock("/grpc.testing.TestService/EmptyCall")
	r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block[:4]})
	const n = 1 << 20
	sent := r.flood(n, func(i int) error { return r.fr.WriteContinuation(1, false, nil) })
	g := r.awaitGoAway()
	got := <-sent
	t.Logf("attacker wrote %d empty CONTINUATION frames before the close; GOAWAY %v", got, g != nil && g.ErrCode == http2.ErrCodeEnhanceYourCalm)
	if got == n {
		t.Errorf("all %d empty CONTINUATION frames were taken", n)
	}
	if g == nil || (g.ErrCode != http2.ErrCodeEnhanceYourCalm && g.ErrCode != http2.ErrCodeProtocol) {
		t.Errorf("got GOAWAY %+v, want ENHANCE_YOUR_CALM or PROTOCOL_ERROR", g)
	}
	good.check(t)
}
