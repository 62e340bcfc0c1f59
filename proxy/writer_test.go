package proxy_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"runtime"
	"testing"
	"time"

	"golang.org/x/net/http2"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// goroutinesIn counts the goroutines whose stack has a frame of fn.
func goroutinesIn(fn string) (n, total int) {
	buf := make([]byte, 1<<20)
	for {
		k := runtime.Stack(buf, true)
		if k < len(buf) {
			buf = buf[:k]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		total++
		if bytes.Contains(g, []byte(fn)) {
			n++
		}
	}
	return n, total
}

// writerFrame is the on-demand writer of a client connection.
const writerFrame = "proxy.(*transport).runWriter"

// waitNoWriter waits until no client connection has a writer goroutine.
func waitNoWriter(ctx context.Context, t *testing.T, what string) {
	t.Helper()
	testkit.WaitFor(ctx, t, what, func() bool {
		w, _ := goroutinesIn(writerFrame)
		return w == 0
	})
}

// handshakeRaw completes r's HTTP/2 handshake: the proxy's SETTINGS is
// read and acknowledged, and the ack of ours is read.
func handshakeRaw(t *testing.T, r *rawConn) {
	t.Helper()
	gotSettings, gotAck := false, false
	for !gotSettings || !gotAck {
		f, err := r.fr.ReadFrame()
		if err != nil {
			t.Fatalf("handshake: %v", err)
		}
		if s, ok := f.(*http2.SettingsFrame); ok {
			if s.IsAck() {
				gotAck = true
			} else {
				gotSettings = true
				r.fr.WriteSettingsAck()
			}
		}
	}
}

// pingRaw sends a PING on r and waits for its ack.
func pingRaw(t *testing.T, r *rawConn, data [8]byte) {
	t.Helper()
	if err := r.fr.WritePing(false, data); err != nil {
		t.Fatal(err)
	}
	r.next(func(f http2.Frame) bool {
		p, ok := f.(*http2.PingFrame)
		return ok && p.IsAck() && p.Data == data
	})
}

// TestIdleConnHoldsNoWriter: an idle client connection has no writer
// goroutine, only its reader (issue 12: the per-connection cost of 5,000
// idle clients). Writers start when there is something to write — the
// handshake, a PING's ack — and park when it is written; the server's
// housekeeper makes them exit within about a second.
func TestIdleConnHoldsNoWriter(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	const conns = 40
	_, before := goroutinesIn(writerFrame)
	raws := make([]*rawConn, conns)
	for i := range raws {
		raws[i] = dialRaw(t, e.addr)
		handshakeRaw(t, raws[i])
	}
	ctx := testkit.Context(t, 20*time.Second)
	var writers, total int
	// One goroutine per connection (its reader) and the server's
	// housekeeper; two per connection (a writer parked for ever beside
	// the reader) fails here.
	testkit.WaitFor(ctx, t, "the handshakes' writers to exit", func() bool {
		writers, total = goroutinesIn(writerFrame)
		return writers == 0 && total-before <= conns+1
	})
	if total-before < conns {
		t.Fatalf("%d goroutines for %d connections: the readers are not counted right", total-before, conns)
	}
	// Every connection still answers, and its writer leaves again.
	for i, r := range raws {
		pingRaw(t, r, [8]byte{byte(i), 'p'})
	}
	testkit.WaitFor(ctx, t, "the PING acks' writers to exit", func() bool {
		writers, total = goroutinesIn(writerFrame)
		return writers == 0 && total-before <= conns+1
	})
	// And a call goes through, after they all were idle.
	if _, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: 100}); err != nil {
		t.Fatalf("call after the idle connections: %v", err)
	}
}

