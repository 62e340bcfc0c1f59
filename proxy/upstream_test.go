package proxy_test

import (
	"context"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// upstreamPicker is a hand-written proxy.UpstreamPicker: pick says which
// backend and Upstream each attempt gets.
type upstreamPicker struct {
	pick func(tried []string) (string, *proxy.Upstream)
}

func (p *upstreamPicker) Pick(context.Context, string) (string, func(error), error) {
	panic("the Server must call PickUpstream")
}

func (p *upstreamPicker) PickUpstream(_ context.Context, _ string, _ *proxy.Upstream, tried []string) (proxy.UpstreamPick, error) {
	addr, up := p.pick(tried)
	return proxy.UpstreamPick{Addr: addr, Upstream: up}, nil
}

var _ proxy.UpstreamPicker = (*upstreamPicker)(nil)

// countingUpstream returns an Upstream named name whose Dial counts its
// dials in n.
func countingUpstream(t *testing.T, name string, n *atomic.Int64, retryOn ...string) *proxy.Upstream {
	t.Helper()
	var d net.Dialer
	up, err := proxy.NewUpstream(proxy.UpstreamConfig{
		Name:    name,
		RetryOn: retryOn,
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			n.Add(1)
			return d.DialContext(ctx, network, addr)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	return up
}

// TestUpstreamConnections checks that connections are pooled per Upstream:
// the same backend picked with two Upstreams is dialed by each one's Dial,
// and DrainUpstream closes the first one's connection once the stream it
// carries is done, without failing it; a call still picked with a drained
// Upstream is served and its connection closed after it.
func TestUpstreamConnections(t *testing.T) {
	verifyNoLeaks(t)
	var dialsA, dialsB atomic.Int64
	upA := countingUpstream(t, "a", &dialsA)
	upB := countingUpstream(t, "b", &dialsB)
	var cur atomic.Pointer[proxy.Upstream]
	cur.Store(upA)
	var backend string
	p := &upstreamPicker{pick: func([]string) (string, *proxy.Upstream) { return backend, cur.Load() }}
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.Picker = p }})
	backend = e.backends[0].Addr()
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	conns := func() map[string]int { return srv.Stats().BackendConnsByUpstream }

	for range 3 {
		if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
			t.Fatal(err)
		}
	}
	stream, err := e.client.FullDuplexCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ping := func() {
		t.Helper()
		if err := stream.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 1}}}); err != nil {
			t.Fatal(err)
		}
		if _, err := stream.Recv(); err != nil {
			t.Fatal(err)
		}
	}
	ping()
	if got := dialsA.Load(); got != 1 {
		t.Errorf("Upstream a dialed %d times, want 1 (one connection for all its calls)", got)
	}

	cur.Store(upB)
	srv.DrainUpstream(upA)
	if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatal(err)
	}
	if got := dialsB.Load(); got != 1 {
		t.Errorf("Upstream b dialed %d times, want 1: a call picked with it must not use a's connection", got)
	}
	if got := conns(); got["a"] != 1 || got["b"] != 1 {
		t.Errorf("connections by Upstream = %v, want a:1 (draining, its stream open) b:1", got)
	}
	ping() // the drained connection still carries its stream
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != io.EOF {
		t.Fatalf("stream on the drained Upstream ended with %v, want io.EOF", err)
	}
	testkit.WaitFor(ctx, t, "a's connection to close", func() bool { return conns()["a"] == 0 })

	// A call picked with a's Upstream after the drain, as one picked just
	// before a route table swap would be: served, then its connection closes.
	cur.Store(upA)
	if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatalf("call picked with the drained Upstream: %v", err)
	}
	cur.Store(upB)
	testkit.WaitFor(ctx, t, "the late connection of a to close", func() bool { return conns()["a"] == 0 })
	if got := dialsA.Load(); got != 2 {
		t.Errorf("Upstream a dialed %d times, want 2", got)
	}
	if got := conns()["b"]; got != 1 {
		t.Errorf("b's connections = %d, want 1 (untouched)", got)
	}
}

// TestUpstreamRetryPolicy checks that a call's retry policy is its first
// pick's Upstream's, not the Server's Config: the same UNAVAILABLE answer is
// retried on another backend under an Upstream whose RetryOn names the
// method, and reaches the client under one that does not.
func TestUpstreamRetryPolicy(t *testing.T) {
	verifyNoLeaks(t)
	var dials atomic.Int64
	retrying := countingUpstream(t, "retrying", &dials, "grpc.testing.TestService/EmptyCall")
	plain := countingUpstream(t, "plain", &dials)
	var cur atomic.Pointer[proxy.Upstream]
	var addrs []string
	p := &upstreamPicker{pick: func(tried []string) (string, *proxy.Upstream) {
		return addrs[len(tried)%2], cur.Load() // the failing backend first
	}}
	e := newEnv(t, envOpts{
		backends: 2,
		tscfg: func(i int, c *testserver.Config) {
			if i == 0 {
				c.ErrorRate, c.ErrorCode = 1, codes.Unavailable
			}
		},
		pcfg: func(c *proxy.Config) { c.Picker = p }, // and no RetryOn of its own
	})
	addrs = []string{e.backends[0].Addr(), e.backends[1].Addr()}
	ctx := testkit.Context(t, 30*time.Second)
	for _, tc := range []struct {
		name string
		up   *proxy.Upstream
		want codes.Code
	}{
		{"RetryOn names the method", retrying, codes.OK},
		{"RetryOn empty", plain, codes.Unavailable},
		{"nil: the Server's own, no RetryOn", nil, codes.Unavailable},
	} {
		cur.Store(tc.up)
		before := e.backends[1].Calls()
		_, err := e.client.EmptyCall(ctx, &testgrpc.Empty{})
		if got := status.Code(err); got != tc.want {
			t.Errorf("%s: EmptyCall = %v, want %v", tc.name, err, tc.want)
		}
		if retried := e.backends[1].Calls() - before; (retried == 1) != (tc.want == codes.OK) {
			t.Errorf("%s: the second backend got %d calls", tc.name, retried)
		}
	}
}

