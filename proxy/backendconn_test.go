package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// Tests of the backend connection pool's limits and of backend connection
// lifetimes: the connection cap, SETTINGS_MAX_CONCURRENT_STREAMS=0, idle
// close, keepalive, and responses cut short by the backend.

// countingDial is a Config.Dial that counts the connections it opens.
func countingDial(n *atomic.Int64) func(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		n.Add(1)
		return d.DialContext(ctx, network, addr)
	}
}

// TestBackendConnCap: a backend limited to 2 streams per connection, with
// MaxBackendConns 2, carries 4 calls; a fifth goes to the other backend
// as a transparent retry, and with no other backend fails at once with
// UNAVAILABLE instead of opening a third connection.
func TestBackendConnCap(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 2, tscfg: func(i int, c *testserver.Config) {
		if i == 0 {
			c.ServerOptions = append(c.ServerOptions, grpc.MaxConcurrentStreams(2))
		}
	}, pcfg: func(c *proxy.Config) { c.MaxBackendConns = 2 },
		dcfg: func(c *director.Config) { c.EjectAfter = 1 }})
	srv := e.srv.(*proxy.Server)
	capped, other := e.backends[0], e.backends[1]
	ctx := testkit.Context(t, 30*time.Second)
	// A first call on the capped backend learns its SETTINGS.
	e.setBackends(capped.Addr())
	if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatal(err)
	}
	e.setBackends(capped.Addr(), other.Addr())

	hang, cancel := context.WithCancel(metadata.AppendToOutgoingContext(ctx, testserver.MetadataHang, "1"))
	var g errgroup.Group
	const calls = 12
	for range calls {
		g.Go(func() error {
			_, err := e.client.EmptyCall(hang, &testgrpc.Empty{})
			if status.Code(err) != codes.Canceled {
				return err
			}
			return nil
		})
	}
	testkit.WaitFor(ctx, t, "12 calls in flight, 4 of them on the capped backend", func() bool {
		return capped.InFlight() == 4 && capped.InFlight()+other.InFlight() == calls
	})
	if got := srv.BackendConns(capped.Addr()); got != 2 {
		t.Errorf("connections to the capped backend: got %d, want 2", got)
	}

	// Alone, the capped backend's overflow fails fast with UNAVAILABLE.
	e.setBackends(capped.Addr())
	cctx, ccancel := context.WithTimeout(ctx, 10*time.Second)
	_, err := e.client.EmptyCall(cctx, &testgrpc.Empty{})
	ccancel()
	if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "every connection") {
		t.Errorf("call over the connection cap: got %v, want UNAVAILABLE naming the cap", err)
	}
	if got := srv.BackendConns(capped.Addr()); got != 2 {
		t.Errorf("connections to the capped backend after the overflow: got %d, want 2", got)
	}
	cancel()
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	// The overflow did not count against the backend: one UNAVAILABLE
	// outcome would have ejected it.
	for _, b := range e.dir.Backends() {
		if b.Addr == capped.Addr() && b.Ejected {
			t.Errorf("capped backend ejected (%s); an overflow is not its failure", b.Reason)
		}
	}
}

// zeroStreamsBackend is a raw HTTP/2 backend that advertises
// SETTINGS_MAX_CONCURRENT_STREAMS=0 and, once raise is closed, 100 with a
// new SETTINGS frame; it answers every call it gets with an empty message
// and status OK. accepted counts its connections, served its calls.
func zeroStreamsBackend(t *testing.T, raise <-chan struct{}, accepted, served *atomic.Int64) string {
	resp := hpackBlock(":status", "200", "content-type", "application/grpc")
	trailers := hpackBlock("grpc-status", "0")
	return rawBackend(t, func(nc net.Conn) {
		accepted.Add(1)
		br := bufio.NewReader(nc)
		if _, err := io.ReadFull(br, make([]byte, len(http2.ClientPreface))); err != nil {
			return
		}
		var wmu sync.Mutex // the reader and the raiser both write
		fr := http2.NewFramer(nc, br)
		if fr.WriteSettings(http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 0}) != nil {
			return
		}
		done := make(chan struct{})
		defer close(done)
		go func() {
			select {
			case <-raise:
				wmu.Lock()
				fr.WriteSettings(http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 100})
				wmu.Unlock()
			case <-done:
			}
		}()
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				return
			}
			wmu.Lock()
			switch f := f.(type) {
			case *http2.SettingsFrame, *http2.PingFrame:
				testkit.AckControl(fr, f)
			case *http2.HeadersFrame:
				served.Add(1)
				fr.WriteHeaders(http2.HeadersFrameParam{StreamID: f.StreamID, BlockFragment: resp, EndHeaders: true})
				fr.WriteData(f.StreamID, false, grpcMsg(&testgrpc.Empty{}))
				fr.WriteHeaders(http2.HeadersFrameParam{StreamID: f.StreamID, BlockFragment: trailers, EndHeaders: true, EndStream: true})
			}
			wmu.Unlock()
		}
	})
}

