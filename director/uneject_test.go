package director

import (
	"context"
	"crypto/tls"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

// connErr is an error shaped like the proxy's ConnectionFailure errors.
type connErr struct{ st *status.Status }

func (e connErr) Error() string              { return e.st.Err().Error() }
func (e connErr) GRPCStatus() *status.Status { return e.st }
func (connErr) ConnectionFailed() bool       { return true }

var errRefused = connErr{status.New(codes.Unavailable, "streamlb: backend: connecting: connection refused")}

// startBackendAt starts a test server on addr, stopped at cleanup.
func startBackendAt(t *testing.T, addr string) *testserver.Server {
	t.Helper()
	s, err := testserver.New(testserver.Config{Name: "back", Logger: discardLogger()})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(addr); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}

func ejectedOf(d *Director, addr string) bool {
	for _, b := range d.Backends() {
		if b.Addr == addr {
			return b.Ejected
		}
	}
	return false
}

// TestRestartedBackendUnejectedByHandshake: without active health checks,
// a backend ejected after refused connections is back as soon as a new
// connection to it completes an HTTP/2 handshake, not when its 10 s
// ejection runs out. The clock is fake and never moves, so only the probe
// can end the ejection.
func TestRestartedBackendUnejectedByHandshake(t *testing.T) {
	t.Parallel()
	clk := newFakeClock()
	other := startBackends(t, 2)
	down := testkit.DeadAddr(t)
	d := newOutlierDirector(t, Config{}, clk, down, other[0].Addr(), other[1].Addr())
	var probes atomic.Int64
	d.handshake = func(ctx context.Context, addr string, creds credentials.TransportCredentials) error {
		probes.Add(1)
		return h2Handshake(ctx, addr, creds)
	}
	runDirector(t, d)
	failN(t, d, down, errRefused, DefaultEjectAfter)
	waitFor(t, 5*time.Second, "ejection after refused connections", func() bool { return ejectedOf(d, down) })
	// Probes of the backend while it is down fail, and it stays ejected.
	waitFor(t, 5*time.Second, "two probes", func() bool { return probes.Load() >= 2 })
	if !ejectedOf(d, down) {
		t.Fatal("un-ejected while it still refuses connections")
	}
	startBackendAt(t, down)
	took := waitFor(t, 5*time.Second, "un-ejection after the backend came back", func() bool { return !ejectedOf(d, down) })
	t.Logf("back %v after it listened again", took)
	if got := statsOf(t, d, down); got.Ejections != 1 {
		t.Errorf("ejections = %d, want 1", got.Ejections)
	}
	got := pickCounts(t, d, 30)
	if got[down] != 10 {
		t.Errorf("picks after the un-ejection = %v, want 10 of 30 on %s", got, down)
	}

	// Failing again at once (a backend that takes connections, then
	// fails its calls): the second ejection, twice as long, is not probed
	// and runs its time, although a handshake would succeed.
	n := probes.Load()
	failN(t, d, down, errRefused, DefaultEjectAfter)
	if st := statsOf(t, d, down); !st.Ejected || st.Ejections != 2 {
		t.Fatalf("after failing again: %+v, want a second ejection", st)
	}
	time.Sleep(10 * reconnectProbeFirst) // asserting that nothing happens
	if !ejectedOf(d, down) {
		t.Error("a second ejection in a row ended early")
	}
	if p := probes.Load(); p != n {
		t.Errorf("%d probes during the second ejection, want 0", p-n)
	}
}

// TestLateSuccessKeepsProbe: a call that ended well on a backend just
// before its connection failures ejected it, reported after them and
// before Run decided the ejection, must not change what the run said: the
// ejection followed connection failures and is probed. Before, the late
// success reset the count of connection failures the decision read, and
// the backend served its whole ejection (TestKilledBackendBackBeforeEjectionEnds
// in package proxy failed so about one run in thirty under load).
func TestLateSuccessKeepsProbe(t *testing.T) {
	t.Parallel()
	clk := newFakeClock()
	other := startBackends(t, 2)
	down := testkit.DeadAddr(t)
	d := newOutlierDirector(t, Config{}, clk, down, other[0].Addr(), other[1].Addr())
	// Picks without the test helpers' reconcile after each done: Run,
	// started below, is the first to decide, as in production, where
	// it decides on its own goroutine a moment after the outcomes.
	rawPick := func() func(error) {
		for range 100 {
			addr, done, err := d.Pick(t.Context(), "/test.Service/Method")
			if err != nil {
				t.Fatal(err)
			}
			if addr == down {
				return done
			}
			done(nil)
		}
		t.Fatalf("Pick() did not return %s in 100 picks", down)
		return nil
	}
	late := rawPick() // in flight while the backend dies
	for range DefaultEjectAfter {
		rawPick()(errRefused)
	}
	late(nil) // reported after the failures, before Run decides
	runDirector(t, d)
	waitFor(t, 5*time.Second, "ejection after refused connections", func() bool { return ejectedOf(d, down) })
	startBackendAt(t, down)
	// The clock never moves: only a probe can end the ejection.
	waitFor(t, 5*time.Second, "un-ejection by a handshake", func() bool { return !ejectedOf(d, down) })
}

// TestAnsweredUnavailableNotProbed: an ejection that followed the backend's
// own UNAVAILABLE answers is not ended by a handshake, which proves
// nothing about it (Envoy keeps every ejection without active checks).
func TestAnsweredUnavailableNotProbed(t *testing.T) {
	t.Parallel()
	clk := newFakeClock()
	bs := startBackends(t, 3)
	d := newOutlierDirector(t, Config{}, clk, bs[0].Addr(), bs[1].Addr(), bs[2].Addr())
	var probes atomic.Int64
	d.handshake = func(ctx context.Context, addr string, creds credentials.TransportCredentials) error {
		probes.Add(1)
		return h2Handshake(ctx, addr, creds)
	}
	runDirector(t, d)
	// A connection failure then answers: the run ends with answers.
	failN(t, d, bs[0].Addr(), errRefused, 1)
	failN(t, d, bs[0].Addr(), errUnavailable, DefaultEjectAfter-1)
	waitFor(t, 5*time.Second, "ejection", func() bool { return ejectedOf(d, bs[0].Addr()) })
	// Ten first-probe delays: a prober, had one started, would have
	// probed the live backend and ended the ejection.
	time.Sleep(10 * reconnectProbeFirst)
	if !ejectedOf(d, bs[0].Addr()) {
		t.Error("ejection after answered UNAVAILABLE ended early")
	}
	if n := probes.Load(); n != 0 {
		t.Errorf("%d handshake probes, want 0", n)
	}
}

// TestProbeStopsWhenBackendLeaves: the prober of an ejected backend that
// leaves the set stops (goleak checks the rest), and its probes never
// un-eject anything after.
func TestProbeStopsWhenBackendLeaves(t *testing.T) {
	t.Parallel()
	clk := newFakeClock()
	bs := startBackends(t, 2)
	down := testkit.DeadAddr(t)
	d := newOutlierDirector(t, Config{}, clk, down, bs[0].Addr(), bs[1].Addr())
	var probes atomic.Int64
	d.handshake = func(ctx context.Context, addr string, creds credentials.TransportCredentials) error {
		probes.Add(1)
		return h2Handshake(ctx, addr, creds)
	}
	runDirector(t, d)
	failN(t, d, down, errRefused, DefaultEjectAfter)
	waitFor(t, 5*time.Second, "a probe of the ejected backend", func() bool { return probes.Load() > 0 })
	mustUpdate(t, d, state(bs[0].Addr(), bs[1].Addr()))
	// Once Run has seen the new set, no further probe starts.
	waitFor(t, 5*time.Second, "probes to stop", func() bool {
		n := probes.Load()
		time.Sleep(3 * reconnectProbeMax)
		return probes.Load() == n
	})
}

// TestHealthCheckUnejects: with active health checks, a passing check of
// an ejected backend ends its ejection at once (Envoy's
// successful_active_health_check_uneject_host), whatever caused it.
func TestHealthCheckUnejects(t *testing.T) {
	t.Parallel()
	bs := startBackends(t, 3)
	d := newHealthDirector(t, Config{})
	mustUpdate(t, d, stateOf(bs...))
	runDirector(t, d)
	// Answered UNAVAILABLE: the kind of ejection the reconnect probe
	// leaves alone, but a passing check ends.
	failN(t, d, bs[0].Addr(), errUnavailable, DefaultEjectAfter)
	waitFor(t, 5*time.Second, "ejection", func() bool { return ejectedOf(d, bs[0].Addr()) })
	took := waitFor(t, 5*time.Second, "un-ejection by a passing check", func() bool { return !ejectedOf(d, bs[0].Addr()) })
	t.Logf("un-ejected %v after the ejection (check interval %v, base ejection %v)", took, e2eInterval, DefaultBaseEjection)
}

// TestH2Handshake: the reconnect probe succeeds only on a completed HTTP/2
// handshake, over TLS when the backend speaks it and the credentials
// trust it.
func TestH2Handshake(t *testing.T) {
	t.Parallel()
	ca, other := testkit.NewCA(t, "ca"), testkit.NewCA(t, "other")
	certPEM, keyPEM := ca.Issue(t, "backend", true)
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	tlsBackend, err := testserver.New(testserver.Config{Name: "tls", Logger: discardLogger(),
		ServerOptions: []grpc.ServerOption{grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}}))}})
	if err != nil {
		t.Fatal(err)
	}
	if err := tlsBackend.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tlsBackend.Stop)
	plain := startBackends(t, 1)[0]
	// A server that answers with HTTP/1.1, not HTTP/2.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			nc.Write([]byte("HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n"))
			nc.Close()
		}
	}()
	trusting := credentials.NewTLS(&tls.Config{RootCAs: ca.Pool()})
	foreign := credentials.NewTLS(&tls.Config{RootCAs: other.Pool()})
	tests := []struct {
		name   string
		addr   string
		creds  credentials.TransportCredentials
		wantOK bool
	}{
		{name: "cleartext grpc-go", addr: plain.Addr(), wantOK: true},
		{name: "TLS grpc-go", addr: tlsBackend.Addr(), creds: trusting, wantOK: true},
		{name: "TLS, untrusted certificate", addr: tlsBackend.Addr(), creds: foreign},
		{name: "cleartext to a TLS backend", addr: tlsBackend.Addr()},
		{name: "HTTP/1.1 answer", addr: ln.Addr().String()},
		{name: "refused", addr: testkit.DeadAddr(t)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
			defer cancel()
			err := h2Handshake(ctx, tc.addr, tc.creds)
			if (err == nil) != tc.wantOK {
				t.Errorf("h2Handshake(%s) = %v, want ok %v", tc.addr, err, tc.wantOK)
			}
		})
	}
}
