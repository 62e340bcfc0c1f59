package proxy_test

import (
	"context"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestOverLimitAtHandshakeWaitsBounded: three calls take slots on a new
// backend connection on the assumed limit, before the backend's SETTINGS;
// the SETTINGS then say MAX_CONCURRENT_STREAMS 1, and the one call opened
// hangs on the backend. The two left over wait for a slot as calls at the
// connection cap do: counted as waiting, and failing with UNAVAILABLE at
// BackendPendingTimeout, not left waiting as long as the backend's call
// runs (before: uncounted, until the client's deadline). With the wait
// queue off they fail at once with UNAVAILABLE (the connection cap is 1,
// so no other connection can take them). The opened call succeeds once
// the backend answers, and nothing stays pending.
func TestOverLimitAtHandshakeWaitsBounded(t *testing.T) {
	const pendingTimeout = 1500 * time.Millisecond
	for _, queue := range []bool{true, false} {
		t.Run(map[bool]string{true: "queue", false: "noqueue"}[queue], func(t *testing.T) {
			verifyNoLeaks(t)
			gate := make(chan struct{})
			b := &settingsBackend{gate: gate}
			addr := rawBackend(t, b.serve)
			e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
				c.MaxBackendConns = 1
				c.BackendPendingTimeout = pendingTimeout
				c.HandshakeTimeout = 20 * time.Second // the calls wait for the handshake, not elsewhere
				if !queue {
					c.MaxBackendPending = -1
				}
			}})
			e.setBackends(addr)
			srv := e.srv.(*proxy.Server)
			ctx := testkit.Context(t, 30*time.Second)
			hang := metadata.AppendToOutgoingContext(ctx, "x-hang", "1")
			type result struct {
				err error
				end time.Time
			}
			res := make(chan result, 3)
			var start time.Time
			for range 3 {
				go func() {
					cctx, cancel := context.WithTimeout(hang, 10*time.Second)
					defer cancel()
					_, err := e.client.EmptyCall(cctx, &testgrpc.Empty{})
					res <- result{err, time.Now()}
				}()
			}
			testkit.WaitFor(ctx, t, "three calls waiting for the handshake", func() bool { return srv.PendingAttempts() == 3 })
			start = time.Now()
			close(gate)
			if queue {
				testkit.WaitFor(ctx, t, "two calls counted as waiting", func() bool { return srv.Waiting() == 2 })
			}
			for range 2 {
				r := <-res
				at := r.end.Sub(start)
				st := status.Convert(r.err)
				want := "every connection is at its stream limit"
				if queue {
					want = "no slot came free within"
				}
				if st.Code() != codes.Unavailable || !strings.Contains(st.Message(), want) {
					t.Errorf("call over the backend's limit: %v after %v, want UNAVAILABLE %q", r.err, at, want)
				}
				if at > 8*time.Second {
					t.Errorf("call over the backend's limit ended after %v, not within its bound", at)
				}
				t.Logf("over the limit: %v after %v", st.Code(), at)
			}
			testkit.WaitFor(ctx, t, "the held call on the backend", func() bool {
				b.mu.Lock()
				defer b.mu.Unlock()
				return len(b.held) == 1
			})
			if n := srv.Waiting(); n != 0 {
				t.Errorf("%d calls still counted waiting", n)
			}
			b.release()
			if r := <-res; r.err != nil {
				t.Errorf("the call the backend took: %v", r.err)
			}
			testkit.WaitFor(ctx, t, "nothing pending", func() bool { return srv.Waiting() == 0 && srv.PendingAttempts() == 0 })
		})
	}
}