// TestBackendMaxStreamsZero: a backend advertising
// SETTINGS_MAX_CONCURRENT_STREAMS=0 takes no call, but is not dialed per
// call either: its one connection stays, calls picked for it go to the
// real backend beside it at once (200 of them, all succeed), it is not
// ejected, and once it raises the limit with a new SETTINGS frame it takes
// calls again. Alone, it fails a call promptly with UNAVAILABLE naming the
// setting, not at the call's deadline.
func TestBackendMaxStreamsZero(t *testing.T) {
	verifyNoLeaks(t)
	var accepted, served atomic.Int64
	raise := make(chan struct{})
	zero := zeroStreamsBackend(t, raise, &accepted, &served)
	e := newEnv(t, envOpts{backends: 1})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 60*time.Second)

	e.setBackends(zero)
	start := time.Now()
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	_, err := e.client.EmptyCall(cctx, &testgrpc.Empty{})
	cancel()
	if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "MAX_CONCURRENT_STREAMS=0") {
		t.Errorf("only the zero-streams backend: got %v, want UNAVAILABLE naming the setting", err)
	}
	t.Logf("alone: failed after %v", time.Since(start))

	e.setBackends(zero, e.backends[0].Addr())
	const calls = 200
	for i := range calls {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err := e.client.EmptyCall(cctx, &testgrpc.Empty{})
		cancel()
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
	}
	// One dial found the limit; each further one would be a dial per
	// call. Two allows for the first connection's handshake racing the
	// second call.
	if n := accepted.Load(); n == 0 || n > 2 {
		t.Errorf("%d connections to the zero-streams backend for %d calls, want 1 or 2", n, calls+1)
	}
	if n := served.Load(); n != 0 {
		t.Errorf("the zero-streams backend got %d calls", n)
	}
	// Kept: the one dial's, or both when the handshake raced (above);
	// none made per call.
	if n := srv.BackendConns(zero); n < 1 || int64(n) > accepted.Load() {
		t.Errorf("%d connections to the zero-streams backend kept, want 1, or one per dial (%d)", n, accepted.Load())
	}
	for _, b := range e.dir.Backends() {
		// Its refusals reach the Picker as CANCELLED, which outlier
		// detection ignores; as UNAVAILABLE, 200 would have ejected it.
		if b.Addr == zero && (b.Ejected || b.Ejections != 0) {
			t.Errorf("zero-streams backend ejected (%+v); it is alive and said \"not now\"", b)
		}
	}

	close(raise)
	testkit.WaitFor(ctx, t, "the raised backend to take calls", func() bool {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if _, err := e.client.EmptyCall(cctx, &testgrpc.Empty{}); err != nil {
			t.Fatalf("after the raise: %v", err)
		}
		return served.Load() > 0
	})
	if n := accepted.Load(); n > 2 {
		t.Errorf("%d connections to the backend after it raised its limit, want the one kept", n)
	}
}

// countingPicker is a Director that counts its picks by backend: a pick
// the proxy does not use is told CANCELLED, which the Director's own
// counters leave out.
type countingPicker struct {
	*director.Director
	mu    sync.Mutex
	picks map[string]int64 // guarded by mu
}

func (p *countingPicker) count(addr string, done func(error), err error) (string, func(error), error) {
	if err == nil {
		p.mu.Lock()
		p.picks[addr]++
		p.mu.Unlock()
	}
	return addr, done, err
}

func (p *countingPicker) Pick(ctx context.Context, m string) (string, func(error), error) {
	return p.count(p.Director.Pick(ctx, m))
}

