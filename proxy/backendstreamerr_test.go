package proxy_test

import (
	"context"
	"testing"
	"time"

	"golang.org/x/net/http2"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/proxy"
)

// TestBackendStreamErrorFloods: a frame the Framer rejects with a
// stream error (a WINDOW_UPDATE of 0 on a stream, RFC 9113 §6.9) does no
// work but makes the proxy write a RST_STREAM. From a backend, a flood of them must end with
// GOAWAY(ENHANCE_YOUR_CALM) as the other floods of TestBackendGlitchFloods
// do, not be answered frame for frame without end.
func TestBackendStreamErrorFloods(t *testing.T) {
	verifyNoLeaks(t)
	const budget = 100
	floods := []struct {
		name  string
		flood func(fr *http2.Framer, id uint32)
	}{
		{"zero WINDOW_UPDATE on the stream", func(fr *http2.Framer, id uint32) {
			for range 4 * budget {
				fr.WriteRawFrame(http2.FrameWindowUpdate, 0, id, []byte{0, 0, 0, 0})
			}
		}},
		{"zero WINDOW_UPDATE on closed streams", func(fr *http2.Framer, id uint32) {
			for range 4 * budget {
				fr.WriteRawFrame(http2.FrameWindowUpdate, 0, 1, []byte{0, 0, 0, 0})
			}
		}},
	}
	for _, fl := range floods {
		t.Run(fl.name, func(t *testing.T) {
			goAway := make(chan http2.ErrCode, 1)
			raw := floodBackend(t, fl.flood, goAway)
			_, client := twoBackendProxy(t, raw, proxy.Config{MaxGlitches: budget})
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
			select {
			case code := <-goAway:
				if code != http2.ErrCodeEnhanceYourCalm {
					t.Errorf("backend got GOAWAY %v, want ENHANCE_YOUR_CALM", code)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("the flooding backend got no GOAWAY")
			}
		})
	}
}
