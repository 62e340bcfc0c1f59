package proxy_test

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/resolver"
	"github.com/streamlb/streamlb/testserver"
)

// TestReferenceLeftSetIsUnavailable: in the grpc-proxy engine, a call
// still running on a backend that left the set DrainTimeout ago is cut
// with UNAVAILABLE naming the drain, as the frame engine cuts it. It ended
// CANCELED ("grpc: the client connection is closing", from the backend
// connection the engine closed), which says the client gave up: clients
// do not retry it and metrics count it as the client's doing. A call the
// client cancels itself still ends CANCELED.
func TestReferenceLeftSetIsUnavailable(t *testing.T) {
	verifyNoLeaks(t)
	ts, srv, ln := startReference(t, proxy.ReferenceConfig{DrainTimeout: 200 * time.Millisecond})
	serveOn(t, srv, ln)
	e := &env{t: t}
	client := testgrpc.NewTestServiceClient(e.dial(ln.Addr().String()))
	ctx := testkit.Context(t, 8*time.Second)
	hang := metadata.AppendToOutgoingContext(ctx, testserver.MetadataHang, "1")

	// The client's own cancel stays CANCELED.
	cctx, cancel := context.WithCancel(hang)
	ended := make(chan error, 1)
	go func() { _, err := client.EmptyCall(cctx, &testgrpc.Empty{}); ended <- err }()
	testkit.WaitFor(ctx, t, "the call at the backend", func() bool { return ts.InFlight() > 0 })
	cancel()
	if err := <-ended; status.Code(err) != codes.Canceled {
		t.Errorf("a call the client cancelled: %v, want CANCELED", err)
	}
	testkit.WaitFor(ctx, t, "the backend to see the cancel", func() bool { return ts.InFlight() == 0 })

	go func() { _, err := client.EmptyCall(hang, &testgrpc.Empty{}); ended <- err }()
	testkit.WaitFor(ctx, t, "the call at the backend", func() bool { return ts.InFlight() > 0 })
	srv.RetainBackends(nil) // the backend left the set
	err := <-ended
	if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "left the set") {
		t.Errorf("a call on a backend that left the set, after the drain timeout: %v, want UNAVAILABLE naming the drain", err)
	}
}

// TestReferenceShutdownStatus: the grpc-proxy engine's Shutdown, once its
// context ends, cuts the calls still running with UNAVAILABLE "server is
// shutting down", sent as their status, as the frame engine does. It
// stopped the server hard, and the clients saw only their connection
// breaking ("error reading from server: EOF").
func TestReferenceShutdownStatus(t *testing.T) {
	verifyNoLeaks(t)
	ts, srv, ln := startReference(t, proxy.ReferenceConfig{})
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	e := &env{t: t}
	client := testgrpc.NewTestServiceClient(e.dial(ln.Addr().String()))
	ctx := testkit.Context(t, 8*time.Second)
	hang := metadata.AppendToOutgoingContext(ctx, testserver.MetadataHang, "1")
	ended := make(chan error, 1)
	go func() { _, err := client.EmptyCall(hang, &testgrpc.Empty{}); ended <- err }()
	testkit.WaitFor(ctx, t, "the call at the backend", func() bool { return ts.InFlight() > 0 })
	sctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if err := srv.Shutdown(sctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Shutdown: %v, want its context's error", err)
	}
	if err := <-served; !errors.Is(err, proxy.ErrServerClosed) {
		t.Errorf("Serve returned %v, want ErrServerClosed", err)
	}
	err := <-ended
	if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "shutting down") {
		t.Errorf("a call cut by the shutdown: %v, want UNAVAILABLE \"server is shutting down\"", err)
	}
}

// startReference starts a testserver backend and, in front of it, the
// grpc-proxy engine built from cfg with a director over the backend, and
// a listener for it to serve; the caller serves it.
func startReference(t *testing.T, cfg proxy.ReferenceConfig) (*testserver.Server, *proxy.Reference, net.Listener) {
	t.Helper()
	ts := startTestserver(t, testserver.Config{Name: "b", Logger: quietLog})
	d, err := director.New(director.Config{Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.UpdateState(resolver.State{Addresses: []resolver.Address{{Addr: ts.Addr()}}}); err != nil {
		t.Fatal(err)
	}
	cfg.Picker, cfg.Logger = d, quietLog
	srv, err := proxy.NewReference(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ts, srv, ln
}