// TestOverLimitAfterReserveWaitsBounded: a call takes a slot on a new
// backend connection on the assumed limit, and the backend's SETTINGS
// (MAX_CONCURRENT_STREAMS 1) are applied, with another call opened on
// the one slot, before the call is queued on the connection (the
// afterReserve hook holds it there). It is then past the backend's limit
// as the calls onPeerSettings found pending are, and waits as they do:
// counted as waiting and failing with UNAVAILABLE at
// BackendPendingTimeout (before: uncounted, with no bound, until the
// client's deadline); with the wait queue off it fails at once.
func TestOverLimitAfterReserveWaitsBounded(t *testing.T) {
	const pendingTimeout = 1500 * time.Millisecond
	for _, queue := range []bool{true, false} {
		t.Run(map[bool]string{true: "queue", false: "noqueue"}[queue], func(t *testing.T) {
			verifyNoLeaks(t)
			unsettled := proxy.UnsettledStreams()
			gate := make(chan struct{})
			b := &settingsBackend{gate: gate}
			addr := rawBackend(t, b.serve)
			ctx := testkit.Context(t, 30*time.Second)
			heldOne := func() bool {
				b.mu.Lock()
				defer b.mu.Unlock()
				return len(b.held) == 1
			}
			var reserved atomic.Int32
			e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
				c.MaxBackendConns = 1
				c.BackendPendingTimeout = pendingTimeout
				c.HandshakeTimeout = 20 * time.Second
				if !queue {
					c.MaxBackendPending = -1
				}
			}, hook: func(s *proxy.Server) {
				proxy.SetAfterReserve(s, func(string) {
					if reserved.Add(1) != 2 {
						return
					}
					// The second call's slot is reserved on the assumed
					// limit: the backend's SETTINGS arrive, and the first
					// call takes the one slot, before it is queued.
					close(gate)
					waitInHook(t, "the first call on the backend", heldOne)
				})
			}})
			e.setBackends(addr)
			srv := e.srv.(*proxy.Server)
			hang := metadata.AppendToOutgoingContext(ctx, "x-hang", "1")
			first := make(chan error, 1)
			go func() {
				_, err := e.client.EmptyCall(hang, &testgrpc.Empty{})
				first <- err
			}()
			testkit.WaitFor(ctx, t, "the first call waiting for the handshake", func() bool { return srv.PendingAttempts() == 1 })
			second := testgrpc.NewTestServiceClient(e.dial(e.addr))
			start := time.Now()
			cctx, cancel := context.WithTimeout(hang, 10*time.Second)
			defer cancel()
			done := make(chan error, 1)
			go func() {
				_, err := second.EmptyCall(cctx, &testgrpc.Empty{})
				done <- err
			}()
			if queue {
				testkit.WaitFor(ctx, t, "the second call counted as waiting", func() bool { return srv.Waiting() == 1 })
			}
			err := <-done
			at := time.Since(start)
			st := status.Convert(err)
			want := "every connection is at its stream limit"
			if queue {
				want = "no slot came free within"
			}
			if st.Code() != codes.Unavailable || !strings.Contains(st.Message(), want) {
				t.Errorf("call over the backend's limit: %v after %v, want UNAVAILABLE %q", err, at, want)
			}
			if at > 8*time.Second {
				t.Errorf("call over the backend's limit ended after %v, not within its bound", at)
			}
			if n := srv.Waiting(); n != 0 {
				t.Errorf("%d calls still counted waiting", n)
			}
			b.release()
			if err := <-first; err != nil {
				t.Errorf("the call the backend took: %v", err)
			}
			testkit.WaitFor(ctx, t, "nothing pending", func() bool { return srv.Waiting() == 0 && srv.PendingAttempts() == 0 })
			checkSettled(t, unsettled)
		})
	}
}

// TestOverLimitAtHandshakeTakesNewConn: two calls take slots on a new
// backend connection on the assumed limit, before the backend's SETTINGS
// say MAX_CONCURRENT_STREAMS 1; the first opened hangs on the backend.
// The pool may open another connection to the backend (MaxBackendConns
// 2), so the second call goes there and is answered at once, as a call
// picked after the SETTINGS would be (before: it waited on the full
// connection for BackendPendingTimeout, here past the client's
// deadline). Nothing stays waiting or pending.
func TestOverLimitAtHandshakeTakesNewConn(t *testing.T) {
	verifyNoLeaks(t)
	unsettled := proxy.UnsettledStreams()
	gate := make(chan struct{})
	b := &settingsBackend{gate: gate}
	addr := rawBackend(t, b.serve)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		c.MaxBackendConns = 2
		c.BackendPendingTimeout = 20 * time.Second
		c.HandshakeTimeout = 20 * time.Second
	}})
	e.setBackends(addr)
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	hctx, cancelHang := context.WithCancel(metadata.AppendToOutgoingContext(ctx, "x-hang", "1"))
	defer cancelHang()
	first := make(chan error, 1)
	go func() {
		_, err := e.client.EmptyCall(hctx, &testgrpc.Empty{})
		first <- err
	}()
	testkit.WaitFor(ctx, t, "the first call waiting for the handshake", func() bool { return srv.PendingAttempts() == 1 })
	cctx, cancel := context.WithTimeout(ctx, 8*time.Second)
	defer cancel()
	second := make(chan error, 1)
	go func() {
		_, err := e.client.EmptyCall(cctx, &testgrpc.Empty{})
		second <- err
	}()
	testkit.WaitFor(ctx, t, "both calls waiting for the handshake", func() bool { return srv.PendingAttempts() == 2 })
	start := time.Now()
	close(gate)
	if err := <-second; err != nil {
		t.Errorf("the call over the first connection's limit: %v after %v, want it served on another connection", err, time.Since(start))
	}
	if n := srv.BackendConns(addr); n != 2 {
		t.Errorf("%d connections to the backend, want 2", n)
	}
	cancelHang() // the first connection's framer is no longer the backend's last
	if err := <-first; status.Code(err) != codes.Canceled {
		t.Errorf("the held call: %v, want CANCELLED", err)
	}
	testkit.WaitFor(ctx, t, "nothing pending", func() bool { return srv.Waiting() == 0 && srv.PendingAttempts() == 0 })
	checkSettled(t, unsettled)
}