func (p *countingPicker) PickExcluding(ctx context.Context, m string, tried []string) (string, func(error), error) {
	return p.count(p.Director.PickExcluding(ctx, m, tried))
}

// counts returns a copy of the picks so far.
func (p *countingPicker) counts() map[string]int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[string]int64, len(p.picks))
	for a, n := range p.picks {
		out[a] = n
	}
	return out
}

// TestMaxStreamsZeroNotPicked: a backend advertising
// SETTINGS_MAX_CONCURRENT_STREAMS=0 beside two grpc-go backends is not
// picked at all once the proxy knows it (the Picker hears of no stream for
// it, where each pick used to cost a refusal and a re-pick), the calls
// split evenly over the other two, it is never ejected, and once a
// SETTINGS frame raises its limit it is picked and served again.
func TestMaxStreamsZeroNotPicked(t *testing.T) {
	verifyNoLeaks(t)
	var accepted, served atomic.Int64
	raise := make(chan struct{})
	zero := zeroStreamsBackend(t, raise, &accepted, &served)
	var cp *countingPicker
	e := newEnv(t, envOpts{backends: 2, pcfg: func(c *proxy.Config) {
		cp = &countingPicker{Director: c.Picker.(*director.Director), picks: map[string]int64{}}
		c.Picker = cp
	}})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 60*time.Second)
	e.setBackends(zero, e.backends[0].Addr(), e.backends[1].Addr())
	call := func() {
		t.Helper()
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if _, err := e.client.EmptyCall(cctx, &testgrpc.Empty{}); err != nil {
			t.Fatalf("call: %v", err)
		}
	}
	// The first pick of the zero-streams backend dials it and learns.
	testkit.WaitFor(ctx, t, "the proxy to learn the backend takes no stream", func() bool {
		call()
		return slices.Contains(srv.ZeroStreamBackends(), zero)
	})
	picks := cp.counts
	before := picks()
	const calls = 100
	for range calls {
		call()
	}
	after := picks()
	if n := after[zero] - before[zero]; n != 0 {
		t.Errorf("the zero-streams backend was picked %d times in %d calls, want 0", n, calls)
	}
	for _, b := range e.backends {
		if n := after[b.Addr()] - before[b.Addr()]; n < calls/2-5 || n > calls/2+5 {
			t.Errorf("%s got %d of %d calls, want an even split (%d±5)", b.Addr(), n, calls, calls/2)
		}
	}
	if n := served.Load(); n != 0 {
		t.Errorf("the zero-streams backend served %d calls", n)
	}
	for _, b := range e.dir.Backends() {
		if b.Addr == zero && (b.Ejected || b.Ejections != 0) {
			t.Errorf("zero-streams backend ejected (%+v)", b)
		}
	}

	close(raise)
	testkit.WaitFor(ctx, t, "the raised backend to be picked and served", func() bool {
		call()
		return served.Load() > 0
	})
	if got := srv.ZeroStreamBackends(); len(got) != 0 {
		t.Errorf("backends avoided after the raise: %v, want none", got)
	}
	if n := accepted.Load(); n != 1 {
		t.Errorf("%d connections to the zero-streams backend, want the one kept", n)
	}
}

// TestBackendIdleClose: a backend connection without streams for
// BackendIdleTimeout is closed and forgotten; calls racing with the close
// are never lost.
func TestBackendIdleClose(t *testing.T) {
	verifyNoLeaks(t)
	var dials atomic.Int64
	const idle = 8 * time.Millisecond
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		c.BackendIdleTimeout = idle
		c.Dial = countingDial(&dials)
	}})
	srv := e.srv.(*proxy.Server)
	addr := e.backends[0].Addr()
	ctx := testkit.Context(t, 60*time.Second)
	if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(ctx, t, "the idle backend connection closed and forgotten", func() bool {
		return srv.BackendConns(addr) == 0
	})

	// Rounds of concurrent calls, with pauses between them around the
	// idle timeout (the close comes between 1 and 1.25 of it), so that
	// idle closes race with new calls reserving a stream.
	for round := range 40 {
		var g errgroup.Group
		for range 6 {
			g.Go(func() error {
				for range 3 {
					if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
						return err
					}
				}
				return nil
			})
		}
		if err := g.Wait(); err != nil {
			t.Fatalf("round %d: a call racing with an idle close failed: %v", round, err)
		}
		pause := idle * time.Duration(4+round%5) / 4 // 1 to 2 idle timeouts
		select {
		case <-time.After(pause):
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		}
	}
	if dials.Load() < 3 {
		t.Errorf("%d backend connections dialed; idle connections were not closed", dials.Load())
	}
	t.Logf("%d backend connections dialed", dials.Load())
}

