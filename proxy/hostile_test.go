package proxy_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// This file holds the hostile-client tests: each attack runs from a raw
// HTTP/2 client on loopback, bounded in count and time, beside a good
// client on its own connection that must see no error.

// goodClient makes calls on its own connection until stop, counting
// failures.
type goodClient struct {
	calls, errs atomic.Int64
	lastErr     atomic.Value
	stop        chan struct{}
	done        chan struct{}
}

func startGoodClient(t *testing.T, e *env) *goodClient {
	t.Helper()
	client := testgrpc.NewTestServiceClient(e.dial(e.addr))
	g := &goodClient{stop: make(chan struct{}), done: make(chan struct{})}
	ctx := testkit.Context(t, 60*time.Second)
	// One call first, so the connection is up before the attack.
	if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatalf("good client before the attack: %v", err)
	}
	go func() {
		defer close(g.done)
		// At least one call before stop is looked at: a test whose
		// attack is over in a few milliseconds (TestMaxConnections: 0.01
		// s) could otherwise check before the loop's first turn, and
		// fail with "no call" though nothing went wrong (seen in CI).
		for {
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			_, err := client.UnaryCall(cctx, &testgrpc.SimpleRequest{ResponseSize: 100})
			cancel()
			g.calls.Add(1)
			if err != nil {
				g.errs.Add(1)
				g.lastErr.Store(err)
			}
			select {
			case <-g.stop:
				return
			default:
			}
		}
	}()
	t.Cleanup(g.finish)
	return g
}

// finish stops the client; safe to call twice.
func (g *goodClient) finish() {
	select {
	case <-g.stop:
	default:
		close(g.stop)
	}
	<-g.done
}

// check stops the client and fails the test if any call failed.
func (g *goodClient) check(t *testing.T) {
	t.Helper()
	g.finish()
	if n := g.errs.Load(); n > 0 {
		t.Errorf("good client: %d of %d calls failed, last: %v", n, g.calls.Load(), g.lastErr.Load())
	}
	if g.calls.Load() == 0 {
		t.Errorf("good client made no call")
	}
	t.Logf("good client: %d calls, %d errors", g.calls.Load(), g.errs.Load())
}

// awaitGoAway reads until the connection ends and returns the last GOAWAY
// seen (a graceful shutdown sends two), or nil if it closed without one.
func (r *rawConn) awaitGoAway() *http2.GoAwayFrame {
	r.t.Helper()
	var g *http2.GoAwayFrame
	for {
		f, err := r.fr.ReadFrame()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				r.t.Fatalf("connection still open: %v", err)
			}
			if g == nil {
				r.t.Logf("connection ended without a GOAWAY: %v", err)
			}
			return g
		}
		if ga, ok := f.(*http2.GoAwayFrame); ok {
			g = &http2.GoAwayFrame{FrameHeader: ga.FrameHeader, LastStreamID: ga.LastStreamID, ErrCode: ga.ErrCode}
		}
	}
}

// flakyListener fails its first fails accepts with EMFILE, as a process
// out of file descriptors sees.
type flakyListener struct {
	net.Listener
	fails    atomic.Int32
	accepted chan struct{} // closed on the first real accept
	once     sync.Once
}

func (l *flakyListener) Accept() (net.Conn, error) {
	if l.fails.Add(-1) >= 0 {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: l.Addr(), Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	}
	nc, err := l.Listener.Accept()
	if err == nil {
		l.once.Do(func() { close(l.accepted) })
	}
	return nc, err
}

// TestAcceptEMFILE: running out of file descriptors is temporary. Serve
// backs off and goes on accepting; it does not return.
func TestAcceptEMFILE(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	good := startGoodClient(t, e)
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := &flakyListener{Listener: inner, accepted: make(chan struct{})}
	ln.fails.Store(6) // 5+10+20+40+80+160 ms of back-off
	served := make(chan error, 1)
	go func() { served <- e.srv.Serve(ln) }()

	ctx := testkit.Context(t, 20*time.Second)
	client := testgrpc.NewTestServiceClient(e.dial(inner.Addr().String()))
	if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatalf("call through the listener that failed with EMFILE: %v", err)
	}
	select {
	case err := <-served:
		t.Fatalf("Serve returned %v after EMFILE", err)
	default:
	}
	good.check(t)
	e.srv.Close()
	if err := <-served; !errors.Is(err, proxy.ErrServerClosed) {
		t.Errorf("Serve returned %v, want ErrServerClosed", err)
	}
}

