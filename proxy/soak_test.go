package proxy_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// soakSample is one interval's reading of the process.
type soakSample struct {
	at         time.Duration
	rssMiB     int
	heapMiB    int // heap in use after a GC: RSS under -race also holds shadow memory and freed pages
	goroutines int
	calls      int64
}

// heapAfterGC returns the heap in use, in MiB, right after a collection.
func heapAfterGC() int {
	// Twice: sync.Pool's contents (grpc-go's buffer pools among them)
	// live through one collection in its victim cache, and are not
	// held by anything.
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int(m.HeapInuse >> 20)
}

// currentRSS returns VmRSS in MiB, 0 where /proc does not tell.
func currentRSS() int {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			return kb >> 10
		}
	}
	return 0
}

// soakCalls counts the soak's calls. A failure is excused only when it is
// UNAVAILABLE and the call was in flight on the killed backend: it ended
// after the kill began and started before the proxy had noticed the kill
// (its connections to that backend all gone). A call can still be sent
// on such a connection while Stop closes it, or after, until the proxy
// reads its end; whether that call reached the backend's application is
// unknowable then, so it fails, as it would on a direct connection.
type soakCalls struct {
	total, excused atomic.Int64
	killedAt       atomic.Int64 // UnixNano, 0 before the kill
	noticedAt      atomic.Int64 // UnixNano the proxy held no connection to it, 0 before

	mu     sync.Mutex
	failed []string // unexcused failures, the first few
	nfail  int
}

func (s *soakCalls) record(kind string, start time.Time, err error) {
	s.total.Add(1)
	if err == nil {
		return
	}
	k, n := s.killedAt.Load(), s.noticedAt.Load()
	if status.Code(err) == codes.Unavailable && k != 0 && (n == 0 || start.UnixNano() < n) && time.Now().UnixNano() >= k {
		s.excused.Add(1)
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nfail++
	if len(s.failed) < 10 {
		s.failed = append(s.failed, fmt.Sprintf("%s at +%s: %v", kind, time.Duration(time.Now().UnixNano()-k), err))
	}
}

// TestSoak runs mixed unary, server-streaming and bidi load over a few
// client connections for $STREAMLB_SOAK (a Go duration; unset skips it),
// while the three backends restart gracefully one at a time in a loop,
// one of them is killed abruptly once, and a hostile client beside the
// load does rapid resets, empty DATA floods and never reads. No call may
// fail except those in flight on the killed backend, and RSS and the
// goroutine count stay flat from the first interval to the last.
func TestSoak(t *testing.T) {
	v := os.Getenv("STREAMLB_SOAK")
	if v == "" {
		t.Skip("set STREAMLB_SOAK to a duration (e.g. 30s) to run the soak")
	}
	dur, err := time.ParseDuration(v)
	if err != nil || dur < 5*time.Second {
		t.Fatalf("STREAMLB_SOAK=%q: want a duration of at least 5s", v)
	}
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 3, pcfg: func(c *proxy.Config) {
		// The never-reading client must be cut well within the soak.
		c.WriteTimeout = 2 * time.Second
	}})
	ctx := testkit.Context(t, dur+2*time.Minute)
	loadCtx, stopLoad := context.WithTimeout(ctx, dur)
	defer stopLoad()
	start := time.Now()

	var calls soakCalls
	var g errgroup.Group
	const conns, workersPerConn, maxPerWorker = 3, 4, 1 << 20
	for c := range conns {
		client := e.client
		if c > 0 {
			client = testgrpc.NewTestServiceClient(e.dial(e.addr))
		}
		for w := range workersPerConn {
			g.Go(func() error {
				soakWorker(loadCtx, client, (c*workersPerConn+w)%3, maxPerWorker, &calls)
				return nil
			})
		}
	}
	var hostile hostileStats
	g.Go(func() error { hostileLoop(loadCtx, e.addr, &hostile); return nil })
	var restarts, kills atomic.Int64
	g.Go(func() error { return restartLoop(loadCtx, t, e, dur, &calls, &restarts, &kills) })

	interval := max(dur/10, time.Second)
	var samples []soakSample
	tick := time.NewTicker(interval)
	for loadCtx.Err() == nil {
		select {
		case <-tick.C:
			samples = append(samples, soakSample{at: time.Since(start).Round(time.Second), rssMiB: currentRSS(), heapMiB: heapAfterGC(), goroutines: runtime.NumGoroutine(), calls: calls.total.Load()})
		case <-loadCtx.Done():
		}
	}
	tick.Stop()
	if err := g.Wait(); err != nil {
		t.Error(err)
	}

	for _, s := range samples {
		t.Logf("soak +%s: %d calls, RSS %d MiB, heap %d MiB after GC, %d goroutines", s.at, s.calls, s.rssMiB, s.heapMiB, s.goroutines)
	}
	t.Logf("soak %s: %d calls, %d failed unexcused, %d UNAVAILABLE in flight on the killed backend; %d graceful restarts, %d kills; hostile: %d rapid-reset, %d empty-DATA, %d never-reading connections (%d ended by the proxy); %d floods not ended with ENHANCE_YOUR_CALM",
		dur, calls.total.Load(), calls.nfail, calls.excused.Load(), restarts.Load(), kills.Load(),
		hostile.resets.Load(), hostile.empties.Load(), hostile.stalls.Load(), hostile.cut.Load(), hostile.uncalm.Load())
	for _, f := range calls.failed {
		t.Logf("  %s", f)
	}
	if calls.nfail > 0 {
		t.Errorf("%d calls failed beyond those in flight on the killed backend", calls.nfail)
	}
	if n := calls.excused.Load(); n > conns*workersPerConn {
		t.Errorf("%d calls failed at the kill, more than the %d that could be in flight", n, conns*workersPerConn)
	}
	if kills.Load() != 1 {
		t.Errorf("%d kills, want 1 (soak too short?)", kills.Load())
	}
	if len(samples) >= 2 {
		// The first third of the run is warm-up (pools, buffers, the race
		// detector's shadow memory): growth is measured after it.
		first, last := samples[len(samples)/3], samples[len(samples)-1]
		if first.rssMiB > 0 && float64(last.rssMiB) > 1.5*float64(first.rssMiB)+32 {
			t.Errorf("RSS grew from %d MiB to %d MiB", first.rssMiB, last.rssMiB)
		}
		// The heap after GC swings with the calls in flight (a stream
		// holds up to a MiB): the base is the largest reading up to the
		// first third, and a leak is growth well past it.
		base := 0
		for _, s := range samples[:len(samples)/3+1] {
			base = max(base, s.heapMiB)
		}
		if float64(last.heapMiB) > 1.5*float64(base)+32 {
			t.Errorf("heap in use after GC grew from at most %d MiB in the first third to %d MiB", base, last.heapMiB)
		}
		if float64(last.goroutines) > 1.5*float64(first.goroutines)+50 {
			t.Errorf("goroutines grew from %d to %d", first.goroutines, last.goroutines)
		}
	}
}

