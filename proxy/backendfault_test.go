package proxy_test

import (
	"context"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// loadResult counts the calls of a load run by outcome.
type loadResult struct {
	total  atomic.Int64
	failed atomic.Int64
	mu     sync.Mutex
	errs   map[string]int // first errors by message, for the report
}

func (r *loadResult) record(err error) {
	r.total.Add(1)
	if err == nil {
		return
	}
	r.failed.Add(1)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.errs == nil {
		r.errs = make(map[string]int)
	}
	if len(r.errs) < 10 {
		r.errs[status.Convert(err).Message()]++
	}
}

// waitLoadOnEvery waits until every backend of e has answered at least n
// calls.
func waitLoadOnEvery(ctx context.Context, t *testing.T, e *env, n int64) {
	t.Helper()
	testkit.WaitFor(ctx, t, "load on every backend", func() bool {
		for _, b := range e.backends {
			if b.Calls() < n {
				return false
			}
		}
		return true
	})
}

// loadUntil runs workers goroutines that make EmptyCalls over the env's one
// client connection until stop is closed, each at most maxPerWorker calls.
// It returns a function that waits for them.
func loadUntil(ctx context.Context, e *env, workers, maxPerWorker int, stop <-chan struct{}, r *loadResult) func() {
	var g errgroup.Group
	for range workers {
		g.Go(func() error {
			for range maxPerWorker {
				select {
				case <-stop:
					return nil
				case <-ctx.Done():
					return nil
				default:
				}
				cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				_, err := e.client.EmptyCall(cctx, &testgrpc.Empty{})
				cancel()
				r.record(err)
			}
			return nil
		})
	}
	return func() { g.Wait() }
}

// pause waits d unless ctx ends first. It paces the scenario (a restart's
// downtime, the time between restarts); it synchronises nothing.
func pause(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// TestRollingRestart restarts every backend once, one at a time, as
// Kubernetes does (graceful stop: GOAWAY, in-flight calls finish, the
// listener closes; a new process on the same address half a second
// later), under continuous load over one client connection. No call may
// fail: calls that never reached a backend are retried on another one.
func TestRollingRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("load run")
	}
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 3})
	ctx := testkit.Context(t, 60*time.Second)
	var r loadResult
	stop := make(chan struct{})
	wait := loadUntil(ctx, e, 8, 50000, stop, &r)
	waitLoadOnEvery(ctx, t, e, 20)
	restarted := make([]*testserver.Server, len(e.backends))
	for i, old := range e.backends {
		addr := old.Addr()
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if err := old.Shutdown(sctx); err != nil {
			t.Errorf("graceful stop of %s: %v", old.Name(), err)
		}
		cancel()
		pause(ctx, 500*time.Millisecond)
		ts, err := testserver.New(testserver.Config{Name: fmt.Sprintf("b%d-new", i), Logger: quietLog})
		if err != nil {
			t.Fatal(err)
		}
		if err := ts.Start(addr); err != nil {
			t.Fatalf("restart on %s: %v", addr, err)
		}
		t.Cleanup(ts.Stop)
		restarted[i] = ts
		// Kubernetes waits for readiness, then some more, before the next.
		pause(ctx, 700*time.Millisecond)
	}
	// Every restarted backend must be back in rotation.
	testkit.WaitFor(ctx, t, "the restarted backends to serve", func() bool {
		for _, b := range restarted {
			if b.Calls() < 20 {
				return false
			}
		}
		return true
	})
	close(stop)
	wait()
	total, failed := r.total.Load(), r.failed.Load()
	t.Logf("rolling restart: %d of %d calls failed (%.3f%%)", failed, total, 100*float64(failed)/float64(max(total, 1)))
	for msg, n := range r.errs {
		t.Logf("  %d× %s", n, msg)
	}
	if failed != 0 {
		t.Errorf("%d calls failed during a rolling restart, want 0", failed)
	}
	for _, b := range e.dir.Backends() {
		if b.Ejected {
			t.Errorf("backend %s ejected after a clean rolling restart: %+v", b.Addr, b)
		}
	}
}

var _ proxy.RetryPicker = (*director.Director)(nil)

