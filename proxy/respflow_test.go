package proxy_test

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// The response direction's flow control (transport.growLocked): a backend
// stream starts with BackendStreamWindow and its window grows only while
// the client drains what it is sent.

// bigStream asks for msgs messages of size bytes each.
func bigStream(msgs, size int) *testgrpc.StreamingOutputCallRequest {
	params := make([]*testgrpc.ResponseParameters, msgs)
	for i := range params {
		params[i] = &testgrpc.ResponseParameters{Size: int32(size)}
	}
	return &testgrpc.StreamingOutputCallRequest{ResponseParameters: params}
}

// recvAll reads a server stream to its end and returns the payload bytes
// received; every message must have size bytes.
func recvAll(st testgrpc.TestService_StreamingOutputCallClient, size int, pace <-chan time.Time) (int, error) {
	got := 0
	for {
		m, err := st.Recv()
		if errors.Is(err, io.EOF) {
			return got, nil
		}
		if err != nil {
			return got, err
		}
		if n := len(m.GetPayload().GetBody()); n != size {
			return got, fmt.Errorf("message of %d bytes, want %d", n, size)
		}
		got += size
		if pace != nil {
			<-pace
		}
	}
}

// TestNeverReaderWindowsDoNotGrow: a client that never reads, whatever the
// windows it grants, keeps its streams at the initial backend window: the
// drain probes it never answers are what growth waits for. Read from the
// budget: no window growth counted, and the buffered bytes within streams
// × (BackendStreamWindow plus one buffer).
func TestNeverReaderWindowsDoNotGrow(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	srv := e.srv.(*proxy.Server)
	const streams = 16
	unreadStreams(t, e, streams)
	const bound = streams * (proxy.DefaultBackendStreamWindow + 16<<10 + 1<<10)
	peak := int64(0)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for range 100 {
		<-tick.C
		peak = max(peak, srv.MaxBufferedBytes())
		if g := srv.MaxWindowGrowth(); g != 0 {
			t.Fatalf("a client that never reads made its windows grow by %d bytes", g)
		}
	}
	t.Logf("%d unread streams: peak %d bytes buffered (bound %d)", streams, peak, bound)
	if peak > bound {
		t.Errorf("peak %d bytes buffered, over %d", peak, bound)
	}
}

// TestSlowReaderCompletesLargeStream: a client that reads slowly, but
// reads, gets its whole answer, and its stream's window grows (its HTTP/2
// stack answers the drain probes), within its connection's share.
func TestSlowReaderCompletesLargeStream(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 60*time.Second)
	const msgs, size = 128, 64 << 10 // 8 MiB
	st, err := e.client.StreamingOutputCall(ctx, bigStream(msgs, size))
	if err != nil {
		t.Fatal(err)
	}
	pace := time.NewTicker(2 * time.Millisecond)
	defer pace.Stop()
	var grew int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				grew = max(grew, srv.MaxWindowGrowth())
				if grew > 0 {
					return
				}
			}
		}
	}()
	got, err := recvAll(st, size, pace.C)
	<-done
	if err != nil || got != msgs*size {
		t.Fatalf("slow reader got %d of %d bytes, then %v", got, msgs*size, err)
	}
	if grew == 0 {
		t.Errorf("the window of a reading client's stream never grew")
	}
	if share := int64(proxy.DefaultMaxConnBufferedBytes / 4); grew > share {
		t.Errorf("window growth %d over the connection's share %d", grew, share)
	}
	testkit.WaitFor(ctx, t, "the growth and the window to be given back at the stream's end", func() bool {
		return srv.MaxWindowGrowth() == 0 && srv.MaxBackendWindows() == 0
	})
}