// TestAcceptBackoffStopsOnClose: Close ends a Serve that is backing off at
// once, not after the back-off.
func TestAcceptBackoffStopsOnClose(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := &flakyListener{Listener: inner, accepted: make(chan struct{})}
	ln.fails.Store(1 << 30)
	served := make(chan error, 1)
	go func() { served <- e.srv.Serve(ln) }()
	ctx := testkit.Context(t, 10*time.Second)
	testkit.WaitFor(ctx, t, "accept failures", func() bool { return ln.fails.Load() < 1<<30-8 }) // into 1s waits
	e.srv.Close()
	select {
	case err := <-served:
		if !errors.Is(err, proxy.ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	case <-ctx.Done():
		t.Fatal("Serve still backing off after Close")
	}
}

// TestMaxConnections: connections over the cap are closed at once and
// counted; those under it, and the server, carry on.
func TestMaxConnections(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.MaxConnections = 2 }})
	good := startGoodClient(t, e) // connection 1
	held := dialRaw(t, e.addr)    // connection 2
	held.next(func(f http2.Frame) bool { _, ok := f.(*http2.SettingsFrame); return ok })
	for i := range 20 {
		r := dialRaw(t, e.addr)
		if g := r.awaitGoAway(); g != nil {
			t.Fatalf("connection %d over the cap got GOAWAY %v, want a plain close", i, g.ErrCode)
		}
	}
	srv := e.srv.(*proxy.Server)
	// Counted after the close the dial saw (19 of 20 once, under a full
	// run's load): wait for the last, then check for no more.
	ctx := testkit.Context(t, 10*time.Second)
	testkit.WaitFor(ctx, t, "20 refused connections counted", func() bool { return srv.RefusedConns() >= 20 })
	if got := srv.RefusedConns(); got != 20 {
		t.Errorf("refused %d connections, want 20", got)
	}
	// The held connection still works.
	held.headers(1, "/grpc.testing.TestService/EmptyCall", false)
	held.fr.WriteData(1, true, grpcMsg(&testgrpc.Empty{}))
	held.next(func(f http2.Frame) bool { h, ok := f.(*http2.MetaHeadersFrame); return ok && h.StreamEnded() })
	good.check(t)
}

// flood writes frames with send(i) for i < n from its own goroutine until
// one fails (the proxy closed the connection), and returns a channel that
// yields how many were written.
func (r *rawConn) flood(n int, send func(i int) error) <-chan int {
	out := make(chan int, 1)
	go func() {
		i := 0
		for ; i < n; i++ {
			if send(i) != nil {
				break
			}
		}
		out <- i
	}()
	return out
}

// peakRSS returns the process's peak resident set (VmHWM) in MiB, after
// resetting it if reset is set; 0 where /proc does not tell. The proxy
// shares the process with the backends and the attacker, so this is an
// upper bound, for the log rather than for assertions.
func peakRSS(reset bool) int {
	if reset {
		os.WriteFile("/proc/self/clear_refs", []byte("5"), 0)
	}
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			return kb >> 10
		}
	}
	return 0
}

