package proxy_test

import (
	"context"
	"fmt"
	"io"
	"sync"
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

// TestH2llConnAgeChurnUnderLongStreams: the same backend (connections
// aged every 100 ms, grace unbounded) under 30 long streams started over
// a second, each lasting 200-700 ms, beside unary calls, with
// --max-backend-conns 2. No call may fail; once the streams are done the
// connections they kept open close: no more than the cap stay, and the
// backend's count of streams in flight is back to zero.
func TestH2llConnAgeChurnUnderLongStreams(t *testing.T) {
	verifyNoLeaks(t)
	ts := startTestserver(t, testserver.Config{Name: "aged", Logger: quietLog,
		ServerOptions: []grpc.ServerOption{grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionAge: 100 * time.Millisecond})}})
	srv, err := proxy.New(proxy.Config{Picker: pickerTo(ts.Addr()), Logger: quietLog,
		MaxBackendConns: 2, BackendPendingTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ln := serveProxy(t, srv)
	client := testgrpc.NewTestServiceClient(e2eConn(t, ln.Addr().String()))
	ctx := testkit.Context(t, 30*time.Second)
	var wg sync.WaitGroup
	errs := make(chan error, 1000)
	for i := 0; i < 30; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(i) * 33 * time.Millisecond)
			st, err := client.FullDuplexCall(ctx)
			if err != nil {
				errs <- err
				return
			}
			end := time.Now().Add(time.Duration(200+i*17) * time.Millisecond)
			for time.Now().Before(end) {
				if err := st.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 1000}}}); err != nil {
					_, err = st.Recv()
					errs <- fmt.Errorf("long stream %d: %w", i, err)
					return
				}
				if _, err := st.Recv(); err != nil {
					errs <- fmt.Errorf("long stream %d: %w", i, err)
					return
				}
				time.Sleep(10 * time.Millisecond)
			}
			st.CloseSend()
			if _, err := st.Recv(); err != io.EOF {
				errs <- fmt.Errorf("long stream %d at its end: %v", i, err)
			}
		}()
	}
	stop := time.Now().Add(1500 * time.Millisecond)
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; n < 2000 && time.Now().Before(stop); n++ {
				cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				_, err := client.UnaryCall(cctx, &testgrpc.SimpleRequest{})
				cancel()
				if err != nil {
					errs <- fmt.Errorf("unary: %w", err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	testkit.WaitFor(ctx, t, "the aged connections to close", func() bool {
		return srv.BackendConns(ts.Addr()) <= 2 && ts.InFlight() == 0 && srv.ClientStreams() == 0
	})
}

// TestH2llConnAgeGoingAwayBounded: connections going away do not count at
// --max-backend-conns, but are bounded all the same, at 16 times it: a
// backend aging its connections every 40 ms under 24 long streams, one
// opened every 60 ms (each on a connection of its own), with the cap at
// 1, never has more than 16 connections open from the proxy.
func TestH2llConnAgeGoingAwayBounded(t *testing.T) {
	verifyNoLeaks(t)
	ts := startTestserver(t, testserver.Config{Name: "aged", Logger: quietLog,
		ServerOptions: []grpc.ServerOption{grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionAge: 40 * time.Millisecond})}})
	srv, err := proxy.New(proxy.Config{Picker: pickerTo(ts.Addr()), Logger: quietLog,
		MaxBackendConns: 1, BackendPendingTimeout: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ln := serveProxy(t, srv)
	client := testgrpc.NewTestServiceClient(e2eConn(t, ln.Addr().String()))
	ctx := testkit.Context(t, 30*time.Second)
	lctx, stop := context.WithCancel(ctx)
	defer stop()
	most, opened := 0, 0
	for i := 0; i < 24; i++ {
		st, err := client.FullDuplexCall(lctx)
		if err == nil {
			err = st.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 1}}})
		}
		if err == nil {
			_, err = st.Recv()
		}
		if err == nil {
			opened++
		}
		most = max(most, srv.BackendConns(ts.Addr()))
		time.Sleep(60 * time.Millisecond)
	}
	t.Logf("%d long streams opened, at most %d backend connections", opened, most)
	if most > 16 {
		t.Errorf("%d connections to one backend with --max-backend-conns 1, want 16 at most", most)
	}
	if opened < 16 {
		t.Errorf("only %d long streams opened, want 16 at least (one per connection within the bound)", opened)
	}
}