// soakWorker makes calls of one kind (0 unary, 1 server streaming, 2 bidi)
// until ctx ends or max calls.
func soakWorker(ctx context.Context, client testgrpc.TestServiceClient, kind, max int, calls *soakCalls) {
	for range max {
		if ctx.Err() != nil {
			return
		}
		// The call's own context outlives the soak's end by a little, so
		// calls in flight at the end finish rather than count as failures.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		start := time.Now()
		var err error
		var name string
		switch kind {
		case 0:
			name = "unary"
			_, err = client.UnaryCall(cctx, &testgrpc.SimpleRequest{ResponseSize: 512, Payload: &testgrpc.Payload{Body: make([]byte, 256)}})
		case 1:
			name = "server-streaming"
			err = soakServerStream(cctx, client)
		default:
			name = "bidi"
			err = soakBidi(cctx, client)
		}
		cancel()
		calls.record(name, start, err)
	}
}

func soakServerStream(ctx context.Context, client testgrpc.TestServiceClient) error {
	params := make([]*testgrpc.ResponseParameters, 5)
	for i := range params {
		params[i] = &testgrpc.ResponseParameters{Size: 1024}
	}
	st, err := client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{ResponseParameters: params})
	if err != nil {
		return err
	}
	got, err := drain(st.Recv)
	if err == nil && len(got) != len(params) {
		err = fmt.Errorf("got %d messages, want %d", len(got), len(params))
	}
	return err
}