// TestStreamsPastWindowBudgetRefused: the initial backend windows of a
// connection's open streams count in its budget, since a window granted
// by SETTINGS cannot be withheld: once they fill it, new calls on the
// connection are answered RESOURCE_EXHAUSTED (before any backend sees
// them), and the buffered bytes stay within the budget.
func TestStreamsPastWindowBudgetRefused(t *testing.T) {
	verifyNoLeaks(t)
	const budget = 16 * proxy.DefaultBackendStreamWindow
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.MaxConnBufferedBytes = budget }})
	srv := e.srv.(*proxy.Server)
	r := dialRawWide(t, e.addr)
	const streams = 24
	msg := grpcMsg(bigStream(64, 128<<10))
	for i := range streams {
		id := uint32(2*i + 1)
		r.headers(id, "/grpc.testing.TestService/StreamingOutputCall", false)
		r.fr.WriteData(id, true, msg)
	}
	// The first 16 fill the budget with their windows; the rest are
	// refused. Reading the answers drains the first ones: only the
	// refusals (trailers-only, grpc-status 8) are counted.
	refused := map[uint32]bool{}
	for len(refused) < streams-16 {
		f := r.next(func(f http2.Frame) bool { _, ok := f.(*http2.MetaHeadersFrame); return ok }).(*http2.MetaHeadersFrame)
		if f.StreamEnded() && f.PseudoValue("status") == "200" {
			var code string
			for _, hf := range f.Fields {
				if hf.Name == "grpc-status" {
					code = hf.Value
				}
			}
			if code != "8" {
				t.Fatalf("stream %d ended with grpc-status %q, want 8", f.StreamID, code)
			}
			if f.StreamID <= 2*16 {
				t.Errorf("stream %d refused: within the budget", f.StreamID)
			}
			refused[f.StreamID] = true
		}
		if b := srv.MaxBackendWindows(); b > budget {
			t.Fatalf("backend windows %d, over the budget %d", b, budget)
		}
	}
}

// TestFastClientBesideNeverReader: a client that reads completes its
// streams at full speed while another client, whose streams share the
// same backend connection, never reads: the backend connection's window
// is returned as bytes arrive, only the stuck streams' windows wait.
func TestFastClientBesideNeverReader(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 60*time.Second)
	r := dialRawWide(t, e.addr)
	const stuck = 32
	msg := grpcMsg(bigStream(64, 128<<10)) // 8 MiB each
	for i := range stuck {
		id := uint32(2*i + 1)
		r.headers(id, "/grpc.testing.TestService/StreamingOutputCall", false)
		r.fr.WriteData(id, true, msg)
	}
	testkit.WaitFor(ctx, t, "the stuck streams' queues to fill", func() bool {
		return srv.MaxBufferedBytes() >= stuck*proxy.DefaultBackendStreamWindow/2
	})
	// 4 at a time, 1 MiB each, as the benchmark's stream workload.
	const calls, conc, msgs, size = 40, 4, 16, 64 << 10
	var wg sync.WaitGroup
	errs := make(chan error, calls)
	next := make(chan struct{}, calls)
	for range calls {
		next <- struct{}{}
	}
	close(next)
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range next {
				st, err := e.client.StreamingOutputCall(ctx, bigStream(msgs, size))
				if err == nil {
					var got int
					if got, err = recvAll(st, size, nil); err == nil && got != msgs*size {
						err = fmt.Errorf("got %d bytes", got)
					}
				}
				if err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("fast client: %v", err)
	}
	if n := srv.BackendConns(e.backends[0].Addr()); n != 1 {
		t.Errorf("%d backend connections, want the one both clients share", n)
	}
	// The client that never reads is still held (its write timeout is
	// 20 s), not served and not cut.
	if n := srv.ClientConns(); n != 2 {
		t.Errorf("%d client connections, want 2", n)
	}
}