// TestRetryAvoidsTriedBackend: a retry never goes back to the backend the
// call just tried, also with a Picker that is not a RetryPicker (it is
// asked again), and the picks not used are reported as CANCELLED.
func TestRetryAvoidsTriedBackend(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	dead, live := testkit.DeadAddr(t), e.backends[0].Addr()
	var n atomic.Int64
	var mu sync.Mutex
	outcomes := map[codes.Code]int{}
	// Two picks of three name the dead backend: without the exclusion
	// a call with one retry lands on it twice in a row.
	picker := proxy.PickerFunc(func(context.Context, string) (string, func(error), error) {
		addr := live
		if n.Add(1)%3 != 0 {
			addr = dead
		}
		return addr, func(err error) {
			mu.Lock()
			outcomes[status.Code(err)]++
			mu.Unlock()
		}, nil
	})
	srv, err := proxy.New(proxy.Config{Picker: picker, MaxRetries: 1, Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	ln := serveProxy(t, srv)
	client := testgrpc.NewTestServiceClient(e.dial(ln.Addr().String()))
	ctx := testkit.Context(t, 20*time.Second)
	for i := range 30 {
		if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
			t.Fatalf("call %d: %v (the retry went back to the refusing backend)", i, err)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if outcomes[codes.OK] != 30 || outcomes[codes.Canceled] == 0 || outcomes[codes.Unavailable] == 0 {
		t.Errorf("outcomes reported to done: %v, want 30 OK, some UNAVAILABLE (refused) and some CANCELLED (picks not used)", outcomes)
	}
}

// TestKilledAbruptly kills a backend (its connections closed with no
// GOAWAY, as after SIGKILL) under load, with no method opted in to
// retries: only the calls in flight on it fail, with UNAVAILABLE, and
// every call started after the kill succeeds elsewhere.
func TestKilledAbruptly(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 3})
	ctx := testkit.Context(t, 30*time.Second)
	slow := metadata.AppendToOutgoingContext(ctx, testserver.MetadataDelay, "5ms")
	victim := e.backends[2]
	var killedAt atomic.Int64 // UnixNano of the kill, 0 before
	var failedBefore, failedAfter, total atomic.Int64
	var g errgroup.Group
	const workers, perWorker = 8, 150
	for range workers {
		g.Go(func() error {
			for range perWorker {
				start := time.Now().UnixNano()
				_, err := e.client.EmptyCall(slow, &testgrpc.Empty{})
				total.Add(1)
				if err == nil {
					continue
				}
				if status.Code(err) != codes.Unavailable {
					return err
				}
				if k := killedAt.Load(); k != 0 && start > k {
					failedAfter.Add(1)
					t.Errorf("call started after the kill failed: %v", err)
				} else {
					failedBefore.Add(1)
				}
			}
			return nil
		})
	}
	testkit.WaitFor(ctx, t, "load on the victim", func() bool { return victim.Calls() > 20 })
	victim.Stop()
	// A call can still be sent on the victim's connection until the proxy
	// reads its end; whether it reached the victim's application cannot
	// be known then, so it fails, as it would on a direct connection. The
	// calls that must succeed are those started once the proxy knew.
	srv := e.srv.(*proxy.Server)
	testkit.WaitFor(ctx, t, "the proxy to drop its connections to the victim", func() bool { return srv.BackendConns(victim.Addr()) == 0 })
	killedAt.Store(time.Now().UnixNano())
	if err := g.Wait(); err != nil {
		t.Fatalf("a call failed with other than UNAVAILABLE: %v", err)
	}
	t.Logf("%d of %d calls failed (in flight on the killed backend)", failedBefore.Load(), total.Load())
	if n := failedBefore.Load(); n > workers {
		t.Errorf("%d calls failed, more than the %d that could be in flight", n, workers)
	}
}

// TestRestartCycles restarts backends gracefully many times in quick
// succession (grpc-go GracefulStop: GOAWAY 2^31-1 and PING, then GOAWAY
// with the real last stream id, in-flight calls finish, the connection
// closes; a new server on the same address at once) under unary load over
// one client connection, with no method opted in to retries. Every call
// must succeed: a stream the backend accepted is finished by it, and one
// it did not (sent after its GOAWAY, or never opened) goes elsewhere.
func TestRestartCycles(t *testing.T) {
	if testing.Short() {
		t.Skip("load run")
	}
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 3})
	ctx := testkit.Context(t, 120*time.Second)
	var r loadResult
	stop := make(chan struct{})
	wait := loadUntil(ctx, e, 16, 200000, stop, &r)
	waitLoadOnEvery(ctx, t, e, 20)
	const cycles = 100
	for i := range cycles {
		idx := i % len(e.backends)
		old := e.backends[idx]
		addr := old.Addr()
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := old.Shutdown(sctx)
		cancel()
		if err != nil {
			t.Fatalf("graceful stop of %s: %v", old.Name(), err)
		}
		ts, err := testserver.New(testserver.Config{Name: fmt.Sprintf("b%d-%d", idx, i), Logger: quietLog})
		if err != nil {
			t.Fatal(err)
		}
		if err := ts.Start(addr); err != nil {
			t.Fatalf("restart on %s: %v", addr, err)
		}
		t.Cleanup(ts.Stop)
		e.backends[idx] = ts
		// Calls land on the new server before the next restart.
		testkit.WaitFor(ctx, t, "the restarted backend to serve", func() bool { return ts.Calls() > 5 })
	}
	close(stop)
	wait()
	total, failed := r.total.Load(), r.failed.Load()
	t.Logf("%d graceful restarts: %d of %d calls failed", cycles, failed, total)
	for msg, n := range r.errs {
		t.Logf("  %d× %s", n, msg)
	}
	if failed != 0 {
		t.Errorf("%d calls failed across graceful restarts, want 0", failed)
	}
}

