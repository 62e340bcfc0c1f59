package proxy_test

import (
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
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
			le := newLimitEnv(t, limitOpts{gated: true, conns: 1, wait: pendingTimeout, queueOff: !queue})
			type result struct {
				err error
				end time.Time
			}
			res := make(chan result, 3)
			for range 3 {
				go func() {
					cctx, cancel := context.WithTimeout(hanging(le.ctx), 10*time.Second)
					defer cancel()
					_, err := le.client.EmptyCall(cctx, &testgrpc.Empty{})
					res <- result{err, time.Now()}
				}()
			}
			le.waitPending("three calls waiting for the handshake", 3)
			start := time.Now()
			close(le.gate)
			if queue {
				le.waitWaiting("two calls counted as waiting", 2)
			}
			for range 2 {
				r := <-res
				at := r.end.Sub(start)
				checkOverLimitEnd(t, queue, r.err, at)
				t.Logf("over the limit: %v after %v", status.Code(r.err), at)
			}
			le.waitHeld("the held call on the backend", 1)
			if n := le.srv.Waiting(); n != 0 {
				t.Errorf("%d calls still counted waiting", n)
			}
			le.b.release()
			if r := <-res; r.err != nil {
				t.Errorf("the call the backend took: %v", r.err)
			}
			le.waitNothingPending()
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
			le := newLimitEnv(t, limitOpts{gated: true, conns: 1, wait: pendingTimeout, queueOff: !queue,
				settleAtSecondReserve: true})
			hang := hanging(le.ctx)
			first := make(chan error, 1)
			goEmptyCall(hang, le.client, first)
			le.waitPending("the first call waiting for the handshake", 1)
			second := testgrpc.NewTestServiceClient(le.dial(le.addr))
			start := time.Now()
			cctx, cancel := context.WithTimeout(hang, 10*time.Second)
			defer cancel()
			done := make(chan error, 1)
			goEmptyCall(cctx, second, done)
			if queue {
				le.waitWaiting("the second call counted as waiting", 1)
			}
			err := <-done
			checkOverLimitEnd(t, queue, err, time.Since(start))
			if n := le.srv.Waiting(); n != 0 {
				t.Errorf("%d calls still counted waiting", n)
			}
			le.b.release()
			if err := <-first; err != nil {
				t.Errorf("the call the backend took: %v", err)
			}
			le.waitNothingPending()
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
	le := newLimitEnv(t, limitOpts{gated: true, conns: 2, wait: 20 * time.Second})
	hctx, cancelHang := context.WithCancel(hanging(le.ctx))
	defer cancelHang()
	first := make(chan error, 1)
	goEmptyCall(hctx, le.client, first)
	le.waitPending("the first call waiting for the handshake", 1)
	cctx, cancel := context.WithTimeout(le.ctx, 8*time.Second)
	defer cancel()
	second := make(chan error, 1)
	goEmptyCall(cctx, le.client, second)
	le.waitPending("both calls waiting for the handshake", 2)
	start := time.Now()
	close(le.gate)
	if err := <-second; err != nil {
		t.Errorf("the call over the first connection's limit: %v after %v, want it served on another connection", err, time.Since(start))
	}
	if n := le.srv.BackendConns(le.backend); n != 2 {
		t.Errorf("%d connections to the backend, want 2", n)
	}
	cancelHang() // the first connection's framer is no longer the backend's last
	if err := <-first; status.Code(err) != codes.Canceled {
		t.Errorf("the held call: %v, want CANCELLED", err)
	}
	le.waitNothingPending()
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
	le := newLimitEnv(t, limitOpts{gated: true, conns: 2, wait: 20 * time.Second, settleAtSecondReserve: true})
	hctx, cancelHang := context.WithCancel(hanging(le.ctx))
	defer cancelHang()
	first := make(chan error, 1)
	goEmptyCall(hctx, le.client, first)
	le.waitPending("the first call waiting for the handshake", 1)
	second := testgrpc.NewTestServiceClient(le.dial(le.addr))
	cctx, cancel := context.WithTimeout(le.ctx, 8*time.Second)
	defer cancel()
	if _, err := second.EmptyCall(cctx, &testgrpc.Empty{}); err != nil {
		t.Errorf("the call past the first connection's limit: %v, want it served on another connection", err)
	}
	if n := le.srv.BackendConns(le.backend); n != 2 {
		t.Errorf("%d connections to the backend, want 2", n)
	}
	cancelHang()
	if err := <-first; status.Code(err) != codes.Canceled {
		t.Errorf("the held call: %v, want CANCELLED", err)
	}
	le.waitNothingPending()
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
	le := newLimitEnv(t, limitOpts{conns: 2, maxPending: 8, wait: 20 * time.Second})
	hctx, cancelHang := context.WithCancel(hanging(le.ctx))
	defer cancelHang()
	errs := make(chan error, 4)
	call := func() { goEmptyCall(hctx, le.client, errs) }
	call()
	le.waitHeld("the first call on the backend", 1)
	call()
	testkit.WaitFor(le.ctx, t, "the second call on the backend's second connection", func() bool {
		return le.b.heldCalls() == 2 && le.srv.BackendConns(le.backend) == 2
	})
	call()
	call()
	le.waitWaiting("two calls waiting", 2)
	le.b.set(3) // on the connection accepted last, the second
	wctx, cancel := context.WithTimeout(le.ctx, 5*time.Second)
	defer cancel()
	testkit.WaitFor(wctx, t, "every call on the backend, none waiting", func() bool { return le.b.heldCalls() == 4 && le.srv.Waiting() == 0 })
	cancelHang()
	for range 4 {
		if err := <-errs; status.Code(err) != codes.Canceled {
			t.Errorf("held call: %v, want CANCELLED", err)
		}
	}
	le.waitNothingPending()
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
	var mu sync.Mutex
	var first net.Conn
	le := newLimitEnv(t, limitOpts{gated: true, conns: 1, wait: 20 * time.Second, onConn: func(nc net.Conn) {
		mu.Lock()
		if first == nil {
			first = nc
		}
		mu.Unlock()
	}})
	cctx, cancel := context.WithTimeout(le.ctx, 10*time.Second)
	defer cancel()
	held := make(chan error, 1)
	goEmptyCall(hanging(cctx), le.client, held)
	le.waitPending("the first call waiting for the handshake", 1)
	waiters := make(chan error, 2)
	for range 2 {
		goEmptyCall(cctx, le.client, waiters)
	}
	le.waitPending("three calls waiting for the handshake", 3)
	close(le.gate)
	le.waitWaiting("two calls waiting for a slot", 2)
	le.waitHeld("the first call on the backend", 1)
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
	le.waitNothingPending()
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
	le := newLimitEnv(t, limitOpts{gated: true, conns: 2, maxPending: 8, wait: 2 * time.Second, checkOnce: true})
	hang := hanging(le.ctx)
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
			_, err := le.client.EmptyCall(cctx, &testgrpc.Empty{})
			if c := status.Code(err); c != codes.DeadlineExceeded && c != codes.Canceled && c != codes.Unavailable {
				t.Errorf("call %d: %v", i, err)
			}
		}()
	}
	le.waitPending("the calls waiting for the handshake", n)
	close(le.gate)
	testkit.WaitFor(le.ctx, t, "calls waiting for a slot", func() bool { return le.srv.Waiting() > 0 })
	cancels[5]()
	cancels[6]()
	wg.Wait()
	le.waitNothingPending()
	le.pk.check(le.ctx, t)
	t.Logf("%d picks for %d calls", le.pk.picks.Load(), n)
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
	le := newLimitEnv(t, limitOpts{gated: true, conns: 1, wait: 20 * time.Second})
	cctx, cancel := context.WithTimeout(hanging(le.ctx), 15*time.Second)
	defer cancel()
	errs := make(chan error, 3)
	for range 3 {
		goEmptyCall(cctx, le.client, errs)
	}
	le.waitPending("three calls waiting for the handshake", 3)
	close(le.gate)
	le.waitWaiting("two calls waiting for a slot", 2)
	start := time.Now()
	sctx, scancel := context.WithTimeout(le.ctx, 500*time.Millisecond)
	defer scancel()
	err := le.srv.Shutdown(sctx)
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
	if n, p := le.srv.Waiting(), le.srv.PendingAttempts(); n != 0 || p != 0 {
		t.Errorf("%d waiting, %d pending after Shutdown", n, p)
	}
	checkSettled(t, unsettled)
}