func soakBidi(ctx context.Context, client testgrpc.TestServiceClient) error {
	st, err := client.FullDuplexCall(ctx)
	if err != nil {
		return err
	}
	for range 3 {
		req := &testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 256}}}
		if err := st.Send(req); err != nil {
			// The status is in Recv.
			_, err = st.Recv()
			return err
		}
		if _, err := st.Recv(); err != nil {
			return err
		}
	}
	if err := st.CloseSend(); err != nil {
		return err
	}
	if _, err := st.Recv(); err != io.EOF {
		if err != nil {
			return err // a status: record judges it by its code
		}
		return errors.New("a message after half-close, want EOF")
	}
	return nil
}

// restartLoop restarts the backends gracefully one at a time, as
// Kubernetes does, until ctx ends; past the middle of the soak it kills
// one abruptly (closed connections, no GOAWAY) instead, once.
func restartLoop(ctx context.Context, t *testing.T, e *env, dur time.Duration, calls *soakCalls, restarts, kills *atomic.Int64) error {
	start := time.Now()
	for i := 0; i < 10000 && ctx.Err() == nil; i++ {
		pause(ctx, 700*time.Millisecond)
		if ctx.Err() != nil {
			return nil
		}
		idx := i % len(e.backends)
		old := e.backends[idx]
		addr := old.Addr()
		if kills.Load() == 0 && time.Since(start) > dur/2 {
			// The kill instant is when Stop begins: calls fail while it
			// closes the connections.
			calls.killedAt.Store(time.Now().UnixNano())
			old.Stop()
			if err := noticed(e.srv.(*proxy.Server), addr); err != nil {
				return err
			}
			calls.noticedAt.Store(time.Now().UnixNano())
			t.Logf("killed %s; the proxy had dropped its connections to it %s after the kill began",
				old.Name(), time.Duration(calls.noticedAt.Load()-calls.killedAt.Load()))
			kills.Add(1)
		} else {
			// Kubernetes' default grace period: calls in flight may be
			// slow on a loaded machine (the never-reading client's
			// answers, 32 MiB, are read once it wakes up), and a stop cut
			// short would fail them.
			sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			stopStart := time.Now()
			err := old.Shutdown(sctx)
			cancel()
			if err != nil {
				return fmt.Errorf("graceful stop of %s: %w", old.Name(), err)
			}
			if took := time.Since(stopStart); took > 2*time.Second {
				t.Logf("graceful stop of %s took %v", old.Name(), took.Round(time.Millisecond))
			}
			restarts.Add(1)
		}
		pause(ctx, 300*time.Millisecond)
		ts, err := testserver.New(testserver.Config{Name: fmt.Sprintf("b%d-%d", idx, i), Logger: quietLog})
		if err != nil {
			return err
		}
		if err := ts.Start(addr); err != nil {
			return fmt.Errorf("restart on %s: %w", addr, err)
		}
		t.Cleanup(ts.Stop)
		// Only this goroutine writes e.backends while the soak runs.
		e.backends[idx] = ts
	}
	return nil
}

// noticed polls until the proxy holds no connection to the killed backend
// at addr, for at most 10 s.
func noticed(srv *proxy.Server, addr string) error {
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for deadline := time.Now().Add(10 * time.Second); srv.BackendConns(addr) > 0; <-tick.C {
		if time.Now().After(deadline) {
			return fmt.Errorf("the proxy still holds %d connections to the killed backend %s after 10s", srv.BackendConns(addr), addr)
		}
	}
	return nil
}

// hostileStats counts the hostile client's connections by attack.
type hostileStats struct {
	resets, empties, stalls, cut, uncalm atomic.Int64
}

// hostileLoop cycles through attacks, one connection at a time, until ctx
// ends.
func hostileLoop(ctx context.Context, addr string, st *hostileStats) {
	const path = "/grpc.testing.TestService/FullDuplexCall"
	for i := 0; i < 10000 && ctx.Err() == nil; i++ {
		var err error
		switch i % 3 {
		case 0:
			st.resets.Add(1)
			err = floodUntilGoAway(addr, 20000, func(fr *http2.Framer, enc *hpackWriter, j int) error {
				id := uint32(2*j + 1)
				if err := enc.headers(fr, id, path); err != nil {
					return err
				}
				return fr.WriteRSTStream(id, http2.ErrCodeCancel)
			})
		case 1:
			st.empties.Add(1)
			err = floodUntilGoAway(addr, 1<<20, func(fr *http2.Framer, enc *hpackWriter, j int) error {
				if j == 0 {
					if err := enc.headers(fr, 1, path); err != nil {
						return err
					}
				}
				return fr.WriteData(1, false, nil)
			})
		case 2:
			st.stalls.Add(1)
			var cut bool
			cut, err = neverRead(ctx, addr)
			if cut {
				st.cut.Add(1)
			}
		}
		if err != nil && i%3 != 2 {
			st.uncalm.Add(1) // logged; hostile_test.go asserts the codes
		}
		pause(ctx, 100*time.Millisecond)
	}
}

