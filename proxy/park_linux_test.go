package proxy_test

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"runtime"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// Tests of idle client connections parked without a goroutine (park.go).
// ParkAfter is short here; connections are observed through ParkedConns
// and the goroutine count, and every one talks real HTTP/2.

const testParkAfter = 50 * time.Millisecond

func newParkEnv(t *testing.T, pcfg func(c *proxy.Config)) (*env, *proxy.Server) {
	t.Helper()
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		c.ParkAfter = testParkAfter
		if pcfg != nil {
			pcfg(c)
		}
	}})
	return e, e.srv.(*proxy.Server)
}

func waitParked(ctx context.Context, t *testing.T, s *proxy.Server, n int) {
	t.Helper()
	testkit.WaitFor(ctx, t, "parked connections", func() bool { return s.Stats().ClientConnsParked == n })
}

// handshake reads the proxy's SETTINGS and acknowledges it, so the client
// side of the preface is done.
func (r *rawConn) handshake() {
	r.t.Helper()
	r.next(func(f http2.Frame) bool { s, ok := f.(*http2.SettingsFrame); return ok && !s.IsAck() })
	if err := r.fr.WriteSettingsAck(); err != nil {
		r.t.Fatal(err)
	}
}

// TestParkedConnResumesForCall: a gRPC client's idle connection is
// parked, without the stream map and header scratch its calls made and
// without its reader's read buffer, a later call on it wakes it and
// succeeds, and it parks and wakes again; over TCP and over TLS.
func TestParkedConnResumesForCall(t *testing.T) {
	for _, tc := range []struct {
		name string
		tls  bool
	}{{"tcp", false}, {"tls", true}} {
		t.Run(tc.name, func(t *testing.T) {
			verifyNoLeaks(t)
			e, s := newParkEnv(t, nil)
			client := e.client
			if tc.tls {
				s, client = startTLSProxy(t, e)
			}
			ctx := testkit.Context(t, 20*time.Second)
			for round := range 3 {
				if _, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{Payload: &testgrpc.Payload{Body: []byte("hi")}}); err != nil {
					t.Fatalf("call %d: %v", round, err)
				}
				waitParked(ctx, t, s, 1)
				if n := s.CallLeftovers(); n != 0 {
					t.Errorf("call %d: the parked connection kept its stream map or header decoding scratch", round)
				}
				// Nor its socket reader's small read buffer (crypto/tls
				// reads into it: 512 bytes per idle TLS connection); a
				// plain socket's reader holds none.
				if n := s.ParkedReadBufBytes(); n != 0 {
					t.Errorf("call %d: the parked connection's reader holds %d bytes of read buffer, want 0", round, n)
				}
			}
			if got := s.ClientConns(); got != 1 {
				t.Errorf("client connections = %d, want 1 (the same one, resumed)", got)
			}
		})
	}
}

