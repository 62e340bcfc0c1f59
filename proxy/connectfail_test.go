package proxy_test

import (
	"context"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// connectFailures records Config.CountConnectFailure's calls.
type connectFailures struct {
	mu  sync.Mutex
	got []connectFailure
}

type connectFailure struct {
	upstream, backend string
	err               error
}

func (c *connectFailures) count(upstream, backend string, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.got = append(c.got, connectFailure{upstream, backend, err})
}

func (c *connectFailures) all() []connectFailure {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]connectFailure(nil), c.got...)
}

// blockingDial is a Dial that never connects: it returns ctx's error
// when ctx ends (ConnectTimeout, or the server closing). dialing is
// signalled once per dial begun.
func blockingDial(dialing chan<- struct{}) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		select {
		case dialing <- struct{}{}:
		default:
		}
		<-ctx.Done()
		return nil, ctx.Err()
	}
}

// TestConnectFailuresCounted: Config.CountConnectFailure is called once
// for every backend connection that could not be opened, with the
// backend's address and why (Envoy's upstream_cx_connect_fail): a port
// that refuses, a dial that outlives ConnectTimeout, a backend that
// accepts TCP and never speaks HTTP/2 (no SETTINGS within
// HandshakeTimeout), one that answers as an HTTP/1.1 server, and one
// that closes at once. Each call makes one attempt (MaxRetries -1), so
// each dials once and is counted once, before its client sees
// UNAVAILABLE.
func TestConnectFailuresCounted(t *testing.T) {
	verifyNoLeaks(t)
	silent := func(nc net.Conn) { io.Copy(io.Discard, nc) } // reads the preface, says nothing
	http1 := func(nc net.Conn) {
		io.ReadFull(nc, make([]byte, len(http2.ClientPreface)))
		io.WriteString(nc, "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
		io.Copy(io.Discard, nc)
	}
	hangUp := func(nc net.Conn) {} // rawBackend closes it on return
	for _, tc := range []struct {
		name    string
		addr    func(t *testing.T) string
		dial    bool   // dial with blockingDial
		wantErr string // in the error counted
	}{
		{name: "refused", addr: func(t *testing.T) string { return testkit.RefusingAddr(t) }, wantErr: "refused"},
		{name: "dial timeout", addr: func(t *testing.T) string { return testkit.RefusingAddr(t) }, dial: true, wantErr: context.DeadlineExceeded.Error()},
		{name: "no SETTINGS", addr: func(t *testing.T) string { return rawBackend(t, silent) }, wantErr: "no HTTP/2 SETTINGS"},
		{name: "HTTP/1.1", addr: func(t *testing.T) string { return rawBackend(t, http1) }, wantErr: "protocol error"},
		{name: "closed at once", addr: func(t *testing.T) string { return rawBackend(t, hangUp) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr := tc.addr(t)
			var cf connectFailures
			e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
				c.CountConnectFailure = cf.count
				c.MaxRetries = -1 // one attempt, one dial per call
				c.HandshakeTimeout = 200 * time.Millisecond
				c.ConnectTimeout = 200 * time.Millisecond
				if tc.dial {
					c.Dial = blockingDial(nil)
				}
			}})
			e.setBackends(addr)
			const calls = 2
			for i := range calls {
				ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
				_, err := e.client.EmptyCall(ctx, &testgrpc.Empty{})
				cancel()
				if status.Code(err) != codes.Unavailable {
					t.Fatalf("call %d: %v, want UNAVAILABLE", i, err)
				}
				// Counted before the calls that waited for the
				// connection fail: no wait needed.
				if got := len(cf.all()); got != i+1 {
					t.Fatalf("after call %d: %d connect failures counted, want %d", i, got, i+1)
				}
			}
			for _, f := range cf.all() {
				if f.backend != addr || f.upstream != "" || f.err == nil {
					t.Errorf("counted (%q, %q, %v), want (\"\", %q, an error)", f.upstream, f.backend, f.err, addr)
				}
				if f.err != nil && !strings.Contains(f.err.Error(), tc.wantErr) {
					t.Errorf("counted error %q, want it to say %q", f.err, tc.wantErr)
				}
			}
		})
	}
}

// TestConnectFailuresNotCounted: a connection that opened (the backend
// sent its SETTINGS) and failed later is not a connect failure, nor is a
// dial the proxy itself gave up (Close while dialing), nor any connection
// to a working backend.
func TestConnectFailuresNotCounted(t *testing.T) {
	verifyNoLeaks(t)
	t.Run("working backend", func(t *testing.T) {
		var cf connectFailures
		e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.CountConnectFailure = cf.count }})
		for i := range 5 {
			if _, err := e.client.EmptyCall(t.Context(), &testgrpc.Empty{}); err != nil {
				t.Fatalf("call %d: %v", i, err)
			}
		}
		if got := cf.all(); len(got) != 0 {
			t.Errorf("connect failures %v, want none", got)
		}
	})
	t.Run("lost after its handshake", func(t *testing.T) {
		// SETTINGS, then the connection closed at the first request.
		lost := func(nc net.Conn) {
			s, err := acceptH2(nc)
			if err != nil || s.hello() != nil {
				return
			}
			for {
				f, err := s.fr.ReadFrame()
				if err != nil {
					return
				}
				switch f := f.(type) {
				case *http2.SettingsFrame:
					if !f.IsAck() {
						s.fr.WriteSettingsAck()
					}
				case *http2.HeadersFrame:
					return
				}
			}
		}
		addr := rawBackend(t, lost)
		var cf connectFailures
		e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
			c.CountConnectFailure = cf.count
			c.MaxRetries = -1
		}})
		e.setBackends(addr)
		for i := range 2 {
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			_, err := e.client.EmptyCall(ctx, &testgrpc.Empty{})
			cancel()
			if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "lost") {
				t.Fatalf("call %d: %v, want UNAVAILABLE, the connection lost", i, err)
			}
		}
		if got := cf.all(); len(got) != 0 {
			t.Errorf("connect failures %v, want none: the connections opened", got)
		}
	})
	t.Run("closed while dialing", func(t *testing.T) {
		var cf connectFailures
		dialing := make(chan struct{}, 1)
		e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
			c.CountConnectFailure = cf.count
			c.ConnectTimeout = time.Minute
			c.Dial = blockingDial(dialing)
		}})
		ctx := testkit.Context(t, 10*time.Second)
		called := make(chan error, 1)
		go func() {
			_, err := e.client.EmptyCall(ctx, &testgrpc.Empty{})
			called <- err
		}()
		select {
		case <-dialing:
		case <-ctx.Done():
			t.Fatal("the proxy did not dial")
		}
		e.srv.Close() // again at cleanup, which does nothing more
		if err := <-called; err == nil {
			t.Error("the call succeeded with no backend connection")
		}
		if got := cf.all(); len(got) != 0 {
			t.Errorf("connect failures %v, want none: the proxy gave the dial up", got)
		}
	})
}
