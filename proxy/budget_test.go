package proxy_test

import (
	"testing"
	"time"

	"golang.org/x/net/http2"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestBudgetCountsCapacity: streams that each send one byte toward a
// backend that holds them count a whole buffer each, plus their request
// headers, in the connection's budget; once it is full new calls are
// refused with RESOURCE_EXHAUSTED on their own stream (the connection
// lives), and once the streams end the budget is empty again and calls
// go through.
func TestBudgetCountsCapacity(t *testing.T) {
	verifyNoLeaks(t)
	const budget = 64 << 10
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		c.MaxConnBufferedBytes = budget
		c.MaxEarlyResets = -1 // the test resets its streams in a burst
		// The streams' backend windows count in the budget too (4 of
		// 16 KiB would fill it); 256 bytes each leaves the request
		// buffers, which this test is about, to fill it first.
		c.BackendStreamWindow = 256
	}})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	r := dialRaw(t, e.addr)
	// A unary call that hangs: no response headers, so the attempt
	// keeps its replay.
	const path = "/grpc.testing.TestService/UnaryCall"
	var id, refused uint32
	var used int64
	for id = 1; id < 2*400 && refused == 0; id += 2 {
		r.writeFields(id, path, testserver.MetadataHang, "1")
		r.fr.WriteData(id, false, []byte{0})
		// A round trip, so the proxy has handled the stream before the
		// next (nothing else paces a raw client).
		r.fr.WritePing(false, [8]byte{byte(id)})
		r.next(func(f http2.Frame) bool {
			if h, ok := f.(*http2.MetaHeadersFrame); ok && h.StreamEnded() && refused == 0 {
				if field(h, "grpc-status") != "8" {
					t.Fatalf("stream %d: got %v, want no answer or grpc-status 8 (RESOURCE_EXHAUSTED)", h.StreamID, f)
				}
				refused = h.StreamID
			}
			p, ok := f.(*http2.PingFrame)
			return ok && p.IsAck()
		})
		used = max(used, srv.MaxBufferedBytes())
		if id == 21 && used < 11*1024 {
			// Each one-byte payload sits in the replay kept for a retry,
			// in a 1 KiB buffer.
			t.Fatalf("11 streams of one byte each count %d bytes, want at least 11 KiB", used)
		}
	}
	opened := (refused - 1) / 2
	t.Logf("%d streams of 1 byte held: %d bytes counted; stream %d refused", opened, used, refused)
	// 1 byte each; by payload the budget would take 64 Ki streams.
	if refused == 0 || used < budget || opened > budget/256 {
		t.Fatalf("%d bytes counted, stream %d refused, want past %d within %d streams", used, refused, budget, budget/256)
	}
	// Every stream opened, the refused one included: a stream after it
	// may have been taken once the replays let go of their half.
	for s := uint32(1); s < id; s += 2 {
		r.fr.WriteRSTStream(s, http2.ErrCodeCancel)
	}
	testkit.WaitFor(ctx, t, "the budget to empty", func() bool { return srv.MaxBufferedBytes() == 0 })
	next := id + 2
	r.writeFields(next, "/grpc.testing.TestService/EmptyCall")
	r.fr.WriteData(next, true, grpcMsg(&testgrpc.Empty{}))
	f := r.next(func(f http2.Frame) bool {
		h, ok := f.(*http2.MetaHeadersFrame)
		return ok && h.StreamID == next && h.StreamEnded()
	})
	if h := f.(*http2.MetaHeadersFrame); field(h, "grpc-status") != "0" {
		t.Errorf("call after the streams ended: grpc-status %q, want 0", field(h, "grpc-status"))
	}
}

// TestBudgetSmallerThanRequest: a request many times the connection's
// budget goes through: the window is withheld and given back as the
// backend takes the bytes, and the replay, which cannot fit, is dropped
// rather than failing the call.
func TestBudgetSmallerThanRequest(t *testing.T) {
	verifyNoLeaks(t)
	const budget = 32 << 10
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		c.MaxConnBufferedBytes = budget
		c.RetryOn = []string{"/grpc.testing.TestService/"}
	}})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	for range 3 {
		resp, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: 1 << 20, Payload: &testgrpc.Payload{Body: make([]byte, 1<<20)}})
		if err != nil {
			t.Fatalf("1 MiB request and response under a %d-byte budget: %v", budget, err)
		}
		if n := len(resp.GetPayload().GetBody()); n != 1<<20 {
			t.Fatalf("response of %d bytes, want 1 MiB", n)
		}
	}
	testkit.WaitFor(ctx, t, "the budget to empty", func() bool { return srv.MaxBufferedBytes() == 0 })
}

// TestResponseBuffersPerStream: a client that asks for large answers and
// never reads them makes the proxy hold at most BackendStreamWindow per
// stream (plus a buffer), not StreamWindow: a window granted to a backend
// cannot be taken back, so it is what bounds the response direction.
func TestResponseBuffersPerStream(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	r := dialRawWide(t, e.addr)
	params := make([]*testgrpc.ResponseParameters, 64)
	for i := range params {
		params[i] = &testgrpc.ResponseParameters{Size: 128 << 10}
	}
	const streams = 8
	for i := range streams {
		id := uint32(2*i + 1)
		r.headers(id, "/grpc.testing.TestService/StreamingOutputCall", false)
		r.fr.WriteData(id, true, grpcMsg(&testgrpc.StreamingOutputCallRequest{ResponseParameters: params}))
	}
	// The kernel takes what it can first; then the proxy's queues fill.
	const bound = streams * (proxy.DefaultBackendStreamWindow + 16<<10 + 1<<10)
	testkit.WaitFor(ctx, t, "the response queues to fill", func() bool { return srv.MaxBufferedBytes() >= streams*(proxy.DefaultBackendStreamWindow/2) })
	peak := int64(0)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for range 100 {
		<-tick.C
		peak = max(peak, srv.MaxBufferedBytes())
	}
	t.Logf("response buffers of %d unread streams: peak %d bytes (bound %d; with StreamWindow per stream up to %d)", streams, peak, bound, streams*proxy.DefaultStreamWindow)
	if peak > bound {
		t.Errorf("peak %d bytes buffered, over %d", peak, bound)
	}
}