// TestRapidReset: a client that opens streams and resets them at once
// (CVE-2023-44487) is cut with GOAWAY(ENHANCE_YOUR_CALM) after a few
// hundred, long before its 20,000 pairs reach the backends.
func TestRapidReset(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 2})
	good := startGoodClient(t, e)
	before := e.backends[0].Calls() + e.backends[1].Calls() - good.calls.Load()
	rss := peakRSS(true)
	r := dialRaw(t, e.addr)
	const pairs = 20000
	sent := r.flood(pairs, func(i int) error {
		id := uint32(2*i + 1)
		if err := r.writeHeaders(id, "/grpc.testing.TestService/FullDuplexCall", false); err != nil {
			return err
		}
		return r.fr.WriteRSTStream(id, http2.ErrCodeCancel)
	})
	g := r.awaitGoAway()
	n := <-sent
	if g == nil || g.ErrCode != http2.ErrCodeEnhanceYourCalm {
		t.Fatalf("got GOAWAY %+v, want ENHANCE_YOUR_CALM", g)
	}
	// The attacker's streams only: the good client's calls go on until
	// the attacker's connection has ended (the proxy drains it after the
	// GOAWAY), and reach the backends too.
	reached := e.backends[0].Calls() + e.backends[1].Calls() - good.calls.Load() - before
	t.Logf("attacker wrote %d pairs; GOAWAY last stream %d; %d streams reached backends; peak RSS %d MiB before, %d MiB after", n, g.LastStreamID, reached, rss, peakRSS(false))
	if reached > 1000 {
		t.Errorf("%d streams reached the backends, want a few hundred at most", reached)
	}
	good.check(t)
}

// TestCancelsOfOldStreamsKeepConnection: a client that cancels calls it
// waited on for a second or more is not a rapid-reset attacker, however
// many it cancels: its connection, and the healthy stream beside them,
// live on. Every reset before the answer counted: a client whose calls to
// a slow backend were all cancelled had its connection closed, cutting
// its healthy calls (attack round 3).
func TestCancelsOfOldStreamsKeepConnection(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.MaxEarlyResets = 4 }})
	client := testgrpc.NewTestServiceClient(e.dial(e.addr))
	ctx := testkit.Context(t, 30*time.Second)
	echo := &testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 10}}}
	roundTrip := func(st testgrpc.TestService_FullDuplexCallClient) error {
		if err := st.Send(echo); err != nil {
			return err
		}
		_, err := st.Recv()
		return err
	}
	healthy, err := client.FullDuplexCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(healthy); err != nil {
		t.Fatal(err)
	}
	const n = 12 // three times the limit, most of the streams opened
	var cancels []context.CancelFunc
	for range n {
		sctx, cancel := context.WithCancel(ctx)
		defer cancel()
		st, err := client.FullDuplexCall(sctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := roundTrip(st); err != nil {
			t.Fatal(err)
		}
		cancels = append(cancels, cancel)
	}
	time.Sleep(1100 * time.Millisecond) // older than a rapid reset's streams
	for _, cancel := range cancels {
		cancel()
	}
	// The resets went out before the next message on the connection.
	if err := roundTrip(healthy); err != nil {
		t.Fatalf("the healthy stream after %d cancels of old streams: %v", n, err)
	}
	if _, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: 10}); err != nil {
		t.Fatalf("a new call after %d cancels of old streams: %v", n, err)
	}
	healthy.CloseSend()
	if _, err := healthy.Recv(); err != io.EOF {
		t.Errorf("healthy stream ended with %v, want its end", err)
	}
}