// TestOverLimitAfterReserveTakesNewConn: as
// TestOverLimitAfterReserveWaitsBounded, the second call's slot is
// reserved on the assumed limit and the backend's SETTINGS
// (MAX_CONCURRENT_STREAMS 1) applied, the first call on the one slot,
// before the call is queued; the pool may open a second connection
// (MaxBackendConns 2). The call is picked again and served there,
// opening that connection (before: it waited on the full one).
func TestOverLimitAfterReserveTakesNewConn(t *testing.T) {
	verifyNoLeaks(t)
	unsettled := proxy.UnsettledStreams()
	gate := make(chan struct{})
	b := &settingsBackend{gate: gate}
	addr := rawBackend(t, b.serve)
	ctx := testkit.Context(t, 30*time.Second)
	var reserved atomic.Int32
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		c.MaxBackendConns = 2
		c.BackendPendingTimeout = 20 * time.Second
		c.HandshakeTimeout = 20 * time.Second
	}, hook: func(s *proxy.Server) {
		proxy.SetAfterReserve(s, func(string) {
			if reserved.Add(1) != 2 {
				return
			}
			close(gate)
			waitInHook(t, "the first call on the backend", func() bool {
				b.mu.Lock()
				defer b.mu.Unlock()
				return len(b.held) == 1
			})
		})
	}})
	e.setBackends(addr)
	srv := e.srv.(*proxy.Server)
	hctx, cancelHang := context.WithCancel(metadata.AppendToOutgoingContext(ctx, "x-hang", "1"))
	defer cancelHang()
	first := make(chan error, 1)
	go func() {
		_, err := e.client.EmptyCall(hctx, &testgrpc.Empty{})
		first <- err
	}()
	testkit.WaitFor(ctx, t, "the first call waiting for the handshake", func() bool { return srv.PendingAttempts() == 1 })
	second := testgrpc.NewTestServiceClient(e.dial(e.addr))
	cctx, cancel := context.WithTimeout(ctx, 8*time.Second)
	defer cancel()
	if _, err := second.EmptyCall(cctx, &testgrpc.Empty{}); err != nil {
		t.Errorf("the call past the first connection's limit: %v, want it served on another connection", err)
	}
	if n := srv.BackendConns(addr); n != 2 {
		t.Errorf("%d connections to the backend, want 2", n)
	}
	cancelHang()
	if err := <-first; status.Code(err) != codes.Canceled {
		t.Errorf("the held call: %v, want CANCELLED", err)
	}
	testkit.WaitFor(ctx, t, "nothing pending", func() bool { return srv.Waiting() == 0 && srv.PendingAttempts() == 0 })
	checkSettled(t, unsettled)
}

