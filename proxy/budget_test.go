package proxy_test

import (
	"runtime"
	"strings"
	"sync/atomic"
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
	// Per stream: its window of DATA in buffers counted by capacity (up
	// to one more buffer), its request headers and its response headers;
	// and once, what the writer has gathered for its next write, up to
	// 256 KiB (vecFlushAt): those bytes are credited back to the backends
	// once gathered, but their buffers count until the write completes,
	// which for a client that does not read may be never. Under load a
	// sample caught 48 KiB of them (314,960 bytes, 20 runs with -race and
	// two busy loops); most peaks are 266-272 KiB.
	const bound = streams*(proxy.DefaultBackendStreamWindow+16<<10+2<<10) + 256<<10
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

// TestBudgetCountsResponseHeaders: the header blocks of the backends'
// answers queued toward a client that does not read count in its
// connection's budget. A backend answering every call with 900 KB of
// headers (within MaxResponseHeaderListSize) made the proxy queue all of
// them for such a client: 100 calls, about 90 MB. Now, past the budget,
// the calls end RESOURCE_EXHAUSTED and the answers' headers are not
// queued; what the client finally reads is the kernel's socket buffers'
// worth of big answers and a status for the rest.
func TestBudgetCountsResponseHeaders(t *testing.T) {
	verifyNoLeaks(t)
	const budget = 1 << 20
	var overBudget atomic.Int32 // calls ended at the limit, as OnCallEnd sees them
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		c.MaxConnBufferedBytes = budget
		c.BackendStreamWindow = 256 // the streams' windows leave room for the headers
		c.OnCallEnd = func(ci proxy.CallInfo) {
			if ci.Limit == proxy.LimitMaxConnBuffer {
				overBudget.Add(1)
			}
		}
	}})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 120*time.Second)
	big := hpackBlock(":status", "200", "content-type", "application/grpc", "x-big", strings.Repeat("b", 900<<10))
	trailers := hpackBlock("grpc-status", "0")
	const calls = 60 // 54 MB of header strings: 13 s under -race with 100 on a loaded machine, and once over the minute
	var answered atomic.Int32
	var processed atomic.Bool // the proxy read every answer: it acknowledged the PING after them
	done := [8]byte{'d', 'o', 'n', 'e'}
	bad := rawBackend(t, h2Frames(func(s *h2Server, f http2.Frame) bool {
		if p, ok := f.(*http2.PingFrame); ok && p.IsAck() && p.Data == done {
			processed.Store(true)
		}
		h, ok := f.(*http2.HeadersFrame)
		if !ok {
			return true
		}
		if writeHeaderBlock(s.fr, h.StreamID, big) != nil {
			return false
		}
		ok = s.fr.WriteData(h.StreamID, false, grpcMsg(&testgrpc.Empty{})) == nil &&
			s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: h.StreamID, BlockFragment: trailers, EndHeaders: true, EndStream: true}) == nil
		if answered.Add(1) == calls && ok {
			ok = s.fr.WritePing(false, done) == nil
		}
		return ok
	}))
	e.setBackends(bad)
	r := dialRaw(t, e.addr)
	for i := range calls {
		id := uint32(2*i + 1)
		r.headers(id, "/grpc.testing.TestService/EmptyCall", false)
		r.fr.WriteData(id, true, grpcMsg(&testgrpc.Empty{}))
	}
	// Not reading: the proxy takes the answers the backend sends and
	// holds what the socket does not take.
	testkit.WaitFor(ctx, t, "the proxy to read every answer", processed.Load)
	if used := srv.MaxBufferedBytes(); used > budget {
		t.Errorf("the connection's budget counts %d bytes, over its %d", used, budget)
	}
	// And the refused blocks are not kept either: the attempts held
	// their decoded strings until their calls ended (90 MB here).
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	t.Logf("heap with the client not reading: %d MiB", ms.HeapAlloc>>20)
	if ms.HeapAlloc > 40<<20 {
		t.Errorf("%d MiB of heap live with %d answers of 900 KB refused", ms.HeapAlloc>>20, calls)
	}
	var bigOnes, exhausted, ended int
	for ended < calls {
		f := r.next(func(f http2.Frame) bool { _, ok := f.(*http2.MetaHeadersFrame); return ok })
		h := f.(*http2.MetaHeadersFrame)
		if field(h, "x-big") != "" {
			bigOnes++
		}
		if h.StreamEnded() {
			ended++
			if field(h, "grpc-status") == "8" {
				exhausted++
			}
		}
	}
	t.Logf("%d calls: %d answers with 900 KB of headers relayed, %d ended RESOURCE_EXHAUSTED", calls, bigOnes, exhausted)
	// The kernel's buffers of a loopback connection take a few MB; the
	// budget 1 MiB more. Without the bound every answer was queued.
	if bigOnes > 40 || exhausted == 0 {
		t.Errorf("%d of %d answers' 900 KB headers were queued for a client that did not read, %d calls refused; want the budget to stop them", bigOnes, calls, exhausted)
	}
	testkit.WaitFor(ctx, t, "the budget to empty", func() bool { return srv.MaxBufferedBytes() == 0 })
	// Each refused call is reported with the limit that refused it
	// (streamlb_limit_rejections_total{limit="max_conn_buffer"}).
	testkit.WaitFor(ctx, t, "the refused calls to be reported", func() bool { return overBudget.Load() >= int32(exhausted) })
}

// writeHeaderBlock writes block as the response headers of stream id, in
// a HEADERS frame and CONTINUATION frames of 16 KiB, the proxy's
// SETTINGS_MAX_FRAME_SIZE, without END_STREAM.
func writeHeaderBlock(fr *http2.Framer, id uint32, block []byte) error {
	const frame = 16 << 10
	first := min(frame, len(block))
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block[:first], EndHeaders: first == len(block)}); err != nil {
		return err
	}
	for b := block[first:]; len(b) > 0; {
		n := min(frame, len(b))
		if err := fr.WriteContinuation(id, n == len(b), b[:n]); err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}