// silentBackend is a raw HTTP/2 backend that completes the handshake,
// takes streams, and then never sends another frame: a half-open
// connection, as seen from the proxy. It keeps reading.
func silentBackend(t *testing.T, streams *atomic.Int64) string {
	return rawBackend(t, func(nc net.Conn) {
		s, err := acceptH2(nc)
		if err != nil || s.hello() != nil {
			return
		}
		s.ackOnce = true
		s.serve(func(f http2.Frame) bool {
			if _, ok := f.(*http2.HeadersFrame); ok {
				streams.Add(1) // and not a word more
			}
			return true
		})
	})
}

// TestBackendKeepalive: calls on a backend that went silent (reads, never
// answers, PINGs included) fail with UNAVAILABLE after the keepalive
// interval and timeout, well before their deadline; the other backend
// keeps serving.
func TestBackendKeepalive(t *testing.T) {
	verifyNoLeaks(t)
	var streams atomic.Int64
	silent := silentBackend(t, &streams)
	const interval, timeout = 100 * time.Millisecond, time.Second
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		c.BackendKeepaliveTime = interval
		c.BackendKeepaliveTimeout = timeout
	}})
	srv := e.srv.(*proxy.Server)
	e.setBackends(silent, e.backends[0].Addr())
	ctx := testkit.Context(t, 60*time.Second)
	const deadline = 20 * time.Second
	var (
		mu     sync.Mutex
		failed int
		g      errgroup.Group
	)
	for range 6 {
		g.Go(func() error {
			cctx, cancel := context.WithTimeout(ctx, deadline)
			defer cancel()
			start := time.Now()
			_, err := e.client.EmptyCall(cctx, &testgrpc.Empty{})
			if err == nil {
				return nil
			}
			if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "keepalive") {
				return err
			}
			t.Logf("call on the silent backend failed after %v (interval %v + timeout %v)", time.Since(start), interval, timeout)
			mu.Lock()
			failed++
			mu.Unlock()
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatalf("got %v, want success or UNAVAILABLE naming the keepalive", err)
	}
	if failed == 0 || streams.Load() == 0 {
		t.Fatalf("no call reached the silent backend (failed %d, streams %d); the test proves nothing", failed, streams.Load())
	}
	if srv.BackendPings() == 0 {
		t.Error("no keepalive PING was sent")
	}
	// The good backend still serves, alone.
	e.setBackends(e.backends[0].Addr())
	if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Errorf("after the silent backend: %v", err)
	}
}

// TestBackendKeepaliveGRPCEnforcement: the proxy's PINGs keep to a grpc-go
// backend's keepalive enforcement when BackendKeepaliveTime is at least
// its EnforcementPolicy.MinTime (as the defaults are, 5 min each): a
// stream on which the backend sends nothing for many intervals lives. The
// control case, PINGs closer than MinTime, is closed by the backend with
// too_many_pings, so the test can see a violation.
func TestBackendKeepaliveGRPCEnforcement(t *testing.T) {
	for _, tc := range []struct {
		name          string
		minTime, ping time.Duration
		want          codes.Code
	}{
		{name: "interval at MinTime", minTime: 200 * time.Millisecond, ping: 200 * time.Millisecond, want: codes.OK},
		{name: "control: interval below MinTime", minTime: 5 * time.Second, ping: 50 * time.Millisecond, want: codes.Unavailable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			verifyNoLeaks(t)
			e := newEnv(t, envOpts{backends: 1, tscfg: func(_ int, c *testserver.Config) {
				// grpc-go's default policy, with MinTime scaled down.
				c.ServerOptions = append(c.ServerOptions, grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: tc.minTime}))
			}, pcfg: func(c *proxy.Config) {
				c.BackendKeepaliveTime = tc.ping
				c.BackendKeepaliveTimeout = 5 * time.Second
			}})
			srv := e.srv.(*proxy.Server)
			ctx := testkit.Context(t, 60*time.Second)
			// One message after 15 intervals of silence from the backend.
			quiet := 15 * tc.minTime
			if tc.want != codes.OK {
				quiet = 20 * time.Second // the backend gives up long before
			}
			st, err := e.client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{
				ResponseParameters: []*testgrpc.ResponseParameters{{Size: 10, IntervalUs: int32(quiet / time.Microsecond)}},
			})
			if err != nil {
				t.Fatal(err)
			}
			msgs, err := drain(st.Recv)
			if got := status.Code(err); got != tc.want || (tc.want == codes.OK && len(msgs) != 1) {
				t.Errorf("stream ended with %v after %d messages, want %v", err, len(msgs), tc.want)
			}
			pings := srv.BackendPings()
			if tc.want == codes.OK && pings < 5 {
				t.Errorf("%d keepalive PINGs sent in %v of silence at %v, want at least 5", pings, quiet, tc.ping)
			}
			t.Logf("%d keepalive PINGs sent", pings)
		})
	}
}