// startTLSProxy serves a second frame proxy over TLS in front of e's
// director, with a certificate made here, and returns it with a client.
func startTLSProxy(t *testing.T, e *env) (*proxy.Server, testgrpc.TestServiceClient) {
	t.Helper()
	ca := testkit.NewCA(t, "park-ca")
	certPEM, keyPEM := ca.Issue(t, "127.0.0.1", true)
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	s, err := proxy.New(proxy.Config{Picker: e.dir, Logger: quietLog, ParkAfter: testParkAfter})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() {
		// As the cluster package serves TLS: crypto/tls over WrapSocket.
		served <- s.Serve(tls.NewListener(wrapListener{ln}, &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2"}}))
	}()
	t.Cleanup(func() {
		s.Close()
		if err := <-served; !errors.Is(err, proxy.ErrServerClosed) {
			t.Errorf("Serve returned %v", err)
		}
	})
	cc, err := grpc.NewClient("passthrough:///"+ln.Addr().String(),
		grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: ca.Pool(), ServerName: "127.0.0.1"})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return s, testgrpc.NewTestServiceClient(cc)
}

// TestParkedConnAnswersPing: a PING from a client whose connection is
// parked is answered with its payload.
func TestParkedConnAnswersPing(t *testing.T) {
	verifyNoLeaks(t)
	e, s := newParkEnv(t, nil)
	ctx := testkit.Context(t, 20*time.Second)
	r := dialRaw(t, e.addr)
	r.handshake()
	waitParked(ctx, t, s, 1)
	for i := range 3 {
		data := [8]byte{'p', 'a', 'r', 'k', byte(i)}
		if err := r.fr.WritePing(false, data); err != nil {
			t.Fatal(err)
		}
		f := r.next(func(f http2.Frame) bool { p, ok := f.(*http2.PingFrame); return ok && p.IsAck() })
		if got := f.(*http2.PingFrame).Data; got != data {
			t.Fatalf("PING ack %q, want %q", got, data)
		}
		waitParked(ctx, t, s, 1) // and it parks again
	}
}

// TestParkedClientCloses: clients that close while parked are cleaned up:
// no connection, nothing parked, no goroutine left (verifyNoLeaks).
func TestParkedClientCloses(t *testing.T) {
	verifyNoLeaks(t)
	e, s := newParkEnv(t, nil)
	ctx := testkit.Context(t, 20*time.Second)
	var rs []*rawConn
	for range 20 {
		r := dialRaw(t, e.addr)
		r.handshake()
		rs = append(rs, r)
	}
	waitParked(ctx, t, s, len(rs))
	for i, r := range rs {
		if i%2 == 0 {
			r.nc.(*net.TCPConn).SetLinger(0) // half of them with a reset
		}
		r.nc.Close()
	}
	testkit.WaitFor(ctx, t, "connections gone", func() bool { return s.ClientConns() == 0 && s.ParkedConns() == 0 })
}

// TestParkedIdleTimeout: the idle timeout still shuts a parked connection
// down: GOAWAY(NO_ERROR), then close.
func TestParkedIdleTimeout(t *testing.T) {
	verifyNoLeaks(t)
	e, s := newParkEnv(t, func(c *proxy.Config) { c.IdleTimeout = 600 * time.Millisecond })
	ctx := testkit.Context(t, 20*time.Second)
	r := dialRaw(t, e.addr)
	r.handshake()
	waitParked(ctx, t, s, 1)
	g := r.awaitGoAway()
	if g == nil || g.ErrCode != http2.ErrCodeNo {
		t.Fatalf("parked idle connection got GOAWAY %+v, want NO_ERROR", g)
	}
	testkit.WaitFor(ctx, t, "connection gone", func() bool { return s.ClientConns() == 0 && s.ParkedConns() == 0 })
}

// TestParkedShutdown: a graceful shutdown with parked connections sends
// them GOAWAY and ends, whether the client answers the shutdown's PING or
// not.
func TestParkedShutdown(t *testing.T) {
	verifyNoLeaks(t)
	e, s := newParkEnv(t, func(c *proxy.Config) { c.ShutdownPingTimeout = 200 * time.Millisecond })
	ctx := testkit.Context(t, 20*time.Second)
	var rs []*rawConn
	for range 4 {
		r := dialRaw(t, e.addr)
		r.handshake()
		rs = append(rs, r)
	}
	waitParked(ctx, t, s, len(rs))
	done := make(chan error, 1)
	go func() { done <- s.Shutdown(ctx) }()
	for i, r := range rs {
		if i%2 == 0 {
			// This one answers the PING, which it reads after the first
			// GOAWAY, and reads on to the end.
			for {
				f, err := r.fr.ReadFrame()
				if err != nil {
					t.Fatalf("connection %d: reading the shutdown's PING: %v", i, err)
				}
				if p, ok := f.(*http2.PingFrame); ok && !p.IsAck() {
					break
				}
			}
			if err := r.fr.WritePing(true, [8]byte{'s', 't', 'r', 'm', 'l', 'b', 'g', 'a'}); err != nil {
				t.Fatal(err)
			}
		}
		if g := r.awaitGoAway(); g == nil || g.ErrCode != http2.ErrCodeNo || g.LastStreamID != 0 {
			t.Errorf("connection %d: last GOAWAY %+v, want NO_ERROR with last stream 0", i, g)
		}
	}
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if n := s.ClientConns(); n != 0 {
		t.Errorf("%d client connections after Shutdown", n)
	}
}

// TestParkedClose: Close with parked connections closes them and returns
// with no goroutine left.
func TestParkedClose(t *testing.T) {
	verifyNoLeaks(t)
	e, s := newParkEnv(t, nil)
	ctx := testkit.Context(t, 20*time.Second)
	r := dialRaw(t, e.addr)
	r.handshake()
	waitParked(ctx, t, s, 1)
	s.Close()
	if _, err := io.Copy(io.Discard, r.nc); err != nil {
		t.Fatalf("reading to the close: %v", err)
	}
	if n := s.ParkedConns(); n != 0 {
		t.Errorf("%d parked after Close", n)
	}
}

// TestBusyConnNotParked: a connection with a stream open is not parked,
// while an idle one beside it, asked at the same housekeeping ticks, is;
// a half-written frame is not lost when the reader is asked to park
// mid-frame: the rest completes it.
func TestBusyConnNotParked(t *testing.T) {
	verifyNoLeaks(t)
	e, s := newParkEnv(t, nil)
	ctx := testkit.Context(t, 20*time.Second)
	busy := dialRaw(t, e.addr)
	busy.handshake()
	busy.headers(1, "/grpc.testing.TestService/FullDuplexCall", false)
	half := dialRaw(t, e.addr)
	half.handshake()
	// A PING's frame header and half of its payload: the reader waits
	// mid-frame.
	ping := []byte{0, 0, 8, byte(http2.FramePing), 0, 0, 0, 0, 0, 'h', 'a', 'l', 'f'}
	if _, err := half.nc.Write(ping); err != nil {
		t.Fatal(err)
	}
	idle := dialRaw(t, e.addr)
	idle.handshake()
	waitParked(ctx, t, s, 1)
	// Two more parks of the idle one: at least two more asks of the
	// others.
	for i := range 2 {
		idle.fr.WritePing(false, [8]byte{byte(i)})
		idle.next(func(f http2.Frame) bool { p, ok := f.(*http2.PingFrame); return ok && p.IsAck() })
		waitParked(ctx, t, s, 1)
	}
	if _, err := half.nc.Write([]byte("-end")); err != nil {
		t.Fatal(err)
	}
	// A stream keeps it busy from here on: once its PING is whole it
	// would be idle, and could park by right before the check below on
	// a slow machine.
	half.headers(1, "/grpc.testing.TestService/FullDuplexCall", false)
	f := half.next(func(f http2.Frame) bool { p, ok := f.(*http2.PingFrame); return ok && p.IsAck() })
	if got := f.(*http2.PingFrame).Data; got != [8]byte{'h', 'a', 'l', 'f', '-', 'e', 'n', 'd'} {
		t.Errorf("half-written PING acked with %q", got)
	}
	busy.fr.WritePing(false, [8]byte{'b'})
	busy.next(func(f http2.Frame) bool { p, ok := f.(*http2.PingFrame); return ok && p.IsAck() })
	if got := s.ParkedConns(); got > 1 {
		t.Errorf("%d parked connections, want at most the idle one", got)
	}
}

// TestManyParkedConns: 2,000 idle connections, once parked, hold no
// goroutine each; every one still answers.
func TestManyParkedConns(t *testing.T) {
	if testing.Short() {
		t.Skip("2,000 connections")
	}
	verifyNoLeaks(t)
	e, s := newParkEnv(t, nil)
	ctx := testkit.Context(t, 60*time.Second)
	base := runtime.NumGoroutine()
	const n = 2000
	rs := make([]*rawConn, 0, n)
	for range n {
		rs = append(rs, dialRaw(t, e.addr))
	}
	testkit.WaitFor(ctx, t, "connections accepted", func() bool { return s.ClientConns() == n })
	waitParked(ctx, t, s, n)
	if got := runtime.NumGoroutine() - base; got > 50 {
		t.Errorf("%d goroutines more than before the %d parked connections, want a handful", got, n)
	}
	for i, r := range rs {
		if i%100 != 0 {
			continue
		}
		r.fr.WritePing(false, [8]byte{byte(i / 100)})
		r.next(func(f http2.Frame) bool { p, ok := f.(*http2.PingFrame); return ok && p.IsAck() })
	}
}

// TestParkedCountTowardsMaxConnections: parked connections are counted
// against MaxConnections: one over the cap is closed at once, and a
// parked one, woken by a call, still serves it.
func TestParkedCountTowardsMaxConnections(t *testing.T) {
	verifyNoLeaks(t)
	e, s := newParkEnv(t, func(c *proxy.Config) { c.MaxConnections = 2 })
	ctx := testkit.Context(t, 20*time.Second)
	var rs []*rawConn
	for range 2 {
		r := dialRaw(t, e.addr)
		r.handshake()
		rs = append(rs, r)
	}
	waitParked(ctx, t, s, 2)
	over := dialRaw(t, e.addr)
	if g := over.awaitGoAway(); g != nil {
		t.Fatalf("connection over the cap got GOAWAY %v, want a plain close", g.ErrCode)
	}
	if got := s.RefusedConns(); got != 1 {
		t.Errorf("refused %d connections, want 1", got)
	}
	r := rs[0]
	r.headers(1, "/grpc.testing.TestService/EmptyCall", false)
	r.fr.WriteData(1, true, grpcMsg(&testgrpc.Empty{}))
	h := r.next(func(f http2.Frame) bool { h, ok := f.(*http2.MetaHeadersFrame); return ok && h.StreamEnded() })
	if got := field(h.(*http2.MetaHeadersFrame), "grpc-status"); got != "0" {
		t.Errorf("call on a woken parked connection: grpc-status %q, want 0", got)
	}
}

// TestParkedConnDropsFramerBuffer: a parked connection lets go of the
// read Framer's buffer, which x/net keeps at the size of the largest frame
// the Framer read: after an upload whose 16 KiB DATA frames the read
// buffer's end cut (they go through the Framer), each idle connection
// kept 16 KiB more than after a small call.
func TestParkedConnDropsFramerBuffer(t *testing.T) {
	if proxy.PbufDebug {
		t.Skip("the pbufdebug build keeps freed buffers: heap figures mean nothing")
	}
	e, srv := newParkEnv(t, nil)
	ctx := testkit.Context(t, 60*time.Second)
	const conns = 60
	settled := 0 // goroutines with no test connection open
	perConn := func(size int) float64 {
		t.Helper()
		// The last round's client transports end in goroutines of their
		// own after Close: what they free while this round is measured
		// made the figure negative now and then.
		testkit.WaitFor(ctx, t, "last round's connections gone", func() bool { return runtime.NumGoroutine() <= settled })
		base := heapInuse()
		ccs := make([]*grpc.ClientConn, conns)
		for i := range ccs {
			ccs[i] = e.dial(e.addr)
			req := &testgrpc.SimpleRequest{Payload: &testgrpc.Payload{Body: make([]byte, size)}}
			if _, err := testgrpc.NewTestServiceClient(ccs[i]).UnaryCall(ctx, req); err != nil {
				t.Fatal(err)
			}
		}
		waitParked(ctx, t, srv, conns+1) // and the env's own connection
		per := (float64(heapInuse()) - float64(base)) / conns
		for _, cc := range ccs {
			cc.Close()
		}
		waitParked(ctx, t, srv, 1)
		return per
	}
	if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatal(err)
	}
	settled = runtime.NumGoroutine()
	perConn(10) // warm up
	// The heap is the whole test process's: once in a CI run, 573 KB (seven
	// 80 KiB buffers) let go during the small round and taken during the
	// upload one read as 19 KB per connection. A connection that keeps its
	// Framer's buffer keeps it in every pair of rounds, so the bound must
	// hold in one of three.
	var diffs []float64
	for range 3 {
		small := perConn(10)
		upload := perConn(200 << 10)
		t.Logf("heap per parked connection (client side included): %.0f B after a small call, %.0f B after a 200 KiB upload", small, upload)
		if upload-small <= 8<<10 {
			return
		}
		diffs = append(diffs, upload-small)
	}
	t.Errorf("a parked connection keeps more after an upload than after a small call, in three pairs of rounds: %.0f B", diffs)
}
