package proxy_test

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/proxy"
)

// syncBuffer is a bytes.Buffer safe for a logger's concurrent writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestBackendGoAwayRepeated: a backend may send GOAWAY more than once
// (RFC 9113 §6.8, a lower last stream id each time), but a graceful
// shutdown takes two; each GOAWAY after the first costs a glitch point,
// and only the first is logged. A backend sending 5,000 GOAWAY frames
// (INTERNAL_ERROR, 1 KiB of debug data) made the proxy walk the
// connection's streams and log a Warn line for each: 5,000 lines, 5.9 MB
// of log, without end. Now it loses the connection to
// GOAWAY(ENHANCE_YOUR_CALM) past the budget, the call on it ends with a
// status, and one line is logged.
func TestBackendGoAwayRepeated(t *testing.T) {
	verifyNoLeaks(t)
	const budget = 100
	debug := []byte(strings.Repeat("x", 1024))
	calm := make(chan http2.ErrCode, 1)
	raw := floodBackend(t, func(fr *http2.Framer, id uint32) {
		for range 50 * budget {
			if fr.WriteGoAway(id, http2.ErrCodeInternal, debug) != nil {
				break
			}
		}
	}, calm)
	var logs syncBuffer
	srv, err := proxy.New(proxy.Config{Picker: &twoPicker{first: raw, second: raw}, MaxGlitches: budget,
		Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t}
	client := testgrpc.NewTestServiceClient(e.dial(serveProxy(t, srv).Addr().String()))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
	select {
	case code := <-calm:
		if code != http2.ErrCodeEnhanceYourCalm {
			t.Errorf("backend got GOAWAY %v, want ENHANCE_YOUR_CALM", code)
		}
	case <-ctx.Done():
		t.Fatalf("the backend repeating GOAWAY got no GOAWAY; the call: %v", err)
	}
	if err == nil {
		t.Error("the call succeeded on a backend that answered nothing")
	}
	if n := strings.Count(logs.String(), "backend sent GOAWAY"); n != 1 {
		t.Errorf("%d log lines about the backend's GOAWAY, want 1", n)
	}
}