// TestBackendEndsMidStream: a backend sends N messages and then loses its
// connection or resets the stream while the client has not read them yet;
// the client receives all N, then the error, as a direct client would, and
// the connection's buffer budget is all given back. Half a message is held
// back (holdback.go), or with the hold-back off trimmed from the queue.
func TestBackendEndsMidStream(t *testing.T) {
	// More than the client's 64 KiB window, within the 128 KiB the proxy
	// grants this backend per stream (Config.BackendStreamWindow, set
	// below), which this raw backend does not watch.
	const n, size = 10, 10 << 10
	msg := grpcMsg(&testgrpc.StreamingOutputCallResponse{Payload: &testgrpc.Payload{Body: make([]byte, size)}})
	for _, tc := range []struct {
		name string
		end  func(fr *http2.Framer, id uint32) // after the messages
		want codes.Code
		off  bool // response hold-back off
	}{
		{name: "connection lost", want: codes.Unavailable, end: func(*http2.Framer, uint32) {}},
		{name: "connection lost in the middle of a message", want: codes.Unavailable, end: func(fr *http2.Framer, id uint32) {
			fr.WriteData(id, false, msg[:len(msg)/2])
		}},
		{name: "connection lost in the middle of a message, hold-back off", want: codes.Unavailable, off: true, end: func(fr *http2.Framer, id uint32) {
			// In two frames, so that the second takes a queue buffer of
			// its own, which the trim must give back.
			fr.WriteData(id, false, msg[:len(msg)/2])
			fr.WriteData(id, false, msg[len(msg)/2:len(msg)-1])
		}},
		{name: "RST_STREAM INTERNAL_ERROR", want: codes.Internal, end: func(fr *http2.Framer, id uint32) {
			fr.WriteRSTStream(id, http2.ErrCodeInternal)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			verifyNoLeaks(t)
			sent := make(chan struct{})
			bad := rawBackend(t, func(nc net.Conn) {
				s, err := acceptH2(nc)
				if err != nil {
					return
				}
				s.hello()
				s.serve(func(f http2.Frame) bool {
					switch f := f.(type) {
					case *http2.PingFrame:
						if f.IsAck() {
							// The proxy read all that came before.
							close(sent)
							if tc.want == codes.Unavailable {
								return false // closes the connection
							}
						}
					case *http2.HeadersFrame:
						var hb bytes.Buffer
						enc := hpack.NewEncoder(&hb)
						enc.WriteField(hpack.HeaderField{Name: ":status", Value: "200"})
						enc.WriteField(hpack.HeaderField{Name: "content-type", Value: "application/grpc"})
						s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: f.StreamID, BlockFragment: hb.Bytes(), EndHeaders: true})
						for range n {
							s.fr.WriteData(f.StreamID, false, msg)
						}
						tc.end(s.fr, f.StreamID)
						s.fr.WritePing(false, [8]byte{7})
					}
					return true
				})
			})
			e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
				c.BackendStreamWindow = 128 << 10
				if tc.off {
					c.ResponseHoldback = -1
				}
			}})
			srv := e.srv.(*proxy.Server)
			e.setBackends(bad)
			ctx := testkit.Context(t, 30*time.Second)
			// The messages wait in the proxy until the client reads.
			cc := fixedWindowConn(t, e.addr, 65535)
			st, err := testgrpc.NewTestServiceClient(cc).StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{})
			if err != nil {
				t.Fatal(err)
			}
			select {
			case <-sent:
			case <-ctx.Done():
				t.Fatal("the backend never sent its messages")
			}
			if tc.want == codes.Unavailable {
				testkit.WaitFor(ctx, t, "the proxy to see the backend connection end", func() bool {
					return srv.BackendConns(bad) == 0
				})
			}
			msgs, err := drain(st.Recv)
			if len(msgs) != n || status.Code(err) != tc.want {
				t.Errorf("client got %d messages then %v, want %d then %v", len(msgs), err, n, tc.want)
			}
			testkit.WaitFor(ctx, t, "the connection's buffer budget to be given back", func() bool { return srv.MaxBufferedBytes() == 0 })
		})
	}
}

