package proxy_test

import (
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/proxy"
)

// TestNegativeWindowEmptyEnd: a client lowers SETTINGS_INITIAL_WINDOW_SIZE
// while a response has used most of its stream window, so the window goes
// negative (RFC 9113 §6.9.2), and the backend then ends the response with
// an empty END_STREAM DATA frame. The empty frame takes no window: it must
// go out with END_STREAM, and the windows must not grow by it. The writer
// clamped the frame to the negative window: it sent an empty DATA frame
// without END_STREAM (the call never ended) and added 60,000 bytes to the
// connection window, which it then sent past what the client granted.
func TestNegativeWindowEmptyEnd(t *testing.T) {
	verifyNoLeaks(t)
	// Windows toward the backend wide enough for the raw backend's
	// answers, which it sends without waiting for WINDOW_UPDATEs.
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		c.BackendStreamWindow, c.BackendMaxStreamWindow = 256<<10, 256<<10
	}})
	const first, second = 60000, 65535 - 60000
	end1 := make(chan struct{})
	sent5 := make(chan struct{})
	ok := hpackBlock(":status", "200", "content-type", "application/grpc")
	// send writes one gRPC message of n bytes in all, in frames of 16 KiB.
	send := func(s *h2Server, id uint32, n int) bool {
		msg := make([]byte, n)
		msg[4] = byte(n - 5)
		msg[3] = byte((n - 5) >> 8)
		msg[2] = byte((n - 5) >> 16)
		for len(msg) > 0 {
			k := min(16<<10, len(msg))
			if s.fr.WriteData(id, false, msg[:k]) != nil {
				return false
			}
			msg = msg[k:]
		}
		return true
	}
	// wmu orders this callback's writes with the goroutine's below; the
	// Framer's reads (serve's) use other state.
	var wmu sync.Mutex
	backend := rawBackend(t, h2Frames(func(s *h2Server, f http2.Frame) bool {
		d, isData := f.(*http2.DataFrame)
		if !isData || !d.StreamEnded() {
			return true
		}
		wmu.Lock()
		defer wmu.Unlock()
		if s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: d.StreamID, BlockFragment: ok, EndHeaders: true}) != nil {
			return false
		}
		switch d.StreamID {
		case 1: // its end waits for the test
			if !send(s, 1, first) {
				return false
			}
			go func() {
				<-end1
				wmu.Lock()
				defer wmu.Unlock()
				s.fr.WriteData(1, true, nil)
			}()
			return true
		case 3:
			return send(s, 3, second) && s.fr.WriteData(3, true, nil) == nil
		default: // more than the connection window has left
			done := send(s, d.StreamID, 100000) && s.fr.WriteData(d.StreamID, true, nil) == nil
			close(sent5)
			return done
		}
	}))
	e.setBackends(backend)
	r := dialRaw(t, e.addr)
	got := map[uint32]int{}
	ended := map[uint32]bool{}
	pings := 0
	read := func(until func() bool) {
		t.Helper()
		for !until() {
			f, err := r.fr.ReadFrame()
			if err != nil {
				t.Fatalf("reading (DATA so far %v, ended %v): %v", got, ended, err)
			}
			switch f := f.(type) {
			case *http2.DataFrame:
				got[f.StreamID] += len(f.Data())
				ended[f.StreamID] = ended[f.StreamID] || f.StreamEnded()
			case *http2.MetaHeadersFrame:
				ended[f.StreamID] = ended[f.StreamID] || f.StreamEnded()
			case *http2.PingFrame:
				if f.IsAck() {
					pings++
				}
			case *http2.RSTStreamFrame:
				t.Fatalf("stream %d reset: %v", f.StreamID, f.ErrCode)
			case *http2.GoAwayFrame:
				t.Fatalf("GOAWAY %v %q", f.ErrCode, f.DebugData())
			}
		}
	}
	total := func() int { return got[1] + got[3] + got[5] }
	r.headers(1, "/x.Y/Z", false)
	r.fr.WriteData(1, true, grpcMsg(&testgrpc.Empty{}))
	read(func() bool { return got[1] == first })
	r.headers(3, "/x.Y/Z", false)
	r.fr.WriteData(3, true, grpcMsg(&testgrpc.Empty{}))
	read(func() bool { return ended[3] })
	// The connection window is spent; stream 1's is 65,535 - 60,000 -
	// 65,535 = -60,000 once the client lowers the initial window to 0.
	// The PING's answer comes after the SETTINGS were applied.
	r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
	r.fr.WritePing(false, [8]byte{'s'})
	read(func() bool { return pings == 1 })
	close(end1)
	r.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	read(func() bool { return ended[1] })
	// Stream 5 has a window of its own, the connection none: nothing of
	// it may come.
	r.headers(5, "/x.Y/Z", false)
	r.fr.WriteData(5, true, grpcMsg(&testgrpc.Empty{}))
	r.fr.WriteWindowUpdate(5, 1<<20)
	<-sent5
	r.fr.WritePing(false, [8]byte{'5'})
	read(func() bool { return pings == 2 })
	r.nc.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	for {
		f, err := r.fr.ReadFrame()
		if err != nil {
			break
		}
		if d, ok := f.(*http2.DataFrame); ok {
			got[d.StreamID] += len(d.Data())
		}
	}
	if total() > 65535 {
		t.Errorf("received %d bytes of DATA (%v), past the 65,535 of connection window granted", total(), got)
	}
}