// TestBackendWindowGrowthLimits: a raw backend tracks the window the proxy
// grants one stream, frame by frame, while a client reads the answer as
// fast as it can. The window grows past the initial one, never past
// BackendMaxStreamWindow, and never past 2^31-1 (RFC 9113 §6.9.1: a
// sender must treat that as a FLOW_CONTROL_ERROR), also when the maximum
// is 2^31-1 itself and no budget bounds it.
func TestBackendWindowGrowthLimits(t *testing.T) {
	for _, tc := range []struct {
		name      string
		max       int32
		budget    int64
		wantAbove int64
	}{
		{"default", 0, 0, proxy.DefaultBackendStreamWindow},
		{"max 2^31-1, no budget", math.MaxInt32, -1, proxy.DefaultBackendMaxStreamWindow},
	} {
		t.Run(tc.name, func(t *testing.T) {
			verifyNoLeaks(t)
			limit := int64(tc.max)
			if limit == 0 {
				limit = proxy.DefaultBackendMaxStreamWindow
			}
			const msgs, size = 64, 64 << 10
			var one bytes.Buffer
			for range msgs {
				one.Write(grpcMsg(&testgrpc.StreamingOutputCallResponse{Payload: &testgrpc.Payload{Body: make([]byte, size)}}))
			}
			answer := one.Bytes()
			type seen struct{ maxStream, maxConn int64 }
			res := make(chan seen, 1)
			errc := make(chan error, 1)
			bad := rawBackend(t, func(nc net.Conn) {
				s, err := serveWindowed(nc, answer)
				res <- s
				errc <- err
				// Closing at once could reset the connection under the
				// trailers; the proxy closes it, or the cleanup does.
				io.Copy(io.Discard, nc)
			})
			e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
				c.BackendMaxStreamWindow = tc.max
				c.MaxConnBufferedBytes = tc.budget
			}})
			e.setBackends(bad)
			ctx := testkit.Context(t, 60*time.Second)
			st, err := e.client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{})
			if err != nil {
				t.Fatal(err)
			}
			got, cerr := recvAll(st, size, nil)
			var s seen
			select {
			case s = <-res:
			case <-ctx.Done():
				t.Fatal("the backend never finished")
			}
			if err := <-errc; err != nil {
				t.Fatalf("backend: %v", err)
			}
			if cerr != nil || got != msgs*size {
				t.Fatalf("client got %d of %d bytes, then %v", got, msgs*size, cerr)
			}
			t.Logf("largest stream window granted %d (limit %d), connection window %d", s.maxStream, limit, s.maxConn)
			if s.maxStream <= tc.wantAbove {
				t.Errorf("stream window never grew past %d", tc.wantAbove)
			}
			if s.maxStream > limit {
				t.Errorf("stream window reached %d, over the limit %d", s.maxStream, limit)
			}
		})
	}
}

// serveWindowed is a backend that answers the first stream with answer,
// in DATA frames within the windows it is granted, then OK trailers, and
// reports the largest stream and connection windows it was granted. A
// window over 2^31-1 is an error (RFC 9113 §6.9.1).
func serveWindowed(nc net.Conn, answer []byte) (s struct{ maxStream, maxConn int64 }, err error) {
	nc.SetDeadline(time.Now().Add(50 * time.Second))
	br := bufio.NewReader(nc)
	if _, err := io.ReadFull(br, make([]byte, len(http2.ClientPreface))); err != nil {
		return s, err
	}
	fr := http2.NewFramer(nc, br)
	fr.WriteSettings()
	streamWin, connWin := int64(65535), int64(65535)
	var id uint32
	sent := 0
	note := func() error {
		s.maxStream, s.maxConn = max(s.maxStream, streamWin), max(s.maxConn, connWin)
		if streamWin > math.MaxInt32 || connWin > math.MaxInt32 {
			return fmt.Errorf("window over 2^31-1: stream %d, connection %d", streamWin, connWin)
		}
		return nil
	}
	for {
		if id != 0 && sent < len(answer) && streamWin > 0 && connWin > 0 {
			n := int(min(int64(16<<10), streamWin, connWin, int64(len(answer)-sent)))
			if err := fr.WriteData(id, false, answer[sent:sent+n]); err != nil {
				return s, err
			}
			sent += n
			streamWin -= int64(n)
			connWin -= int64(n)
			if sent == len(answer) {
				var hb bytes.Buffer
				hpack.NewEncoder(&hb).WriteField(hpack.HeaderField{Name: "grpc-status", Value: "0"})
				return s, fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true, EndStream: true})
			}
			continue
		}
		f, err := fr.ReadFrame()
		if err != nil {
			return s, err
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if f.IsAck() {
				break
			}
			if v, ok := f.Value(http2.SettingInitialWindowSize); ok {
				streamWin += int64(v) - 65535 // RFC 9113 §6.9.2; before any stream
			}
			fr.WriteSettingsAck()
		case *http2.PingFrame:
			if !f.IsAck() {
				fr.WritePing(true, f.Data)
			}
		case *http2.WindowUpdateFrame:
			if f.StreamID == 0 {
				connWin += int64(f.Increment)
			} else if f.StreamID == id {
				streamWin += int64(f.Increment)
			}
			if err := note(); err != nil {
				return s, err
			}
		case *http2.HeadersFrame:
			if id != 0 {
				break
			}
			id = f.StreamID
			var hb bytes.Buffer
			enc := hpack.NewEncoder(&hb)
			enc.WriteField(hpack.HeaderField{Name: ":status", Value: "200"})
			enc.WriteField(hpack.HeaderField{Name: "content-type", Value: "application/grpc"})
			if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true}); err != nil {
				return s, err
			}
			if err := note(); err != nil {
				return s, err
			}
		}
	}
}