// TestGlitchFloods: floods of frames that do no work end the connection
// with GOAWAY(ENHANCE_YOUR_CALM) within the glitch budget; the good client
// on another connection sees no error.
func TestGlitchFloods(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	good := startGoodClient(t, e)
	const path = "/grpc.testing.TestService/FullDuplexCall"
	tests := []struct {
		name  string
		n     int // frames the attacker is willing to send
		setup func(r *rawConn)
		send  func(r *rawConn, i int) error
	}{
		{
			name:  "empty DATA",
			n:     1 << 20,
			setup: func(r *rawConn) { r.headers(1, path, false) },
			send:  func(r *rawConn, i int) error { return r.fr.WriteData(1, false, nil) },
		},
		{
			name: "PING",
			n:    1 << 20,
			send: func(r *rawConn, i int) error { return r.fr.WritePing(false, [8]byte{byte(i)}) },
		},
		{
			name: "SETTINGS",
			n:    1 << 20,
			send: func(r *rawConn, i int) error {
				return r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 65535})
			},
		},
		{
			name: "SETTINGS with 1000 entries",
			n:    1,
			send: func(r *rawConn, i int) error {
				s := make([]http2.Setting, 1000)
				for j := range s {
					s[j] = http2.Setting{ID: http2.SettingID(0x100 + j), Val: 1}
				}
				return r.fr.WriteSettings(s...)
			},
		},
		{
			name: "RST_STREAM on closed streams",
			n:    1 << 20,
			setup: func(r *rawConn) {
				r.headers(1, "/grpc.testing.TestService/EmptyCall", false)
				r.fr.WriteData(1, true, grpcMsg(&testgrpc.Empty{}))
				r.next(func(f http2.Frame) bool { h, ok := f.(*http2.MetaHeadersFrame); return ok && h.StreamEnded() })
			},
			send: func(r *rawConn, i int) error { return r.fr.WriteRSTStream(1, http2.ErrCodeCancel) },
		},
		{
			// The proxy reset the stream after the backend's early
			// answer: a stream window of DATA in flight is ignored
			// (TestEarlyRejectedUploads), not a flood.
			name: "DATA on a stream the proxy reset",
			n:    1 << 20,
			setup: func(r *rawConn) {
				r.writeFields(1, "/grpc.testing.TestService/StreamingInputCall", testserver.MetadataFailCode, "7")
				r.next(func(f http2.Frame) bool { rst, ok := f.(*http2.RSTStreamFrame); return ok && rst.StreamID == 1 })
			},
			send: func(r *rawConn, i int) error { return r.fr.WriteData(1, false, []byte{0}) },
		},
		{
			name: "WINDOW_UPDATE on closed streams",
			n:    1 << 20,
			setup: func(r *rawConn) {
				r.headers(1, "/grpc.testing.TestService/EmptyCall", false)
				r.fr.WriteData(1, true, grpcMsg(&testgrpc.Empty{}))
				r.next(func(f http2.Frame) bool { h, ok := f.(*http2.MetaHeadersFrame); return ok && h.StreamEnded() })
			},
			send: func(r *rawConn, i int) error { return r.fr.WriteWindowUpdate(1, 1) },
		},
		{
			// Below 2^31-1 in all: only the glitch budget can stop it.
			// A million frames, as the other floods, so that the
			// socket buffers cannot take them all before the proxy
			// closes: 2^14 of 2^16 each (213 KB) sometimes fit.
			name: "connection WINDOW_UPDATE with nothing sent",
			n:    1 << 20,
			send: func(r *rawConn, i int) error { return r.fr.WriteWindowUpdate(0, 1<<10) },
		},
		{
			// PRIORITY frames do nothing here (RFC 9113 §5.3.2); a
			// flood of them ran unmetered for as long as it was sent.
			name:  "PRIORITY on an open stream",
			n:     1 << 20,
			setup: func(r *rawConn) { r.headers(1, path, false) },
			send: func(r *rawConn, i int) error {
				return r.fr.WritePriority(1, http2.PriorityParam{Weight: uint8(i)})
			},
		},
		{
			name: "PRIORITY on idle streams",
			n:    1 << 20,
			send: func(r *rawConn, i int) error {
				return r.fr.WritePriority(uint32(2*i+1), http2.PriorityParam{Weight: 1})
			},
		},
		{
			name: "frames of an unknown type",
			n:    1 << 20,
			send: func(r *rawConn, i int) error { return r.fr.WriteRawFrame(0xa5, 0, 0, nil) },
		},
		{
			name:  "WINDOW_UPDATE on an open stream with a full window",
			n:     1 << 20,
			setup: func(r *rawConn) { r.headers(1, path, false) },
			send:  func(r *rawConn, i int) error { return r.fr.WriteWindowUpdate(1, 1) },
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rss := peakRSS(true)
			r := dialRaw(t, e.addr)
			if tc.setup != nil {
				tc.setup(r)
			}
			sent := r.flood(tc.n, func(i int) error { return tc.send(r, i) })
			g := r.awaitGoAway()
			n := <-sent
			if g == nil || g.ErrCode != http2.ErrCodeEnhanceYourCalm {
				t.Fatalf("got GOAWAY %+v, want ENHANCE_YOUR_CALM", g)
			}
			t.Logf("attacker wrote %d frames; peak RSS %d MiB before, %d MiB after", n, rss, peakRSS(false))
			if tc.n > 1 && n == tc.n {
				t.Errorf("all %d frames were taken", n)
			}
		})
	}
	good.check(t)
}

