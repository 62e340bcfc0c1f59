//go:build linux

package main

import (
	"crypto/tls"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// startH2C serves cleartext HTTP/2 with x/net's server on a loopback port
// and counts the connections it accepted.
func startH2C(t *testing.T) (addr string, accepted func() int) {
	t.Helper()
	var n atomic.Int64
	srv := &http2.Server{}
	addr = testkit.ServeTCP(t, func(c net.Conn) {
		n.Add(1)
		srv.ServeConn(c, &http2.ServeConnOpts{Handler: http.NotFoundHandler()})
	})
	return addr, func() int { return int(n.Load()) }
}

func TestRun(t *testing.T) {
	addr, accepted := startH2C(t)
	res, err := run(addr, strconv.Itoa(os.Getpid()), 20, 50*time.Millisecond, 10*time.Second, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	// The server accepted one more: the warm-up connection, closed
	// before the first reading.
	if res.Handshaken != 20 || res.OpenAtEnd != 20 || accepted() != 21 {
		t.Errorf("handshaken %d, open at the end %d, accepted %d; want 20, 20 and 21 (with the warm-up connection)", res.Handshaken, res.OpenAtEnd, accepted())
	}
	if res.RSSBeforeKiB <= 0 || res.RSSAfterKiB <= 0 {
		t.Errorf("RSS before %d KiB, after %d KiB; want both positive", res.RSSBeforeKiB, res.RSSAfterKiB)
	}
}

// TestRunTLS: with -cacert, the connections speak TLS (ALPN h2) to an
// HTTP/2 server terminating it, and make their call over it; a server
// name the certificate does not carry fails the run.
func TestRunTLS(t *testing.T) {
	ca := testkit.NewCA(t, "idleconns-ca")
	certPEM, keyPEM := ca.Issue(t, "localhost", true)
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	var n, calls atomic.Int64
	srv := &http2.Server{}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		if r.TLS == nil || r.URL.Path != "/grpc.testing.TestService/EmptyCall" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/grpc")
		w.Header().Set("Trailer", "Grpc-Status")
		w.WriteHeader(http.StatusOK)
		w.Write(make([]byte, 5))
		w.Header().Set("Grpc-Status", "0")
	})
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{http2.NextProtoTLS}}
	addr := testkit.ServeTCP(t, func(c net.Conn) {
		n.Add(1)
		tc := tls.Server(c, cfg)
		if err := tc.Handshake(); err != nil {
			tc.Close()
			return
		}
		srv.ServeConn(tc, &http2.ServeConnOpts{Handler: h})
	})
	caFile := ca.WriteCA(t, t.TempDir(), "ca")
	ccfg, err := clientTLS(caFile, "localhost")
	if err != nil {
		t.Fatal(err)
	}
	pid := strconv.Itoa(os.Getpid())
	res, err := run(addr, pid, 10, 50*time.Millisecond, 10*time.Second, "/grpc.testing.TestService/EmptyCall", ccfg)
	if err != nil {
		t.Fatal(err)
	}
	if !res.TLS || res.Handshaken != 10 || res.OpenAtEnd != 10 || n.Load() != 11 || calls.Load() != 11 {
		t.Errorf("tls %v, handshaken %d, open at the end %d, accepted %d, calls %d; want true, 10, 10, 11, 11",
			res.TLS, res.Handshaken, res.OpenAtEnd, n.Load(), calls.Load())
	}
	ccfg, err = clientTLS(caFile, "not-the-name")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := run(addr, pid, 2, 0, 5*time.Second, "", ccfg); err == nil || !strings.Contains(err.Error(), "TLS handshake") {
		t.Errorf("a server name the certificate lacks: err %v, want a TLS handshake error", err)
	}
}

// TestRunCall: with -call, every connection makes one gRPC call to a real
// grpc-go server first, whose answer must be OK; a method the server does
// not have fails the run with its status.
func TestRunCall(t *testing.T) {
	ts, err := testserver.New(testserver.Config{Name: "b", Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if err := ts.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ts.Stop)
	pid := strconv.Itoa(os.Getpid())
	res, err := run(ts.Addr(), pid, 10, 0, 10*time.Second, "/grpc.testing.TestService/EmptyCall", nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.Handshaken != 10 || res.OpenAtEnd != 10 || res.Call == "" {
		t.Errorf("handshaken %d, open at the end %d, call %q; want 10, 10, the method", res.Handshaken, res.OpenAtEnd, res.Call)
	}
	// The warm-up connection's call, and one per connection.
	if got := ts.Calls(); got != 11 {
		t.Errorf("the server answered %d calls, want 11", got)
	}
	_, err = run(ts.Addr(), pid, 2, 0, 10*time.Second, "/grpc.testing.TestService/NoSuchMethod", nil)
	if err == nil || !strings.Contains(err.Error(), `grpc-status "12"`) {
		t.Errorf("a call to a missing method: err %v, want grpc-status 12 (UNIMPLEMENTED)", err)
	}
}

// TestRunNotHTTP2 checks that a server that closes instead of speaking
// HTTP/2 fails the run rather than counting as idle connections.
func TestRunNotHTTP2(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	res, err := run(ln.Addr().String(), strconv.Itoa(os.Getpid()), 3, 0, 5*time.Second, "", nil)
	if err == nil {
		t.Fatalf("got no error (%+v), want one", res)
	}
	if res != nil && res.Handshaken != 0 {
		t.Errorf("handshaken %d, want 0", res.Handshaken)
	}
}

func TestRunRejects(t *testing.T) {
	tests := []struct {
		name, target, pids string
		n                  int
		want               string
	}{
		{name: "not loopback", target: "10.1.2.3:80", pids: "1", n: 1, want: "loopback"},
		{name: "no port", target: "127.0.0.1", pids: "1", n: 1, want: "target"},
		{name: "bad pid", target: "127.0.0.1:1", pids: "x", n: 1, want: "-pid"},
		{name: "no connections", target: "127.0.0.1:1", pids: "1", n: 0, want: "-n"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := run(tc.target, tc.pids, tc.n, 0, time.Second, "", nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got error %v, want one containing %q", err, tc.want)
			}
		})
	}
}
