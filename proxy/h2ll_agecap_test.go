package proxy_test

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/keepalive"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestH2llConnAgeLongStreamsAtCap: a grpc-go backend cycles its
// connections with MaxConnectionAge (as deployments do to rebalance) and
// the default, unbounded, MaxConnectionAgeGrace, so a long stream (a
// watch) keeps the connection its GOAWAY closed to new streams until it
// ends. Each age leaves one such connection behind. Once
// --max-backend-conns of them carry long streams, the backend, healthy and
// taking calls on any new connection, must still take new calls through
// the proxy: a connection that takes no new stream is not one of the
// connections a new call could use.
func TestH2llConnAgeLongStreamsAtCap(t *testing.T) {
	verifyNoLeaks(t)
	const maxConns = 2
	ts := startTestserver(t, testserver.Config{Name: "aged", Logger: quietLog,
		ServerOptions: []grpc.ServerOption{grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionAge: 150 * time.Millisecond})}})
	srv, err := proxy.New(proxy.Config{Picker: pickerTo(ts.Addr()), Logger: quietLog,
		MaxBackendConns: maxConns, BackendPendingTimeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ln := serveProxy(t, srv)
	client := testgrpc.NewTestServiceClient(e2eConn(t, ln.Addr().String()))
	ctx := testkit.Context(t, 30*time.Second)
	lctx, stopLong := context.WithCancel(ctx)
	defer stopLong()
	echo := func(st testgrpc.TestService_FullDuplexCallClient) error {
		if err := st.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 10}}}); err != nil {
			_, err = st.Recv()
			return err
		}
		_, err := st.Recv()
		return err
	}
	var long []testgrpc.TestService_FullDuplexCallClient
	for i := 0; i < maxConns; i++ {
		st, err := client.FullDuplexCall(lctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := echo(st); err != nil {
			t.Fatalf("long stream %d: %v", i, err)
		}
		long = append(long, st)
		// The connection it runs on ages (GOAWAY; the stream runs on).
		time.Sleep(400 * time.Millisecond)
	}
	for i, st := range long {
		if err := echo(st); err != nil {
			t.Fatalf("long stream %d after its connection's GOAWAY: %v", i, err)
		}
	}
	t.Logf("backend connections in the pool: %d", srv.BackendConns(ts.Addr()))
	// New calls: the backend takes them on a new connection.
	failed := 0
	var last error
	for i := 0; i < 10; i++ {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := client.UnaryCall(cctx, &testgrpc.SimpleRequest{})
		cancel()
		if err != nil {
			failed++
			last = err
		}
	}
	if failed > 0 {
		t.Errorf("%d of 10 unary calls failed while %d long streams ran on aged connections, the last: %v", failed, maxConns, last)
	}
	for i, st := range long {
		if err := echo(st); err != nil {
			t.Errorf("long stream %d at the end: %v", i, err)
		}
	}
}