// TestBackendIdleCloseGoAway: an idle backend connection is closed
// gracefully: the backend reads GOAWAY(NO_ERROR), then the end of the
// connection.
func TestBackendIdleCloseGoAway(t *testing.T) {
	verifyNoLeaks(t)
	ended := make(chan string, 1)
	addr := rawBackend(t, func(nc net.Conn) {
		s, err := acceptH2(nc)
		if err != nil {
			return
		}
		s.hello()
		var goaway *http2.GoAwayFrame
		err = s.serve(func(f http2.Frame) bool {
			switch f := f.(type) {
			case *http2.HeadersFrame:
				var hb bytes.Buffer
				enc := hpack.NewEncoder(&hb)
				for _, kv := range [][2]string{{":status", "200"}, {"content-type", "application/grpc"}, {"grpc-status", "12"}} {
					enc.WriteField(hpack.HeaderField{Name: kv[0], Value: kv[1]})
				}
				s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: f.StreamID, BlockFragment: hb.Bytes(), EndHeaders: true, EndStream: true})
			case *http2.GoAwayFrame:
				g := *f
				goaway = &g
			}
			return true
		})
		switch {
		case goaway == nil:
			ended <- "closed without GOAWAY: " + err.Error()
		case goaway.ErrCode != http2.ErrCodeNo:
			ended <- "GOAWAY " + goaway.ErrCode.String()
		default:
			ended <- "ok"
		}
	})
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.BackendIdleTimeout = 20 * time.Millisecond }})
	e.setBackends(addr)
	ctx := testkit.Context(t, 20*time.Second)
	if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); status.Code(err) != codes.Unimplemented {
		t.Fatalf("got %v, want the backend's UNIMPLEMENTED", err)
	}
	select {
	case got := <-ended:
		if got != "ok" {
			t.Errorf("idle backend connection: %s, want GOAWAY(NO_ERROR) then close", got)
		}
	case <-ctx.Done():
		t.Fatal("the idle backend connection was never closed")
	}
}

// TestBackendConnCapBurst: a burst of calls to a backend whose SETTINGS
// have not arrived yet is not failed by MaxBackendConns on the guess of
// 100 streams per connection: the calls wait for the handshake and then
// all run, on no more connections than the cap.
func TestBackendConnCapBurst(t *testing.T) {
	verifyNoLeaks(t)
	var dials atomic.Int64
	// The backend's SETTINGS are held back until the whole burst is in
	// the proxy.
	gate := make(chan struct{})
	var gateOnce sync.Once
	openGate := func() { gateOnce.Do(func() { close(gate) }) }
	dial := countingDial(&dials)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		c.MaxBackendConns = 2
		c.HandshakeTimeout = 20 * time.Second
		// The burst is cancelled at once at the end: 250 resets of young
		// streams, a rapid reset by the numbers. The GOAWAY that follows
		// could reach a call before its own cancel did.
		c.MaxEarlyResets = -1
		c.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
			nc, err := dial(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return &gatedConn{Conn: nc, gate: gate}, nil
		}
	}})
	t.Cleanup(openGate) // before the env's cleanup, which waits for the reads
	ctx := testkit.Context(t, 30*time.Second)
	hang, cancel := context.WithCancel(metadata.AppendToOutgoingContext(ctx, testserver.MetadataHang, "1"))
	var g errgroup.Group
	const calls = 250 // over 2 connections of 100 assumed streams
	for range calls {
		g.Go(func() error {
			_, err := e.client.EmptyCall(hang, &testgrpc.Empty{})
			if status.Code(err) != codes.Canceled {
				return err
			}
			return nil
		})
	}
	testkit.WaitFor(ctx, t, "every call of the burst picked and waiting", func() bool {
		b := e.dir.Backends()
		return len(b) == 1 && b[0].InFlight == calls
	})
	openGate()
	testkit.WaitFor(ctx, t, "every call of the burst in flight", func() bool {
		return e.backends[0].InFlight() == calls
	})
	cancel()
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	if n := dials.Load(); n > 2 {
		t.Errorf("%d connections dialed, want at most 2", n)
	}
}

