package proxy_test

import (
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestBudgetCountsHeldResponseHeaders: with RetryOn, response headers are
// held back until the first message tells whether the answer is an
// UNAVAILABLE to retry. They count in the client connection's buffer
// budget from then on, as queued ones do: a backend that answers every
// call with 900 KB of headers and then nothing makes the proxy hold
// about the budget's worth, and the calls past it fail
// RESOURCE_EXHAUSTED, as without RetryOn. Uncounted, 40 such calls held
// 37 MB against a 4 MiB budget. The count follows the headers: into the
// stream's response count when they are relayed, released when the
// attempt is retried or the call reset, and the budget is empty once the
// calls are over.
func TestBudgetCountsHeldResponseHeaders(t *testing.T) {
	verifyNoLeaks(t)
	// The requests have started: the headers are held for up to
	// heldHeadersMax, a second, which -race can take to get here.
	proxy.SetHeldHeadersMax(t, time.Minute)
	const budget = 4 << 20
	var overBudget atomic.Int32
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		c.MaxConnBufferedBytes = budget
		c.RetryOn = []string{"/grpc.testing.TestService/"}
		c.OnCallEnd = func(ci proxy.CallInfo) {
			if ci.Limit == proxy.LimitMaxConnBuffer {
				overBudget.Add(1)
			}
		}
	}})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 60*time.Second)
	big := hpackBlock(":status", "200", "content-type", "application/grpc", "x-big", strings.Repeat("b", 900<<10))
	const calls = 40
	var (
		held      atomic.Int32 // backend streams answered and not reset by the proxy once it read every answer
		processed atomic.Bool
		answered  atomic.Int32        // request HEADERS the backend answered
		open      = map[uint32]bool{} // the backend's streams, in its serve goroutine
	)
	done := [8]byte{'d', 'o', 'n', 'e'}
	bad := rawBackend(t, h2Frames(func(s *h2Server, f http2.Frame) bool {
		switch f := f.(type) {
		case *http2.PingFrame:
			if f.IsAck() && f.Data == done {
				// The proxy read every answer before this, and wrote
				// the resets of the streams it refused before its ack.
				held.Store(int32(len(open)))
				processed.Store(true)
			}
		case *http2.RSTStreamFrame:
			delete(open, f.StreamID)
		case *http2.HeadersFrame:
			// Then nothing until the request ends.
			if writeHeaderBlock(s.fr, f.StreamID, big) != nil {
				return false
			}
			open[f.StreamID] = true
			if answered.Add(1) == calls {
				return s.fr.WritePing(false, done) == nil
			}
		case *http2.DataFrame:
			if !f.StreamEnded() {
				return true
			}
			delete(open, f.StreamID)
			// The request's last byte says how to answer it.
			if d := f.Data(); len(d) > 0 && d[len(d)-1] == 'u' {
				return s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: f.StreamID, BlockFragment: hpackBlock("grpc-status", "14"), EndHeaders: true, EndStream: true}) == nil
			}
			return s.fr.WriteData(f.StreamID, false, grpcMsg(&testgrpc.Empty{})) == nil &&
				s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: f.StreamID, BlockFragment: hpackBlock("grpc-status", "0"), EndHeaders: true, EndStream: true}) == nil
		}
		return true
	}))
	e.setBackends(bad)
	r := dialRaw(t, e.addr)
	before := heapInUse()
	for i := range calls {
		id := uint32(2*i + 1)
		r.headers(id, "/grpc.testing.TestService/UnaryCall", false)
		r.fr.WriteData(id, false, grpcMsg(&testgrpc.Empty{}))
	}
	testkit.WaitFor(ctx, t, "the proxy to read every answer", processed.Load)
	used := srv.MaxBufferedBytes()
	grew := int64(heapInUse()) - int64(before)
	t.Logf("%d calls answered with 900 KB of headers: %d held back, budget counts %d KiB, heap %+d KiB", calls, held.Load(), used>>10, grew>>10)
	if used > budget {
		t.Errorf("the connection's budget counts %d bytes, over its %d", used, budget)
	}
	if grew > 16<<20 {
		t.Errorf("heap grew %d MiB with a %d MiB budget; want the held headers bounded by it", grew>>20, budget>>20)
	}
	h := int(held.Load())
	if h == 0 || h > budget/(900<<10) {
		t.Fatalf("%d calls' headers held back, want 1 to %d (the budget's worth)", h, budget/(900<<10))
	}

	// The calls the budget refused end RESOURCE_EXHAUSTED.
	ended := map[uint32]bool{}
	for len(ended) < calls-h {
		f := r.next(func(f http2.Frame) bool { _, ok := f.(*http2.MetaHeadersFrame); return ok })
		mh := f.(*http2.MetaHeadersFrame)
		if !mh.StreamEnded() {
			t.Fatalf("stream %d: response headers relayed while held back (x-big %d bytes)", mh.StreamID, len(field(mh, "x-big")))
		}
		if got := field(mh, "grpc-status"); got != "8" {
			t.Errorf("stream %d: grpc-status %q, want 8 (RESOURCE_EXHAUSTED)", mh.StreamID, got)
		}
		ended[mh.StreamID] = true
	}
	testkit.WaitFor(ctx, t, "the refused calls to be reported", func() bool { return overBudget.Load() >= int32(calls-h) })

	// The held ones: the first answered UNAVAILABLE (retried: its held
	// headers dropped, held again on each attempt, and at the last
	// relayed with the UNAVAILABLE), the second reset by the client, the
	// others answered (the held headers relayed, then the message).
	var heldIDs []uint32
	for i := range calls {
		if id := uint32(2*i + 1); !ended[id] {
			heldIDs = append(heldIDs, id)
		}
	}
	want := map[uint32]string{}
	for i, id := range heldIDs {
		switch i {
		case 0:
			r.fr.WriteData(id, true, []byte{0, 0, 0, 0, 1, 'u'})
			want[id] = "14"
		case 1:
			r.fr.WriteRSTStream(id, http2.ErrCodeCancel)
		default:
			r.fr.WriteData(id, true, []byte{0, 0, 0, 0, 1, 'o'})
			want[id] = "0"
		}
	}
	bigOnes := map[uint32]bool{}
	for len(want) > 0 {
		f := r.next(func(f http2.Frame) bool { _, ok := f.(*http2.MetaHeadersFrame); return ok })
		mh := f.(*http2.MetaHeadersFrame)
		if field(mh, "x-big") != "" {
			bigOnes[mh.StreamID] = true
		}
		if !mh.StreamEnded() {
			continue
		}
		w, ok := want[mh.StreamID]
		if !ok {
			t.Fatalf("stream %d ended again, or was not expected to end", mh.StreamID)
		}
		delete(want, mh.StreamID)
		if got := field(mh, "grpc-status"); got != w {
			t.Errorf("stream %d: grpc-status %q, want %s", mh.StreamID, got, w)
		}
		if !bigOnes[mh.StreamID] {
			t.Errorf("stream %d ended without its backend's held-back headers", mh.StreamID)
		}
	}
	// Every count was released: none leaked, none released twice (the
	// counter would go negative).
	testkit.WaitFor(ctx, t, "the budget to empty", func() bool { return srv.MaxBufferedBytes() == 0 })
	if n := answered.Load() - calls; n == 0 {
		t.Error("the call answered UNAVAILABLE was not retried")
	} else {
		t.Logf("%d retries of the call answered UNAVAILABLE", n)
	}
}
