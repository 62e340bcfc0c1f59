package proxy_test

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// settingsBackend is a raw HTTP/2 backend that advertises
// MAX_CONCURRENT_STREAMS 1, holds the streams whose request carries
// x-hang, answers the others OK once their request ended, and lets the
// test send SETTINGS (set) or end the held streams (release) on the
// connection it last accepted.
type settingsBackend struct {
	mu   sync.Mutex
	fr   *http2.Framer
	held []uint32
	// gate, when set, holds back the backend's SETTINGS until closed:
	// the proxy's calls wait for its handshake meanwhile.
	gate <-chan struct{}
}

func (b *settingsBackend) serve(nc net.Conn) {
	s, err := acceptH2(nc)
	if err != nil {
		return
	}
	if b.gate != nil {
		<-b.gate
	}
	s.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	b.mu.Lock()
	b.fr = s.fr
	err = s.fr.WriteSettings(http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 1})
	b.mu.Unlock()
	if err != nil {
		return
	}
	hang := map[uint32]bool{}
	for {
		f, err := s.fr.ReadFrame()
		if err != nil {
			return
		}
		b.mu.Lock()
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				s.fr.WriteSettingsAck()
			}
		case *http2.MetaHeadersFrame:
			for _, hf := range f.Fields {
				if hf.Name == "x-hang" {
					hang[f.StreamID] = true
					b.held = append(b.held, f.StreamID)
				}
			}
			if f.StreamEnded() && !hang[f.StreamID] {
				answerEmpty(s.fr, f.StreamID)
			}
		case *http2.DataFrame:
			if f.Length > 0 {
				s.fr.WriteWindowUpdate(0, f.Length)
			}
			if f.StreamEnded() && !hang[f.StreamID] {
				answerEmpty(s.fr, f.StreamID)
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				s.fr.WritePing(true, f.Data)
			}
		}
		b.mu.Unlock()
	}
}

func answerEmpty(fr *http2.Framer, id uint32) {
	writeGRPCHeaders(fr, id)
	fr.WriteData(id, false, []byte{0, 0, 0, 0, 0})
	writeOKTrailers(fr, id)
}

func (b *settingsBackend) set(max uint32) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.fr.WriteSettings(http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: max})
}

func (b *settingsBackend) release() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, id := range b.held {
		answerEmpty(b.fr, id)
	}
	b.held = nil
}

// TestWaitingCallsBackendChangesLimit: calls wait behind a backend
// connection at its one stream (MaxBackendConns 1). The backend raises its
// SETTINGS_MAX_CONCURRENT_STREAMS: the waiting calls run at once, the long
// call still held. Or it lowers it to 0: the waiting calls end with
// UNAVAILABLE at once, not at BackendPendingTimeout. Either way nothing
// stays counted and, with the limit back at 1, calls go through.
func TestWaitingCallsBackendChangesLimit(t *testing.T) {
	for _, to := range []uint32{3, 0} {
		t.Run(map[uint32]string{3: "raise", 0: "zero"}[to], func(t *testing.T) {
			verifyNoLeaks(t)
			b := &settingsBackend{}
			addr := rawBackend(t, b.serve)
			e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
				c.MaxBackendConns = 1
				c.MaxBackendPending = 8
				c.BackendPendingTimeout = 20 * time.Second
			}})
			e.setBackends(addr)
			srv := e.srv.(*proxy.Server)
			ctx := testkit.Context(t, 30*time.Second)
			if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
				t.Fatal(err)
			}
			hang := metadata.AppendToOutgoingContext(ctx, "x-hang", "1")
			held := make(chan error, 1)
			go func() {
				_, err := e.client.EmptyCall(hang, &testgrpc.Empty{})
				held <- err
			}()
			testkit.WaitFor(ctx, t, "the held call on the backend", func() bool {
				b.mu.Lock()
				defer b.mu.Unlock()
				return len(b.held) == 1
			})
			res := make(chan error, 2)
			for i := range 2 {
				go func() {
					_, err := e.client.EmptyCall(ctx, &testgrpc.Empty{})
					res <- err
				}()
				testkit.WaitFor(ctx, t, "calls waiting", func() bool { return srv.Waiting() == i+1 })
			}
			start := time.Now()
			b.set(to)
			for range 2 {
				err := <-res
				switch {
				case to > 0 && err != nil:
					t.Errorf("waiting call, the limit raised: %v", err)
				case to == 0 && status.Code(err) != codes.Unavailable:
					t.Errorf("waiting call, the limit at 0: %v, want UNAVAILABLE", err)
				}
			}
			t.Logf("waiting calls ended %v after the SETTINGS", time.Since(start))
			testkit.WaitFor(ctx, t, "nothing waiting", func() bool { return srv.Waiting() == 0 && srv.PendingAttempts() == 0 })
			b.set(1)
			b.release()
			if err := <-held; err != nil {
				t.Errorf("held call: %v", err)
			}
			for i := range 5 {
				if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
					t.Fatalf("call %d after: %v", i, err)
				}
			}
		})
	}
}

var _ = context.Background