// TestIdleTimeout: a client connection without streams for IdleTimeout is
// shut down with GOAWAY(NO_ERROR) and closed; one with a stream open is
// left alone.
func TestIdleTimeout(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.IdleTimeout = 300 * time.Millisecond }})
	busy := dialRaw(t, e.addr)
	busy.headers(1, "/grpc.testing.TestService/FullDuplexCall", false)
	idle := dialRaw(t, e.addr)
	idle.headers(1, "/grpc.testing.TestService/EmptyCall", false)
	idle.fr.WriteData(1, true, grpcMsg(&testgrpc.Empty{}))
	g := idle.awaitGoAway()
	if g == nil || g.ErrCode != http2.ErrCodeNo || g.LastStreamID != 1 {
		t.Fatalf("idle connection got GOAWAY %+v, want NO_ERROR with last stream 1", g)
	}
	busy.fr.WritePing(false, [8]byte{7})
	busy.next(func(f http2.Frame) bool { p, ok := f.(*http2.PingFrame); return ok && p.IsAck() })
}

// TestWriteTimeout: a client that asks for large answers and never reads
// them loses its connection after WriteTimeout; its streams are cancelled
// at the backend, and a good client sees no error.
func TestWriteTimeout(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.WriteTimeout = 300 * time.Millisecond }})
	good := startGoodClient(t, e)
	rss := peakRSS(true)
	r := dialRawWide(t, e.addr)
	params := make([]*testgrpc.ResponseParameters, 16)
	for i := range params {
		params[i] = &testgrpc.ResponseParameters{Size: 1 << 20}
	}
	const streams = 8
	for i := range streams {
		id := uint32(2*i + 1)
		r.headers(id, "/grpc.testing.TestService/StreamingOutputCall", false)
		r.fr.WriteData(id, true, grpcMsg(&testgrpc.StreamingOutputCallRequest{ResponseParameters: params}))
	}
	ctx := testkit.Context(t, 30*time.Second)
	testkit.WaitFor(ctx, t, "the non-reading client's streams to be cancelled", func() bool {
		return e.backends[0].Canceled() >= streams
	})
	// The socket was closed: what it buffered, then EOF.
	r.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := io.Copy(io.Discard, r.nc)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("connection still open after %d bytes", n)
	}
	t.Logf("non-reading client: connection ended after %d buffered bytes (%v); peak RSS %d MiB before, %d MiB after", n, err, rss, peakRSS(false))
	good.check(t)
}

// writeFields writes one HEADERS frame with the request headers of a
// gRPC call to path, then extra fields, encoded as given.
func (r *rawConn) writeFields(id uint32, path string, extra ...string) {
	r.t.Helper()
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	f := append([]string{":method", "POST", ":scheme", "http", ":path", path, ":authority", "x", "content-type", "application/grpc", "te", "trailers"}, extra...)
	for i := 0; i < len(f); i += 2 {
		enc.WriteField(hpack.HeaderField{Name: f[i], Value: f[i+1]})
	}
	if err := r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true}); err != nil {
		r.t.Fatal(err)
	}
}