// gatedConn is a backend connection that reads nothing until gate is
// closed.
type gatedConn struct {
	net.Conn
	gate <-chan struct{}
}

func (g *gatedConn) Read(p []byte) (int, error) {
	<-g.gate
	return g.Conn.Read(p)
}

// TestMaxStreamsZeroAfterReserve: a call whose slot on a new backend
// connection was reserved on the assumed stream limit, before the
// backend's SETTINGS said 0, goes to another backend at once instead of
// waiting for a slot that never comes (it waited to its deadline).
func TestMaxStreamsZeroAfterReserve(t *testing.T) {
	verifyNoLeaks(t)
	var accepted, served atomic.Int64
	zero := zeroStreamsBackend(t, make(chan struct{}), &accepted, &served)
	e := newEnv(t, envOpts{backends: 1})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 60*time.Second)
	var held atomic.Bool
	proxy.SetAfterReserve(srv, func(addr string) {
		if addr != zero || held.Swap(true) {
			return
		}
		// The slot is reserved: let the backend's SETTINGS arrive first.
		testkit.WaitFor(ctx, t, "the proxy to learn the backend takes no stream", func() bool {
			return slices.Contains(srv.ZeroStreamBackends(), zero)
		})
	})
	e.setBackends(zero, e.backends[0].Addr())
	for i := 0; !held.Load(); i++ {
		if i == 20 {
			t.Fatal("20 calls and none picked the zero-streams backend")
		}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := e.client.EmptyCall(cctx, &testgrpc.Empty{})
		cancel()
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
	}
	if n := served.Load(); n != 0 {
		t.Errorf("the zero-streams backend served %d calls", n)
	}
}

// TestResetAfterCompleteResponseIsNoError: a backend that sends its whole
// response and then RST_STREAM(CANCEL) while the client still sends (as
// grpc-go's server does when its deadline timer fires just after the
// handler's status went out) leaves the client the response and a
// RST_STREAM(NO_ERROR): stop sending, the answer stands (RFC 9113 §8.1).
// Relayed as CANCEL, Go's HTTP/2 client failed a call it had all of.
func TestResetAfterCompleteResponseIsNoError(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	bad := rawBackend(t, h2Backend(func(fr *http2.Framer, id uint32) bool {
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, EndHeaders: true,
			BlockFragment: hpackBlock(":status", "200", "content-type", "application/grpc")})
		fr.WriteData(id, false, grpcMsg(&testgrpc.Empty{}))
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, EndHeaders: true, EndStream: true,
			BlockFragment: hpackBlock("grpc-status", "0")})
		fr.WriteRSTStream(id, http2.ErrCodeCancel)
		return true
	}))
	e.setBackends(bad)
	r := dialRaw(t, e.addr)
	handshakeRaw(t, r)
	r.headers(1, "/grpc.testing.TestService/EmptyCall", false) // the request goes on
	var status string
	r.next(func(f http2.Frame) bool {
		if h, ok := f.(*http2.MetaHeadersFrame); ok && h.StreamEnded() {
			for _, hf := range h.RegularFields() {
				if hf.Name == "grpc-status" {
					status = hf.Value
				}
			}
			if status == "" {
				status = "none"
			}
		}
		return status != ""
	})
	if status != "0" {
		t.Fatalf("trailers with grpc-status %q, want 0", status)
	}
	f := r.next(func(f http2.Frame) bool { _, ok := f.(*http2.RSTStreamFrame); return ok })
	if code := f.(*http2.RSTStreamFrame).ErrCode; code != http2.ErrCodeNo {
		t.Fatalf("RST_STREAM %v after the complete response, want NO_ERROR", code)
	}
}