// stallingBackend is a raw HTTP/2 backend that completes the handshake,
// granting the proxy windows of 1 GiB so that nothing but the socket
// holds back what the proxy writes, and then never reads again. It waits
// on stop, closed at cleanup.
func stallingBackend(stop <-chan struct{}) func(net.Conn) {
	return func(nc net.Conn) {
		s, err := acceptH2(nc)
		if err != nil || s.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 30}) != nil ||
			s.fr.WriteWindowUpdate(0, 1<<30) != nil || s.flush() != nil {
			return
		}
		// Up to the acknowledgement of the proxy's SETTINGS.
		if s.serve(func(f http2.Frame) bool { sf, ok := f.(*http2.SettingsFrame); return !ok || sf.IsAck() }) != nil {
			return
		}
		<-stop
	}
}

// TestBackendStopsReading: a backend that accepts streams and then stops
// reading its connection. Client-streaming calls to it end with
// DEADLINE_EXCEEDED at their deadline; the request bytes the proxy holds
// for them stay within their stream windows however much the clients try
// to send; calls to another backend, over the same client connection and
// another, all succeed meanwhile; and the write timeout closes the
// stalled connection.
func TestBackendStopsReading(t *testing.T) {
	verifyNoLeaks(t)
	const writeTimeout = 3 * time.Second
	e := newEnv(t, envOpts{backends: 1})
	good := e.backends[0].Addr()
	stop := make(chan struct{})
	stalled := rawBackend(t, stallingBackend(stop))
	t.Cleanup(func() { close(stop) }) // runs before rawBackend's cleanup
	const streamInput = "/grpc.testing.TestService/StreamingInputCall"
	picker := proxy.PickerFunc(func(_ context.Context, method string) (string, func(error), error) {
		if method == streamInput {
			return stalled, nil, nil
		}
		return good, nil, nil
	})
	srv, err := proxy.New(proxy.Config{Picker: picker, Logger: quietLog, WriteTimeout: writeTimeout})
	if err != nil {
		t.Fatal(err)
	}
	ln := serveProxy(t, srv)
	stalledClient := testgrpc.NewTestServiceClient(e.dial(ln.Addr().String()))
	otherClient := testgrpc.NewTestServiceClient(e.dial(ln.Addr().String()))
	ctx := testkit.Context(t, 60*time.Second)

	const calls, deadline = 4, 1500 * time.Millisecond
	var sent atomic.Int64
	var g errgroup.Group
	for range calls {
		g.Go(func() error {
			cctx, cancel := context.WithTimeout(ctx, deadline)
			defer cancel()
			start := time.Now()
			st, err := stalledClient.StreamingInputCall(cctx)
			if err == nil {
				msg := &testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: make([]byte, 64<<10)}}
				for i := 0; i < 100000 && st.Send(msg) == nil; i++ {
					sent.Add(64 << 10)
				}
				_, err = st.CloseAndRecv()
			}
			took := time.Since(start)
			if status.Code(err) != codes.DeadlineExceeded || took > deadline+time.Second {
				return fmt.Errorf("call to the stalled backend: %v after %v, want DEADLINE_EXCEEDED at %v", err, took, deadline)
			}
			return nil
		})
	}
	// Meanwhile: calls elsewhere succeed, from the stalled calls' client
	// connection and from another, and the proxy's held request bytes
	// stay within the stalled streams' windows.
	stalledDone := make(chan error, 1)
	go func() { stalledDone <- g.Wait() }()
	var maxHeld int64
	var good1, good2 int
	for i := 0; i < 100000 && len(stalledDone) == 0; i++ {
		if _, err := stalledClient.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
			t.Fatalf("call to the good backend beside the stalled ones: %v", err)
		}
		good1++
		if _, err := otherClient.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
			t.Fatalf("call to the good backend from another client: %v", err)
		}
		good2++
		maxHeld = max(maxHeld, srv.MaxHeldBytes())
	}
	if err := <-stalledDone; err != nil {
		t.Error(err)
	}
	bound := int64(calls * proxy.DefaultStreamWindow)
	t.Logf("clients sent %d MiB toward the stalled backend; the proxy held at most %d KiB (bound %d KiB); %d+%d calls elsewhere succeeded",
		sent.Load()>>20, maxHeld>>10, bound>>10, good1, good2)
	if maxHeld > bound {
		t.Errorf("the proxy held %d request bytes for the stalled backend, want at most %d (the streams' windows)", maxHeld, bound)
	}
	// Nothing else closes a backend connection: no idle timeout, no GOAWAY.
	wctx, cancel := context.WithTimeout(ctx, writeTimeout+15*time.Second)
	defer cancel()
	testkit.WaitFor(wctx, t, "the write timeout to close the stalled connection", func() bool { return srv.BackendConns(stalled) == 0 })
	if _, err := otherClient.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Errorf("after the stall: %v", err)
	}
}