// TestBadRequestHeaders: a request whose header block is over a limit, or
// that the Framer rejects, costs its own stream only: the sibling stream
// opened before it completes, the connection gets no GOAWAY, and the good
// client sees no error.
func TestBadRequestHeaders(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	good := startGoodClient(t, e)
	many := make([]string, 0, 300)
	for i := range 150 {
		many = append(many, fmt.Sprintf("x-field-%d", i), "v")
	}
	tests := []struct {
		name  string
		extra []string
		check func(t *testing.T, f http2.Frame) // first frame on the bad stream
	}{
		{
			name:  "150 fields",
			extra: many,
			check: func(t *testing.T, f http2.Frame) {
				h, ok := f.(*http2.MetaHeadersFrame)
				if !ok || h.PseudoValue("status") != "431" || field(h, "grpc-status") != "8" {
					t.Errorf("got %v, want HTTP 431 with grpc-status 8 (RESOURCE_EXHAUSTED)", f)
				}
			},
		},
		{name: "upper-case field name", extra: []string{"X-Upper", "v"}, check: wantRST(http2.ErrCodeProtocol)},
		{name: "unknown pseudo-header", extra: []string{":foo", "v"}, check: wantRST(http2.ErrCodeProtocol)},
		{name: "pseudo-header after regular", extra: []string{"x-a", "b", ":protocol", "v"}, check: wantRST(http2.ErrCodeProtocol)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := dialRaw(t, e.addr)
			r.headers(1, "/grpc.testing.TestService/UnaryCall", false) // the sibling
			r.writeFields(3, "/grpc.testing.TestService/UnaryCall", tc.extra...)
			tc.check(t, r.next(func(f http2.Frame) bool {
				switch f := f.(type) {
				case *http2.MetaHeadersFrame:
					return f.StreamID == 3
				case *http2.RSTStreamFrame:
					return f.StreamID == 3
				}
				return false
			}))
			// The client sends its message anyway: ignored on stream 3,
			// relayed on stream 1.
			r.fr.WriteData(3, true, grpcMsg(&testgrpc.SimpleRequest{}))
			r.fr.WriteData(1, true, grpcMsg(&testgrpc.SimpleRequest{ResponseSize: 10}))
			end := r.next(func(f http2.Frame) bool {
				h, ok := f.(*http2.MetaHeadersFrame)
				return ok && h.StreamID == 1 && h.StreamEnded()
			}).(*http2.MetaHeadersFrame)
			if field(end, "grpc-status") != "0" {
				t.Errorf("sibling stream ended with %v, want grpc-status 0", end.Fields)
			}
		})
	}
	good.check(t)
}

func wantRST(code http2.ErrCode) func(*testing.T, http2.Frame) {
	return func(t *testing.T, f http2.Frame) {
		t.Helper()
		if rst, ok := f.(*http2.RSTStreamFrame); !ok || rst.ErrCode != code {
			t.Errorf("got %v, want RST_STREAM %v", f, code)
		}
	}
}

func field(h *http2.MetaHeadersFrame, name string) string {
	for _, f := range h.Fields {
		if f.Name == name {
			return f.Value
		}
	}
	return ""
}

// TestPriorityFramesOfAGoodClient: a client that sends PRIORITY frames
// for its dependency tree (a browser-style client: a few on idle streams
// at the start, then one per stream) and a PRIORITY_UPDATE (RFC 9218,
// type 0x10, unknown to us) with each request is within the allowance
// for ignored frames: its calls complete and its connection is not cut.
func TestPriorityFramesOfAGoodClient(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	r := dialRaw(t, e.addr)
	for id := uint32(3); id <= 11; id += 2 {
		r.fr.WritePriority(id, http2.PriorityParam{Weight: 200})
	}
	for i := range 300 {
		id := uint32(101 + 2*i)
		r.fr.WriteRawFrame(0x10, 0, 0, binary.BigEndian.AppendUint32(nil, id)) // PRIORITY_UPDATE on stream 0
		r.headers(id, "/grpc.testing.TestService/EmptyCall", false)
		r.fr.WritePriority(id, http2.PriorityParam{StreamDep: 3, Weight: 16})
		r.fr.WriteData(id, true, grpcMsg(&testgrpc.Empty{}))
		end, ok := r.streamEnd(id).(*http2.MetaHeadersFrame)
		if !ok || field(end, "grpc-status") != "0" {
			t.Fatalf("call %d on stream %d: %v, want grpc-status 0", i, id, end)
		}
	}
}
