package proxy_test

import (
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/streamlb/streamlb/proxy"
)

// TestClientAckFloods: acknowledgements of SETTINGS and PINGs the proxy
// never sent do no work, like the PING and SETTINGS floods the glitch
// budget already bounds, and cost the same: past the budget the client's
// connection ends with GOAWAY(ENHANCE_YOUR_CALM). They were free: a
// client sending a million SETTINGS ACKs or PING ACKs (9 or 17 bytes
// each, written in 0.1 s) kept its connection and cost the proxy 120-150
// ms of CPU per million, without end.
func TestClientAckFloods(t *testing.T) {
	const budget = 100
	for _, tc := range []struct {
		name  string
		flood func(fr *http2.Framer, i int) error
	}{
		{"SETTINGS ACK", func(fr *http2.Framer, i int) error { return fr.WriteSettingsAck() }},
		{"PING ACK", func(fr *http2.Framer, i int) error { return fr.WritePing(true, [8]byte{byte(i), byte(i >> 8)}) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			verifyNoLeaks(t)
			srv, err := proxy.New(proxy.Config{Picker: &twoPicker{first: "127.0.0.1:1", second: "127.0.0.1:1"}, Logger: quietLog, MaxGlitches: budget})
			if err != nil {
				t.Fatal(err)
			}
			r := dialRaw(t, serveProxy(t, srv).Addr().String())
			r.nc.SetDeadline(time.Now().Add(5 * time.Second))
			// The proxy's own SETTINGS is acknowledged once, as a client
			// does; that one is no glitch.
			r.next(func(f http2.Frame) bool { _, ok := f.(*http2.SettingsFrame); return ok })
			if err := r.fr.WriteSettingsAck(); err != nil {
				t.Fatal(err)
			}
			for i := range 4 * budget {
				if tc.flood(r.fr, i) != nil {
					break // the proxy closed the connection
				}
			}
			f := r.next(func(f http2.Frame) bool { _, ok := f.(*http2.GoAwayFrame); return ok })
			if code := f.(*http2.GoAwayFrame).ErrCode; code != http2.ErrCodeEnhanceYourCalm {
				t.Errorf("GOAWAY %v, want ENHANCE_YOUR_CALM", code)
			}
		})
	}
}