// TestRaisedLimitTakesSiblingsWaiters: two connections to a backend
// (MaxBackendConns 2) at its one stream each carry a long call, and two
// more calls wait for a slot. The backend raises the second
// connection's SETTINGS_MAX_CONCURRENT_STREAMS to 3: its slots take the
// calls waiting on either connection, as a slot freed there does
// (rebalance), not only those waiting on it (before: a call waiting on
// the first connection stayed there, up to BackendPendingTimeout, beside
// the free slot).
func TestRaisedLimitTakesSiblingsWaiters(t *testing.T) {
	verifyNoLeaks(t)
	unsettled := proxy.UnsettledStreams()
	b := &settingsBackend{}
	addr := rawBackend(t, b.serve)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		c.MaxBackendConns = 2
		c.MaxBackendPending = 8
		c.BackendPendingTimeout = 20 * time.Second
	}})
	e.setBackends(addr)
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	held := func() int {
		b.mu.Lock()
		defer b.mu.Unlock()
		return len(b.held)
	}
	hctx, cancelHang := context.WithCancel(metadata.AppendToOutgoingContext(ctx, "x-hang", "1"))
	defer cancelHang()
	errs := make(chan error, 4)
	call := func() {
		go func() {
			_, err := e.client.EmptyCall(hctx, &testgrpc.Empty{})
			errs <- err
		}()
	}
	call()
	testkit.WaitFor(ctx, t, "the first call on the backend", func() bool { return held() == 1 })
	call()
	testkit.WaitFor(ctx, t, "the second call on the backend's second connection", func() bool {
		return held() == 2 && srv.BackendConns(addr) == 2
	})
	call()
	call()
	testkit.WaitFor(ctx, t, "two calls waiting", func() bool { return srv.Waiting() == 2 })
	b.set(3) // on the connection accepted last, the second
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	testkit.WaitFor(wctx, t, "every call on the backend, none waiting", func() bool { return held() == 4 && srv.Waiting() == 0 })
	cancelHang()
	for range 4 {
		if err := <-errs; status.Code(err) != codes.Canceled {
			t.Errorf("held call: %v, want CANCELLED", err)
		}
	}
	testkit.WaitFor(ctx, t, "nothing pending", func() bool { return srv.Waiting() == 0 && srv.PendingAttempts() == 0 })
	checkSettled(t, unsettled)
}

// TestOverLimitWaitersSurviveConnLoss: three calls take slots on a new
// backend connection before its SETTINGS (MAX_CONCURRENT_STREAMS 1); the
// first opened hangs, the other two wait for a slot (MaxBackendConns 1).
// The backend then closes the connection: the opened call fails
// UNAVAILABLE, and the two that waited, never sent, go to a new
// connection and are served. Nothing stays waiting, pending, or
// referenced.
func TestOverLimitWaitersSurviveConnLoss(t *testing.T) {
	verifyNoLeaks(t)
	unsettled := proxy.UnsettledStreams()
	gate := make(chan struct{})
	b := &settingsBackend{gate: gate}
	var mu sync.Mutex
	var first net.Conn
	addr := rawBackend(t, func(nc net.Conn) {
		mu.Lock()
		if first == nil {
			first = nc
		}
		mu.Unlock()
		b.serve(nc)
	})
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		c.MaxBackendConns = 1
		c.BackendPendingTimeout = 20 * time.Second
		c.HandshakeTimeout = 20 * time.Second
	}})
	e.setBackends(addr)
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	held := make(chan error, 1)
	go func() {
		_, err := e.client.EmptyCall(metadata.AppendToOutgoingContext(cctx, "x-hang", "1"), &testgrpc.Empty{})
		held <- err
	}()
	testkit.WaitFor(ctx, t, "the first call waiting for the handshake", func() bool { return srv.PendingAttempts() == 1 })
	waiters := make(chan error, 2)
	for range 2 {
		go func() {
			_, err := e.client.EmptyCall(cctx, &testgrpc.Empty{})
			waiters <- err
		}()
	}
	testkit.WaitFor(ctx, t, "three calls waiting for the handshake", func() bool { return srv.PendingAttempts() == 3 })
	close(gate)
	testkit.WaitFor(ctx, t, "two calls waiting for a slot", func() bool { return srv.Waiting() == 2 })
	testkit.WaitFor(ctx, t, "the first call on the backend", func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		return len(b.held) == 1
	})
	mu.Lock()
	first.Close()
	mu.Unlock()
	if err := <-held; status.Code(err) != codes.Unavailable {
		t.Errorf("the call on the lost connection: %v, want UNAVAILABLE", err)
	}
	for range 2 {
		if err := <-waiters; err != nil {
			t.Errorf("a call that waited, never sent: %v, want it served on a new connection", err)
		}
	}
	testkit.WaitFor(ctx, t, "nothing pending", func() bool { return srv.Waiting() == 0 && srv.PendingAttempts() == 0 })
	checkSettled(t, unsettled)
}