// TestDrainedUpstreamKeepsReservedSlot: a connection dialed for an
// Upstream already drained (a call picked just before a route table swap)
// drains from birth, but waits for the call that reserved its slot to
// queue its attempt instead of closing under it once its handshake is
// done, which made the call retry and dial again.
func TestDrainedUpstreamKeepsReservedSlot(t *testing.T) {
	verifyNoLeaks(t)
	var dials atomic.Int64
	up := countingUpstream(t, "late", &dials)
	var backend string
	p := &upstreamPicker{pick: func([]string) (string, *proxy.Upstream) { return backend, up }}
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.Picker = p }})
	backend = e.backends[0].Addr()
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	srv.DrainUpstream(up)
	var held atomic.Bool
	proxy.SetAfterReserve(srv, func(string) {
		if !held.Swap(true) {
			// The slot is reserved and the connection dialing: give its
			// handshake, and its writer's look for work, time to happen
			// before the attempt is queued.
			time.Sleep(300 * time.Millisecond)
		}
	})
	if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatalf("call picked with the drained Upstream: %v", err)
	}
	if !held.Load() {
		t.Fatal("the call reserved no slot")
	}
	if got := dials.Load(); got != 1 {
		t.Errorf("Upstream dialed %d times for one call, want 1", got)
	}
	testkit.WaitFor(ctx, t, "the drained Upstream's connection to close", func() bool {
		return srv.Stats().BackendConnsByUpstream["late"] == 0
	})
}

// TestDrainedUpstreamOutlivesDrainTimeout: the calls on a retired
// Upstream's connection (a cluster a reload replaced or removed) run past
// Config.DrainTimeout, and RetainBackends, given a set without their
// backend, does not bound them; RetainUpstreamBackends for that Upstream
// does, since its backend then left the set, and the call it cuts is told
// why. The connection closes after its last call.
func TestDrainedUpstreamOutlivesDrainTimeout(t *testing.T) {
	verifyNoLeaks(t)
	var dials atomic.Int64
	up := countingUpstream(t, "old", &dials)
	var backend string
	p := &upstreamPicker{pick: func([]string) (string, *proxy.Upstream) { return backend, up }}
	const drain = 100 * time.Millisecond
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.Picker = p; c.DrainTimeout = drain }})
	backend = e.backends[0].Addr()
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	conns := func() int { return srv.Stats().BackendConnsByUpstream["old"] }

	open := func() testgrpc.TestService_FullDuplexCallClient {
		t.Helper()
		s, err := e.client.FullDuplexCall(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	ping := func(s testgrpc.TestService_FullDuplexCallClient) error {
		if err := s.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 1}}}); err != nil {
			_, err = s.Recv()
			return err
		}
		_, err := s.Recv()
		return err
	}
	ends, cut := open(), open()
	for _, s := range []testgrpc.TestService_FullDuplexCallClient{ends, cut} {
		if err := ping(s); err != nil {
			t.Fatal(err)
		}
	}
	if got := dials.Load(); got != 1 {
		t.Fatalf("dials = %d, want 1", got)
	}
	srv.DrainUpstream(up)
	srv.RetainBackends(nil) // what a reload that removed the cluster hands the union

	// Three drain timeouts pass: this is what the calls must outlive.
	outlive := time.NewTimer(3 * drain)
	select {
	case <-outlive.C:
	case <-ctx.Done():
		t.Fatal(ctx.Err())
	}
	for i, s := range []testgrpc.TestService_FullDuplexCallClient{ends, cut} {
		if err := ping(s); err != nil {
			t.Fatalf("stream %d on the retired Upstream after 3 drain timeouts: %v, want it alive", i, err)
		}
	}
	if err := ends.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := ends.Recv(); err != io.EOF {
		t.Fatalf("stream on the retired Upstream ended with %v, want io.EOF", err)
	}
	if got := conns(); got != 1 {
		t.Fatalf("the retired Upstream's connections = %d, want 1 (it carries a stream)", got)
	}

	// Its backend leaves the Upstream's set: now the drain timeout bounds it.
	srv.RetainUpstreamBackends(up, nil)
	var err error
	for err == nil {
		err = ping(cut)
	}
	st := status.Convert(err)
	if st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "left the set") ||
		!strings.Contains(st.Message(), "drain timeout 100ms") {
		t.Errorf("stream cut by the drain timeout: %v, want UNAVAILABLE saying the backend left the set and naming the timeout", err)
	}
	testkit.WaitFor(ctx, t, "the retired Upstream's connection to close", func() bool { return conns() == 0 })
}