// TestWriteTimeoutAmongIdle: among idle connections, one whose client
// asks for large answers and stops reading ends at WriteTimeout, not
// before it and not never; the idle connections and a busy good client
// are unaffected, and no writer is left behind.
func TestWriteTimeoutAmongIdle(t *testing.T) {
	verifyNoLeaks(t)
	const wt = 500 * time.Millisecond
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.WriteTimeout = wt }})
	good := startGoodClient(t, e)
	idle := make([]*rawConn, 10)
	for i := range idle {
		idle[i] = dialRaw(t, e.addr)
		handshakeRaw(t, idle[i])
	}
	r := dialRaw(t, e.addr)
	handshakeRaw(t, r)
	r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 30})
	r.fr.WriteWindowUpdate(0, 1<<30)
	params := make([]*testgrpc.ResponseParameters, 16)
	for i := range params {
		params[i] = &testgrpc.ResponseParameters{Size: 1 << 20}
	}
	const streams = 4
	start := time.Now()
	for i := range streams {
		id := uint32(2*i + 1)
		r.headers(id, "/grpc.testing.TestService/StreamingOutputCall", false)
		r.fr.WriteData(id, true, grpcMsg(&testgrpc.StreamingOutputCallRequest{ResponseParameters: params}))
	}
	ctx := testkit.Context(t, 30*time.Second)
	testkit.WaitFor(ctx, t, "the non-reading client's streams to be cancelled", func() bool {
		return e.backends[0].Canceled() >= streams
	})
	ended := time.Since(start)
	// The stall cannot be noticed before one write waited WriteTimeout.
	if ended < wt {
		t.Fatalf("streams cancelled after %v, before the write timeout %v", ended, wt)
	}
	r.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := io.Copy(io.Discard, r.nc)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("connection still open after %d bytes", n)
	}
	for i, c := range idle {
		pingRaw(t, c, [8]byte{byte(i), 'i'})
	}
	good.check(t)
	good.finish()
	waitNoWriter(ctx, t, "no writer left")
	t.Logf("non-reading client ended %v after its requests (write timeout %v), %d bytes buffered", ended, wt, n)
}

// TestWriterParksBetweenCalls: a client connection that makes one call at
// a time, as at a moderate rate, keeps one writer goroutine parked between
// its calls instead of starting one per response (issue 12: a goroutine
// start and a stack copy per call at 2,000 calls/s); once the calls stop,
// the housekeeper still makes it exit.
func TestWriterParksBetweenCalls(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 2})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	if _, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: 10}); err != nil {
		t.Fatal(err)
	}
	const calls = 100
	before := srv.WriterStarts()
	start := time.Now()
	for i := range calls {
		if _, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: 10}); err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
	}
	elapsed := time.Since(start)
	starts := srv.WriterStarts() - before
	// The housekeeper (once a second) makes a parked writer exit, and
	// the next call starts one: one start per second elapsed, and one
	// more for the tick the calls began in. A writer per response
	// fails here.
	if allowed := int64(elapsed/time.Second) + 2; starts > allowed {
		t.Fatalf("%d writer goroutines started for %d calls in %v, want at most %d", starts, calls, elapsed, allowed)
	}
	waitNoWriter(ctx, t, "the parked writer to exit")
	t.Logf("%d calls in %v: %d writer starts", calls, elapsed, starts)
}

// TestWindowUpdateStartsNoWriter: a WINDOW_UPDATE when nothing waits for
// window gives the writer nothing to do, so it starts none (issue 12:
// grpc-go returns each response's bytes with one, and each started a
// writer goroutine that found nothing to write).
func TestWindowUpdateStartsNoWriter(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	srv := e.srv.(*proxy.Server)
	r := dialRaw(t, e.addr)
	handshakeRaw(t, r)
	ctx := testkit.Context(t, 20*time.Second)
	waitNoWriter(ctx, t, "the handshake's writer to exit")
	before := srv.WriterStarts()
	const updates = 20
	for i := range updates {
		// One at a time, so that a writer started for one would find
		// nothing and exit before the next.
		if err := r.fr.WriteWindowUpdate(0, uint32(1000+i)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Millisecond)
	}
	pingRaw(t, r, [8]byte{'w', 'u'}) // its answer needs a writer: one start
	if starts := srv.WriterStarts() - before; starts != 1 {
		t.Fatalf("%d writer goroutines started for %d WINDOW_UPDATEs and a PING, want 1 (the PING's)", starts, updates)
	}
}