// TestOverLimitDoneOnce: eight calls take slots on a new backend
// connection before its SETTINGS say MAX_CONCURRENT_STREAMS 1, each
// hanging on the backend once sent and ending at its deadline, 0.2 to
// 3 s; two are cancelled by their clients while they wait. Those past
// the limit are picked again (a second connection takes one, the rest
// wait, bounded by BackendPendingTimeout), some ending while they wait.
// Every pick's done is called exactly once, and nothing stays waiting,
// pending or referenced.
func TestOverLimitDoneOnce(t *testing.T) {
	verifyNoLeaks(t)
	unsettled := proxy.UnsettledStreams()
	gate := make(chan struct{})
	b := &settingsBackend{gate: gate}
	addr := rawBackend(t, b.serve)
	var pk *onceCheckPicker
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		pk = &onceCheckPicker{next: c.Picker}
		c.Picker = pk
		c.MaxBackendConns = 2
		c.MaxBackendPending = 8
		c.BackendPendingTimeout = 2 * time.Second
		c.HandshakeTimeout = 20 * time.Second
	}})
	e.setBackends(addr)
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	hang := metadata.AppendToOutgoingContext(ctx, "x-hang", "1")
	const n = 8
	var wg sync.WaitGroup
	cancels := make([]context.CancelFunc, n)
	for i := range n {
		cctx, cancel := context.WithTimeout(hang, time.Duration(200+400*i)*time.Millisecond)
		cancels[i] = cancel
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer cancel()
			_, err := e.client.EmptyCall(cctx, &testgrpc.Empty{})
			if c := status.Code(err); c != codes.DeadlineExceeded && c != codes.Canceled && c != codes.Unavailable {
				t.Errorf("call %d: %v", i, err)
			}
		}()
	}
	testkit.WaitFor(ctx, t, "the calls waiting for the handshake", func() bool { return srv.PendingAttempts() == n })
	close(gate)
	testkit.WaitFor(ctx, t, "calls waiting for a slot", func() bool { return srv.Waiting() > 0 })
	cancels[5]()
	cancels[6]()
	wg.Wait()
	testkit.WaitFor(ctx, t, "nothing pending", func() bool { return srv.Waiting() == 0 && srv.PendingAttempts() == 0 })
	testkit.WaitFor(ctx, t, "every pick done", func() bool { return pk.dones.Load()+pk.twice.Load() >= pk.picks.Load() })
	if tw, d, p := pk.twice.Load(), pk.dones.Load(), pk.picks.Load(); tw != 0 || d != p {
		t.Errorf("%d picks, %d dones, %d called again", p, d, tw)
	}
	t.Logf("%d picks for %d calls", pk.picks.Load(), n)
	checkSettled(t, unsettled)
}

// TestOverLimitWaitersAtShutdown: three calls take slots on a new
// backend connection before its SETTINGS say MAX_CONCURRENT_STREAMS 1;
// the one sent hangs, the two past the limit wait for a slot
// (MaxBackendConns 1, BackendPendingTimeout 20 s). Shutdown, bounded at
// 500 ms, ends them all with a status the client sees (none waits to its
// own deadline), returns in time, and leaves nothing waiting, pending or
// referenced.
func TestOverLimitWaitersAtShutdown(t *testing.T) {
	verifyNoLeaks(t)
	unsettled := proxy.UnsettledStreams()
	gate := make(chan struct{})
	b := &settingsBackend{gate: gate}
	addr := rawBackend(t, b.serve)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		c.MaxBackendConns = 1
		c.BackendPendingTimeout = 20 * time.Second
		c.HandshakeTimeout = 20 * time.Second
	}})
	e.setBackends(addr)
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	cctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(ctx, "x-hang", "1"), 15*time.Second)
	defer cancel()
	errs := make(chan error, 3)
	for range 3 {
		go func() {
			_, err := e.client.EmptyCall(cctx, &testgrpc.Empty{})
			errs <- err
		}()
	}
	testkit.WaitFor(ctx, t, "three calls waiting for the handshake", func() bool { return srv.PendingAttempts() == 3 })
	close(gate)
	testkit.WaitFor(ctx, t, "two calls waiting for a slot", func() bool { return srv.Waiting() == 2 })
	start := time.Now()
	sctx, scancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer scancel()
	err := srv.Shutdown(sctx)
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("Shutdown took %v (%v)", took, err)
	}
	for range 3 {
		select {
		case err := <-errs:
			if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "shutting down") {
				t.Errorf("call at shutdown: %v, want UNAVAILABLE saying the server is shutting down", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("a call did not end at shutdown")
		}
	}
	if n, p := srv.Waiting(), srv.PendingAttempts(); n != 0 || p != 0 {
		t.Errorf("%d waiting, %d pending after Shutdown", n, p)
	}
	checkSettled(t, unsettled)
}

// waitInHook waits, up to 10 s, for cond in a hook the proxy calls on its
// own goroutine, under its locks: a test failure there must not end that
// goroutine (t.Fatal would, and hang the test), so it is reported and the
// hook returns.
func waitInHook(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Errorf("timed out waiting for %s", what)
			return
		}
		<-tick.C
	}
}