// hpackWriter encodes the request headers of a gRPC call.
type hpackWriter struct{}

func (h *hpackWriter) headers(fr *http2.Framer, id uint32, path string) error {
	var b bytesWriter
	enc := hpack.NewEncoder(&b)
	f := []string{":method", "POST", ":scheme", "http", ":path", path, ":authority", "x", "content-type", "application/grpc", "te", "trailers"}
	for i := 0; i < len(f); i += 2 {
		enc.WriteField(hpack.HeaderField{Name: f[i], Value: f[i+1]})
	}
	return fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: []byte(b), EndHeaders: true})
}

type bytesWriter []byte

func (b *bytesWriter) Write(p []byte) (int, error) { *b = append(*b, p...); return len(p), nil }

// dialHostile opens a raw HTTP/2 connection with a 15 s deadline.
func dialHostile(addr string) (net.Conn, *http2.Framer, error) {
	nc, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, nil, err
	}
	nc.SetDeadline(time.Now().Add(15 * time.Second))
	if _, err := io.WriteString(nc, http2.ClientPreface); err != nil {
		nc.Close()
		return nil, nil, err
	}
	fr := http2.NewFramer(nc, nc)
	if err := fr.WriteSettings(); err != nil {
		nc.Close()
		return nil, nil, err
	}
	return nc, fr, nil
}

// floodUntilGoAway writes up to n frames with send while reading until
// the proxy ends the connection; it returns an error if the proxy did not
// send GOAWAY(ENHANCE_YOUR_CALM).
func floodUntilGoAway(addr string, n int, send func(*http2.Framer, *hpackWriter, int) error) error {
	nc, fr, err := dialHostile(addr)
	if err != nil {
		return err
	}
	defer nc.Close()
	rfr := http2.NewFramer(nil, nc)
	wrote := make(chan struct{})
	go func() {
		defer close(wrote)
		var enc hpackWriter
		for i := range n {
			if send(fr, &enc, i) != nil {
				return
			}
		}
	}()
	var code http2.ErrCode = 0xff
	for {
		f, err := rfr.ReadFrame()
		if err != nil {
			break
		}
		if g, ok := f.(*http2.GoAwayFrame); ok {
			code = g.ErrCode
		}
	}
	nc.Close()
	<-wrote
	if code != http2.ErrCodeEnhanceYourCalm {
		return fmt.Errorf("flood ended with GOAWAY code %v", code)
	}
	return nil
}

// neverRead asks for large answers on four streams and never reads them;
// it reports whether the proxy closed the connection (its write timeout).
func neverRead(ctx context.Context, addr string) (bool, error) {
	nc, fr, err := dialHostile(addr)
	if err != nil {
		return false, err
	}
	defer nc.Close()
	fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 30})
	fr.WriteWindowUpdate(0, 1<<30)
	params := make([]*testgrpc.ResponseParameters, 32)
	for i := range params {
		params[i] = &testgrpc.ResponseParameters{Size: 256 << 10}
	}
	var enc hpackWriter
	for i := range 4 {
		id := uint32(2*i + 1)
		if err := enc.headers(fr, id, "/grpc.testing.TestService/StreamingOutputCall"); err != nil {
			return false, err
		}
		if err := fr.WriteData(id, true, grpcMsg(&testgrpc.StreamingOutputCallRequest{ResponseParameters: params})); err != nil {
			return false, err
		}
	}
	// Pacing, not synchronisation: the proxy's write timeout is 2 s.
	pause(ctx, 3*time.Second)
	nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = io.Copy(io.Discard, nc)
	var ne net.Error
	return !(errors.As(err, &ne) && ne.Timeout()), nil
}
