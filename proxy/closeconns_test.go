package proxy_test

import (
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// slowCloseConn is a client connection whose first Close blocks until
// release is closed, as a TLS connection's does while its close_notify
// waits on a client that does not read (up to 5 s in crypto/tls).
type slowCloseConn struct {
	net.Conn
	once    sync.Once
	started *atomic.Int32
	release chan struct{}
}

func (c *slowCloseConn) Close() error {
	first := false
	c.once.Do(func() { first = true })
	if first {
		c.started.Add(1)
		<-c.release
	}
	return c.Conn.Close()
}

type slowCloseListener struct {
	net.Listener
	started *atomic.Int32
	release chan struct{}
}

func (l *slowCloseListener) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &slowCloseConn{Conn: nc, started: l.started, release: l.release}, nil
}

// TestCloseClosesConnsTogether: Server.Close closes its client
// connections at the same time, not one after the other while holding
// the server's lock: with three connections whose Close blocks, all
// three Closes must have started before any returns. Before, only the
// first had, and each such connection added its wait to Close's.
func TestCloseClosesConnsTogether(t *testing.T) {
	verifyNoLeaks(t)
	ts := startTestserver(t, testserver.Config{Name: "b", Logger: quietLog})
	srv, err := proxy.New(proxy.Config{Picker: pickerTo(ts.Addr()), Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var started atomic.Int32
	release := make(chan struct{})
	ln := &slowCloseListener{Listener: inner, started: &started, release: release}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	ctx := testkit.Context(t, 20*time.Second)
	const n = 3
	for range n {
		cc, err := grpc.NewClient(inner.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cc.Close() })
		if _, err := testgrpc.NewTestServiceClient(cc).EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
			t.Fatal(err)
		}
	}
	closed := make(chan struct{})
	go func() {
		srv.Close()
		close(closed)
	}()
	testkit.WaitFor(ctx, t, "every connection's Close started", func() bool { return started.Load() == n })
	close(release)
	<-closed
	if err := <-served; err != proxy.ErrServerClosed {
		t.Errorf("Serve = %v, want ErrServerClosed", err)
	}
}