// TestHeadersPassConnWindow: while one stream's DATA waits for the
// connection window, the frames flow control does not cover (RFC 9113
// §6.9: only DATA is) of other streams go on: the proxy's own
// trailers-only refusal and a backend's trailers-only error. The writer
// stopped at the first stream waiting for the connection window, and they
// waited behind it.
func TestHeadersPassConnWindow(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	r := dialRaw(t, e.addr)
	// Stream 1 spends the connection window; the client returns only
	// the stream's.
	r.headers(1, "/grpc.testing.TestService/UnaryCall", false)
	r.fr.WriteData(1, true, grpcMsg(&testgrpc.SimpleRequest{ResponseSize: 200000}))
	got := 0
	for got < 65535 {
		if d, ok := r.next(func(f http2.Frame) bool { _, ok := f.(*http2.DataFrame); return ok }).(*http2.DataFrame); ok {
			got += len(d.Data())
			r.fr.WriteWindowUpdate(1, uint32(len(d.Data())))
		}
	}
	// The window update's PING round trip: stream 1 is back in the ready
	// ring, waiting for the connection window.
	r.fr.WritePing(false, [8]byte{'w'})
	r.next(func(f http2.Frame) bool { p, ok := f.(*http2.PingFrame); return ok && p.IsAck() })
	// Stream 3: refused by the proxy (not gRPC), a trailers-only answer.
	r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, EndHeaders: true, EndStream: true,
		BlockFragment: hpackBlock(":method", "POST", ":scheme", "http", ":path", "/x.Y/Z", ":authority", "x", "content-type", "text/plain")})
	// Stream 5: the backend's trailers-only error.
	r.headers(5, "/grpc.testing.TestService/UnaryCall", false)
	r.fr.WriteData(5, true, grpcMsg(&testgrpc.SimpleRequest{ResponseStatus: &testgrpc.EchoStatus{Code: 3, Message: "no"}}))
	r.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	status := map[uint32]string{}
	for status[3] == "" || status[5] == "" {
		f, err := r.fr.ReadFrame()
		if err != nil {
			t.Fatalf("answers that need no connection window did not come (%v): %v", status, err)
		}
		switch f := f.(type) {
		case *http2.MetaHeadersFrame:
			if f.StreamEnded() && f.StreamID != 1 {
				for _, hf := range f.Fields {
					if hf.Name == "grpc-status" {
						status[f.StreamID] = hf.Value
					}
				}
			}
		case *http2.DataFrame:
			if f.StreamID != 1 {
				t.Errorf("DATA on stream %d with no connection window", f.StreamID)
			}
		case *http2.GoAwayFrame:
			t.Fatalf("GOAWAY %v %q", f.ErrCode, f.DebugData())
		}
	}
	if status[5] != "3" {
		t.Errorf("stream 5 ended with grpc-status %q, want 3", status[5])
	}
	// And stream 1 goes on once the connection window opens.
	r.fr.WriteWindowUpdate(0, 1<<20)
	r.next(func(f http2.Frame) bool {
		if d, ok := f.(*http2.DataFrame); ok {
			got += len(d.Data())
			r.fr.WriteWindowUpdate(1, uint32(len(d.Data())))
		}
		m, ok := f.(*http2.MetaHeadersFrame)
		return ok && m.StreamID == 1 && m.StreamEnded()
	})
	if got < 200000 {
		t.Errorf("stream 1 got %d bytes, want at least 200000", got)
	}
}