// unreadStreams opens n server streams of 64 answers of 128 KiB on a raw
// connection that grants 1 GiB windows and never reads, and waits until
// the proxy's response queues hold at least half the streams' initial
// backend windows.
func unreadStreams(t *testing.T, e *env, n int) *rawConn {
	t.Helper()
	srv := e.srv.(*proxy.Server)
	r := dialRawWide(t, e.addr)
	msg := grpcMsg(bigStream(64, 128<<10))
	for i := range n {
		id := uint32(2*i + 1)
		r.headers(id, "/grpc.testing.TestService/StreamingOutputCall", false)
		r.fr.WriteData(id, true, msg)
	}
	testkit.WaitFor(testkit.Context(t, 30*time.Second), t, "the response queues to fill", func() bool {
		return srv.MaxBufferedBytes() >= int64(n)*proxy.DefaultBackendStreamWindow/2
	})
	return r
}

// TestForgedProbeAcks is TestNeverReaderWindowsDoNotGrow with a client
// that, never reading, sends the PING acknowledgements the drain probes
// would get, guessing their payloads: "sl" and a sequence number, as they
// were. The payloads are random now, so the windows still do not grow.
func TestForgedProbeAcks(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	srv := e.srv.(*proxy.Server)
	r := unreadStreams(t, e, 16)
	forge := func(seq uint64) {
		var p [8]byte
		binary.BigEndian.PutUint64(p[:], uint64('s')<<56|uint64('l')<<48|seq)
		r.fr.WritePing(true, p)
	}
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for round := range 100 {
		<-tick.C
		for seq := uint64(1); seq <= 16; seq++ {
			forge(uint64(round/4)*16 + seq)
		}
		if g := srv.MaxWindowGrowth(); g != 0 {
			t.Fatalf("forged acknowledgements made a never-reading client's windows grow by %d bytes", g)
		}
	}
}

