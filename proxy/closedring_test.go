package proxy_test

import (
	"context"
	"net"
	"testing"
	"time"

	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestClosedConnReleasesReadyStreams: a client that asks for more than
// its socket takes and then resets the connection leaves its writer
// blocked with streams in the ready ring; the writer, finding the
// connection closed, must let go of the ring's references too, as the
// abandon path does, so that every stream of the connection is
// released (counted in the streamdebug build; before, the ring's
// references kept them from reuse) and the proxy serves on.
func TestClosedConnReleasesReadyStreams(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 2})
	ps := e.srv.(*proxy.Server)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	live0, _ := proxy.LiveStreams()

	// 16 answers of 1 MiB to a client that grants wide windows and never
	// reads: more than loopback's socket buffers hold, so the writer
	// blocks with the other streams' queues in the ring.
	r := dialRawWide(t, e.addr)
	for i := range 16 {
		id := uint32(1 + 2*i)
		r.headers(id, unaryPath, false)
		r.fr.WriteData(id, true, grpcMsg(&testgrpc.SimpleRequest{ResponseSize: 1 << 20}))
	}
	testkit.WaitFor(ctx, t, "queues waiting in the ready ring", func() bool { return ps.MaxReadyQueues() > 0 })
	// A reset, not a FIN: the blocked write fails at once.
	r.nc.(*net.TCPConn).SetLinger(0)
	r.nc.Close()

	testkit.WaitFor(ctx, t, "the client connection gone", func() bool { return ps.ClientConns() == 0 })
	waitStreamsReleased(ctx, t, live0)
	if _, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: 1 << 10}); err != nil {
		t.Fatalf("a call after the reset connection: %v", err)
	}
}