// TestKilledBackendBackBeforeEjectionEnds: a backend killed under load
// (connections closed with no GOAWAY, as after SIGKILL) is ejected for its
// connection failures; restarted on the same address, it is picked again
// as soon as the director's reconnect probe completes a handshake with
// it, not when its ejection (a minute here) runs out.
func TestKilledBackendBackBeforeEjectionEnds(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 3, dcfg: func(c *director.Config) { c.BaseEjection = time.Minute }})
	ctx := testkit.Context(t, 60*time.Second)
	victim := e.backends[2]
	addr := victim.Addr()
	// Calls of 20 ms from 24 workers: several are in flight on the victim
	// when it dies, and their loss alone makes the run that ejects it,
	// as in loadtest/bench/rolling.sh's kill.
	slow := metadata.AppendToOutgoingContext(ctx, testserver.MetadataDelay, "20ms")
	stop := make(chan struct{})
	var g errgroup.Group
	for range 24 {
		g.Go(func() error {
			for {
				select {
				case <-stop:
					return nil
				default:
				}
				cctx, cancel := context.WithTimeout(slow, 5*time.Second)
				_, err := e.client.EmptyCall(cctx, &testgrpc.Empty{})
				cancel()
				if err != nil && status.Code(err) != codes.Unavailable {
					return err
				}
			}
		})
	}
	defer func() {
		close(stop)
		if err := g.Wait(); err != nil {
			t.Errorf("a call failed with other than UNAVAILABLE: %v", err)
		}
	}()
	ejected := func() bool {
		for _, b := range e.dir.Backends() {
			if b.Addr == addr {
				return b.Ejected
			}
		}
		return false
	}
	testkit.WaitFor(ctx, t, "load on the victim", func() bool { return victim.Calls() > 20 })
	victim.Stop()
	testkit.WaitFor(ctx, t, "the killed backend ejected", ejected)
	back, err := testserver.New(testserver.Config{Name: "back", Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	if err := back.Start(addr); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(back.Stop)
	start := time.Now()
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	testkit.WaitFor(wctx, t, "the restarted backend picked again", func() bool { return !ejected() && back.Calls() > 0 })
	t.Logf("restarted backend served calls %v after it listened again (ejection %v)", time.Since(start), time.Minute)
}
