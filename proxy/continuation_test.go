package proxy_test

import (
	"bytes"
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

// TestSizeUpdateContinuationFlood: a header block made of HPACK dynamic
// table size updates (RFC 7541 §6.3), which emit no field, in 16 KiB
// CONTINUATION frames. Each frame was within the per-fragment bound
// (twice what the header list budgets have left), which such bytes never
// lower, so the proxy decoded them for as long as the client sent them
// (373 MiB in 5 s, the connection still open). The block's encoded bytes
// are bounded as a whole now: the connection must end with GOAWAY long
// before the attacker is done, and a good client on another connection
// sees no error.
func TestSizeUpdateContinuationFlood(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	good := startGoodClient(t, e)
	r := dialRaw(t, e.addr)
	r.nc.SetDeadline(time.Now().Add(15 * time.Second))
	frag := bytes.Repeat([]byte{0x20}, 16<<10) // size update to 0, 16 Ki times
	r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: frag})
	const n = 1 << 18 // 4 GiB
	sent := r.flood(n, func(i int) error { return r.fr.WriteContinuation(1, false, frag) })
	g := r.awaitGoAway()
	r.nc.Close() // the proxy may read on a while after its GOAWAY
	got := <-sent
	t.Logf("attacker wrote %d CONTINUATION frames of size updates before the close", got)
	if got == n {
		t.Errorf("all %d CONTINUATION frames were taken", n)
	}
	if g == nil || g.ErrCode != http2.ErrCodeProtocol {
		t.Errorf("got GOAWAY %+v, want PROTOCOL_ERROR", g)
	}
	good.check(t)
}