// TestDrainedConnStartsWithGrownWindow: on a client connection that has
// shown it reads (a large answer drained, its drain probes acknowledged),
// a new backend stream starts with the grown window, granted with its
// HEADERS, before the backend sent anything (transport.startWindowLocked):
// the growth is counted while the backend still waits to answer. Such
// starts take at most half the connection's response share, whatever the
// number of streams; every call completes, and the windows and their
// growth are given back when the streams end. A connection that never
// drained gets no such start (TestNeverReaderWindowsDoNotGrow).
func TestDrainedConnStartsWithGrownWindow(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 60*time.Second)
	const size = 64 << 10
	given := func(what string) {
		t.Helper()
		testkit.WaitFor(ctx, t, what, func() bool {
			return srv.MaxWindowGrowth() == 0 && srv.MaxBackendWindows() == 0
		})
	}
	// Streams whose backend waits before its first answer: whatever
	// window they have until then was granted at their start.
	delayed := func(us int32) *testgrpc.StreamingOutputCallRequest {
		r := bigStream(2, size)
		r.ResponseParameters[0].IntervalUs = us
		return r
	}
	run := func(req *testgrpc.StreamingOutputCallRequest, msgs int, errc chan<- error) {
		st, err := e.client.StreamingOutputCall(ctx, req)
		if err == nil {
			var got int
			if got, err = recvAll(st, size, nil); err == nil && got != msgs*size {
				err = fmt.Errorf("%d of %d bytes", got, msgs*size)
			}
		}
		errc <- err
	}
	errc := make(chan error, 32)
	// Before the connection drained anything: the initial window.
	go run(delayed(300_000), 2, errc)
	testkit.WaitFor(ctx, t, "the stream to open", func() bool {
		return srv.MaxBackendWindows() == proxy.DefaultBackendStreamWindow
	})
	if g := srv.MaxWindowGrowth(); g != 0 {
		t.Errorf("a stream of a connection that never drained started with %d bytes of growth", g)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	run(bigStream(16, size), 16, errc)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	given("the first streams' windows to be given back")
	grow := int64(proxy.DefaultBackendMaxStreamWindow - proxy.DefaultBackendStreamWindow)
	go run(delayed(300_000), 2, errc)
	testkit.WaitFor(ctx, t, "the new stream's window to start grown", func() bool {
		return srv.MaxWindowGrowth() == grow && srv.MaxBackendWindows() == proxy.DefaultBackendMaxStreamWindow
	})
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	given("the grown stream's window to be given back")
	// Many at once: the starts stop at half the share, the others start
	// with the initial window.
	const n = 20
	half := int64(proxy.DefaultMaxConnBufferedBytes / 4 / 2)
	k := half / grow
	for range n {
		go run(delayed(2_000_000), 2, errc)
	}
	want := k*proxy.DefaultBackendMaxStreamWindow + (n-k)*proxy.DefaultBackendStreamWindow
	testkit.WaitFor(ctx, t, "the streams to open", func() bool {
		return srv.MaxBackendWindows() == want
	})
	if g := srv.MaxWindowGrowth(); g != k*grow {
		t.Errorf("%d streams opened with %d bytes of growth, want %d (%d grown starts within half the share, %d)", n, g, k*grow, k, half)
	}
	for range n {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	given("the growth and the windows to be given back")
}

// TestDrainedThenStalledWindowsWithinBudget: a client that drains one
// large answer (acknowledging the drain probes), then opens more streams
// of large answers than its budget has windows for and reads nothing.
// The windows granted to backends for its streams, growth included, must
// stay within MaxConnBufferedBytes: windowRoom kept them within it at
// each stream's start, but growth after that (the streams' grown starts
// and their growth on the earlier probes) took them past it by up to the
// response share: 18 MiB of windows, 18.5 MiB held, with the default
// 16 MiB budget; 5 MiB of 4 MiB here.
func TestDrainedThenStalledWindowsWithinBudget(t *testing.T) {
	verifyNoLeaks(t)
	const limit = 4 << 20
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.MaxConnBufferedBytes = limit }})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	r := dialRawWide(t, e.addr)
	msg := grpcMsg(bigStream(64, 128<<10))
	r.headers(1, "/grpc.testing.TestService/StreamingOutputCall", false)
	r.fr.WriteData(1, true, msg)
	for {
		f, err := r.fr.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		testkit.AckControl(r.fr, f)
		if h, ok := f.(*http2.MetaHeadersFrame); ok && h.StreamEnded() {
			break
		}
	}
	testkit.WaitFor(ctx, t, "the first stream's window to be given back", func() bool {
		return srv.MaxBackendWindows() == 0
	})
	// Open more streams than the budget has windows for, reading nothing
	// from now on.
	const n = limit/proxy.DefaultBackendStreamWindow + 64
	for i := range n {
		id := uint32(2*i + 3)
		r.headers(id, "/grpc.testing.TestService/StreamingOutputCall", false)
		r.fr.WriteData(id, true, msg)
	}
	var peak int64
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for range 200 {
		<-tick.C
		peak = max(peak, srv.MaxBackendWindows())
	}
	t.Logf("windows at most %d KiB, growth %d KiB, %d streams open", peak>>10, srv.MaxWindowGrowth()>>10, srv.ClientStreams())
	if peak > limit {
		t.Errorf("the backend windows of a client connection reached %d bytes, over its budget of %d", peak, limit)
	}
}
