package proxy_test

import (
	"context"
	"fmt"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// oneSlotEnv is n backends that take one stream at a time
// (MAX_CONCURRENT_STREAMS 1) behind one backend connection each
// (MaxBackendConns 1), calls waiting up to wait for a slot.
func oneSlotEnv(t *testing.T, n int, wait time.Duration, pcfg func(*proxy.Config)) *env {
	return newEnv(t, envOpts{backends: n,
		tscfg: func(i int, c *testserver.Config) {
			c.ServerOptions = append(c.ServerOptions, grpc.MaxConcurrentStreams(1))
		},
		pcfg: func(c *proxy.Config) {
			c.MaxBackendConns = 1
			c.MaxBackendPending = 8
			c.BackendPendingTimeout = wait
			if pcfg != nil {
				pcfg(c)
			}
		},
	})
}

// hangOn starts a call that hangs on the backend until the returned
// cancel, and waits until it is on ts.
func hangOn(ctx context.Context, t *testing.T, e *env, ts *testserver.Server) (cancel func(), done *sync.WaitGroup) {
	t.Helper()
	hang, cancel := context.WithCancel(metadata.AppendToOutgoingContext(ctx, testserver.MetadataHang, "1"))
	done = new(sync.WaitGroup)
	want := ts.InFlight() + 1
	done.Add(1)
	go func() { defer done.Done(); e.client.EmptyCall(hang, &testgrpc.Empty{}) }()
	testkit.WaitFor(ctx, t, "the hanging call on its backend", func() bool { return ts.InFlight() == want })
	return cancel, done
}

// TestWaitingCallLeavesRemovedBackend: a call waiting for a slot on a
// backend that leaves the set (RetainBackends) goes to a backend of the
// new set, as a call waiting for a GOAWAY'd connection does, rather than
// wait for a slot on the removed backend (or fail when
// BackendPendingTimeout passes while it still carries its long calls).
func TestWaitingCallLeavesRemovedBackend(t *testing.T) {
	unsettled := proxy.UnsettledStreams()
	defer checkSettled(t, unsettled)
	verifyNoLeaks(t)
	e := oneSlotEnv(t, 2, 2*time.Second, nil)
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	gone, kept := e.backends[0], e.backends[1]
	e.setBackends(gone.Addr())
	srv.RetainBackends([]string{gone.Addr()})
	if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil { // learns its SETTINGS
		t.Fatal(err)
	}
	release, hung := hangOn(ctx, t, e, gone)
	defer hung.Wait()
	defer release()

	res := make(chan error, 1)
	go func() {
		_, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
		res <- err
	}()
	testkit.WaitFor(ctx, t, "a call waiting", func() bool { return srv.Waiting() == 1 })
	before := gone.Calls()
	e.setBackends(kept.Addr())
	srv.RetainBackends([]string{kept.Addr()})
	if err := <-res; err != nil {
		t.Errorf("call waiting on a backend that left the set: %v, want OK on the new set's backend", err)
	}
	if gone.Calls() != before {
		t.Errorf("the removed backend got %d calls after it left the set", gone.Calls()-before)
	}
	if n := srv.Waiting(); n != 0 {
		t.Errorf("%d calls still counted waiting", n)
	}
}

// TestWaitingCallTakesSiblingSlot: a call waits on one connection of a
// backend (MaxBackendConns 2, each at its one stream); a slot comes free
// on the other connection. The waiting call should take it, as the
// documentation's "each takes the next slot a finished stream gives back,
// before any new call" promises for the backend; it stayed on its
// connection, where the long call does not end, while new calls took the
// free slot, and failed UNAVAILABLE at BackendPendingTimeout.
func TestWaitingCallTakesSiblingSlot(t *testing.T) {
	unsettled := proxy.UnsettledStreams()
	defer checkSettled(t, unsettled)
	verifyNoLeaks(t)
	e := oneSlotEnv(t, 1, time.Second, func(c *proxy.Config) { c.MaxBackendConns = 2 })
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	ts := e.backends[0]
	if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil { // learns its SETTINGS
		t.Fatal(err)
	}
	release1, hung1 := hangOn(ctx, t, e, ts) // the first connection
	defer hung1.Wait()
	defer release1()
	release2, hung2 := hangOn(ctx, t, e, ts) // the second
	defer hung2.Wait()
	defer release2()

	res := make(chan error, 1)
	go func() {
		_, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
		res <- err
	}()
	testkit.WaitFor(ctx, t, "a call waiting", func() bool { return srv.Waiting() == 1 })
	release2() // a slot comes free on the connection the call does not wait on
	hung2.Wait()
	if err := <-res; err != nil {
		t.Errorf("waiting call, with a slot free on the backend: %v, want OK", err)
	}
}

// TestQueueFullCallAttempts: a call that finds the backend's queue full
// fails at once, as a refused call did before the queue, with the attempts
// a refused call logs (MaxBackendPending -1), not one per pick made to
// find the queue full.
func TestQueueFullCallAttempts(t *testing.T) {
	verifyNoLeaks(t)
	for _, pending := range []int{-1, 1} {
		t.Run(fmt.Sprint("pending", pending), func(t *testing.T) {
			var mu sync.Mutex
			var ends []proxy.CallInfo
			e := oneSlotEnv(t, 1, 20*time.Second, func(c *proxy.Config) {
				c.MaxBackendPending = pending
				c.OnCallEnd = func(ci proxy.CallInfo) {
					mu.Lock()
					ends = append(ends, ci)
					mu.Unlock()
				}
			})
			srv := e.srv.(*proxy.Server)
			ctx := testkit.Context(t, 30*time.Second)
			if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
				t.Fatal(err)
			}
			release, hung := hangOn(ctx, t, e, e.backends[0])
			defer hung.Wait()
			defer release()
			var waited chan error
			if pending > 0 {
				waited = make(chan error, 1)
				go func() {
					_, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
					waited <- err
				}()
				testkit.WaitFor(ctx, t, "a call waiting", func() bool { return srv.Waiting() == 1 })
			}
			_, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: 7})
			if status.Code(err) != codes.Unavailable {
				t.Fatalf("call past the full queue: %v, want UNAVAILABLE", err)
			}
			var ci proxy.CallInfo
			testkit.WaitFor(ctx, t, "the refused call's end", func() bool {
				mu.Lock()
				defer mu.Unlock()
				for _, c := range ends {
					if strings.HasSuffix(c.Method, "/UnaryCall") && c.Code == codes.Unavailable {
						ci = c
						return true
					}
				}
				return false
			})
			t.Logf("refused call: attempts %d limit %q", ci.Attempts, ci.Limit)
			if ci.Attempts > 1 {
				t.Errorf("refused call logged %d attempts, want at most 1", ci.Attempts)
			}
			release()
			hung.Wait()
			if waited != nil {
				if err := <-waited; err != nil {
					t.Errorf("waiting call: %v", err)
				}
			}
		})
	}
}

// TestWaitingCallBackendGoesAway: the backend a call waits on sends
// GOAWAY (graceful stop, its long call still running) or dies; the
// waiting call goes to the other backend, waits there, and succeeds when
// its slot comes free. Nothing stays counted.
func TestWaitingCallBackendGoesAway(t *testing.T) {
	for _, how := range []string{"goaway", "kill"} {
		t.Run(how, func(t *testing.T) {
			verifyNoLeaks(t)
			live0, _ := proxy.LiveStreams()
			e := oneSlotEnv(t, 2, 10*time.Second, nil)
			srv := e.srv.(*proxy.Server)
			ctx := testkit.Context(t, 30*time.Second)
			for range 4 {
				if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
					t.Fatal(err)
				}
			}
			var releases []func()
			var hungs []*sync.WaitGroup
			defer func() {
				for i := range releases {
					releases[i]()
					hungs[i].Wait()
				}
			}()
			for _, ts := range e.backends {
				// A hang call goes to whichever backend: wait for each to have one.
				r, h := hangOnAny(ctx, t, e)
				releases, hungs = append(releases, r), append(hungs, h)
				_ = ts
			}
			testkit.WaitFor(ctx, t, "one hung call per backend", func() bool {
				return e.backends[0].InFlight() == 1 && e.backends[1].InFlight() == 1
			})
			res := make(chan error, 1)
			go func() {
				_, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
				res <- err
			}()
			testkit.WaitFor(ctx, t, "a call waiting", func() bool { return srv.Waiting() == 1 })
			var on, other *testserver.Server
			for i, ts := range e.backends {
				if srv.WaitingOn(ts.Addr()) == 1 {
					on, other = ts, e.backends[1-i]
				}
			}
			stopped := make(chan struct{})
			switch how {
			case "goaway":
				go func() { on.GracefulStop(); close(stopped) }()
			case "kill":
				on.Stop()
				close(stopped)
			}
			for srv.WaitingOn(other.Addr()) != 1 {
				select {
				case err := <-res:
					t.Fatalf("waiting call ended before a slot came free: %v", err)
				case <-ctx.Done():
					t.Fatal("the call does not wait on the other backend")
				case <-time.After(5 * time.Millisecond):
				}
			}
			// Free the other backend's slot: its hung call is the one
			// still in flight there.
			for i := range releases {
				releases[i]()
			}
			if err := <-res; err != nil {
				t.Errorf("waiting call: %v", err)
			}
			<-stopped
			testkit.WaitFor(ctx, t, "nothing waiting", func() bool { return srv.Waiting() == 0 && srv.PendingAttempts() == 0 })
			for i := range 5 {
				if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
					t.Fatalf("call %d after: %v", i, err)
				}
			}
			// The first attempt's queue timer (10 s) must not hold the
			// call's stream past the call: stopped when the backend's
			// connection let go of the attempt.
			if _, counted := proxy.LiveStreams(); counted {
				soon := testkit.Context(t, 3*time.Second)
				for n, _ := proxy.LiveStreams(); n != live0; n, _ = proxy.LiveStreams() {
					select {
					case <-soon.Done():
						t.Fatalf("%d streams still held 3 s after their calls ended", n-live0)
					case <-time.After(10 * time.Millisecond):
					}
				}
			}
		})
	}
}

// hangOnAny starts a call that hangs on whichever backend it is sent to.
func hangOnAny(ctx context.Context, t *testing.T, e *env) (cancel func(), done *sync.WaitGroup) {
	hang, cancel := context.WithCancel(metadata.AppendToOutgoingContext(ctx, testserver.MetadataHang, "1"))
	done = new(sync.WaitGroup)
	var before int64
	for _, ts := range e.backends {
		before += ts.InFlight()
	}
	done.Add(1)
	go func() { defer done.Done(); e.client.EmptyCall(hang, &testgrpc.Empty{}) }()
	testkit.WaitFor(ctx, t, "the hanging call on a backend", func() bool {
		var n int64
		for _, ts := range e.backends {
			n += ts.InFlight()
		}
		return n == before+1
	})
	return cancel, done
}

// TestWaitingUploadsDoNotStallConnection: a client's uploads wait for a
// slot on a full backend (one stream at a time) and fill, with the
// request data the proxy takes for them (each stream's window), the
// client connection's buffer budget (MaxConnBufferedBytes). The
// connection then withholds its window, so the call that gets the slot
// cannot receive the rest of its request and never ends, and the calls
// behind it never get the slot: the connection stalls, every call on it
// included, until BackendPendingTimeout fails the waiting calls. Waiting
// calls, which no backend is reading, must not be able to take the
// window from the calls that are running.
func TestWaitingUploadsDoNotStallConnection(t *testing.T) {
	verifyNoLeaks(t)
	unsettled := proxy.UnsettledStreams()
	const budget = 1 << 20
	e := oneSlotEnv(t, 1, 5*time.Second, func(c *proxy.Config) {
		c.MaxBackendPending = 64
		c.MaxConnBufferedBytes = budget
	})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatal(err)
	}
	release, hung := hangOn(ctx, t, e, e.backends[0])
	defer hung.Wait()
	defer release()
	const streams, msgs, size = 12, 8, 64 << 10
	var wg sync.WaitGroup
	errs := make(chan error, streams)
	for range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := e.client.StreamingInputCall(ctx)
			if err != nil {
				errs <- err
				return
			}
			for range msgs {
				if err := st.Send(&testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: make([]byte, size)}}); err != nil {
					break
				}
			}
			resp, err := st.CloseAndRecv()
			if err == nil && resp.AggregatedPayloadSize != msgs*size {
				err = fmt.Errorf("backend got %d bytes, want %d", resp.AggregatedPayloadSize, msgs*size)
			}
			errs <- err
		}()
	}
	// Past the budget a new stream is refused RESOURCE_EXHAUSTED
	// (max_conn_buffer).
	var early []error
	testkit.WaitFor(ctx, t, "every stream waiting or refused", func() bool {
		for len(errs) > 0 {
			early = append(early, <-errs)
		}
		return srv.Waiting()+len(early) == streams && (srv.MaxBufferedBytes() > budget || len(early) > 0)
	})
	t.Logf("%d streams waiting, %d ended: %v; %d bytes buffered", srv.Waiting(), len(early), early, srv.MaxBufferedBytes())
	release()
	start := time.Now()
	wg.Wait()
	close(errs)
	ok := 0
	for _, err := range append(early, drainErrs(errs)...) {
		switch {
		case err == nil:
			ok++
		case status.Code(err) == codes.ResourceExhausted:
		default:
			t.Errorf("upload: %v", err)
		}
	}
	t.Logf("%d uploads OK, %v after the slot came free", ok, time.Since(start))
	if ok == 0 {
		t.Error("no upload went through")
	}
	if ok == streams {
		t.Error("every upload went through: the test did not fill the budget")
	}
	testkit.WaitFor(ctx, t, "nothing waiting", func() bool { return srv.Waiting() == 0 && srv.PendingAttempts() == 0 })
	if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Errorf("call after: %v", err)
	}
	checkSettled(t, unsettled)
}

func drainErrs(errs <-chan error) []error {
	var l []error
	for err := range errs {
		l = append(l, err)
	}
	return l
}

// TestWaitingCallsAtShutdown: calls wait for a slot when the server shuts
// down. Shutdown's drain bounds them: they end with a status (no hang, no
// bare reset seen as INTERNAL), and Shutdown returns; then Close.
func TestWaitingCallsAtShutdown(t *testing.T) {
	for _, how := range []string{"shutdown", "close"} {
		t.Run(how, func(t *testing.T) {
			verifyNoLeaks(t)
			e := oneSlotEnv(t, 1, 20*time.Second, nil)
			srv := e.srv.(*proxy.Server)
			ctx := testkit.Context(t, 30*time.Second)
			if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
				t.Fatal(err)
			}
			release, hung := hangOn(ctx, t, e, e.backends[0])
			defer hung.Wait()
			defer release()
			res := make(chan error, 3)
			for i := range 3 {
				go func() {
					_, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
					res <- err
				}()
				testkit.WaitFor(ctx, t, "calls waiting", func() bool { return srv.Waiting() == i+1 })
			}
			switch how {
			case "shutdown":
				sctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
				err := srv.Shutdown(sctx)
				cancel()
				t.Logf("Shutdown: %v", err)
			case "close":
				srv.Close()
			}
			for range 3 {
				err := <-res
				t.Logf("waiting call: %v", err)
				if c := status.Code(err); c != codes.Unavailable && c != codes.Canceled {
					t.Errorf("waiting call at %s: %v, want UNAVAILABLE", how, err)
				}
			}
		})
	}
}

// TestWaitingCallLeavesRetiredUpstream: a call waits for a slot on a
// connection of an Upstream that a reload retires (DrainUpstream), its
// long call still running there; the Picker now names another Upstream
// for the same backend, whose connection has room. The waiting call goes
// there, as new calls do, rather than wait for the retired connection's
// long call (and fail at BackendPendingTimeout).
func TestWaitingCallLeavesRetiredUpstream(t *testing.T) {
	unsettled := proxy.UnsettledStreams()
	defer checkSettled(t, unsettled)
	verifyNoLeaks(t)
	var dialsA, dialsB atomic.Int64
	upA := countingUpstream(t, "a", &dialsA)
	upB := countingUpstream(t, "b", &dialsB)
	var cur atomic.Pointer[proxy.Upstream]
	cur.Store(upA)
	var backend string
	p := &upstreamPicker{pick: func([]string) (string, *proxy.Upstream) { return backend, cur.Load() }}
	e := oneSlotEnv(t, 1, 2*time.Second, func(c *proxy.Config) { c.Picker = p })
	backend = e.backends[0].Addr()
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatal(err)
	}
	release, hung := hangOn(ctx, t, e, e.backends[0])
	defer hung.Wait()
	defer release()
	res := make(chan error, 1)
	go func() {
		_, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
		res <- err
	}()
	testkit.WaitFor(ctx, t, "a call waiting", func() bool { return srv.Waiting() == 1 })
	cur.Store(upB) // the reload
	srv.DrainUpstream(upA)
	if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatalf("new call after the reload: %v", err)
	}
	if err := <-res; err != nil {
		t.Errorf("call waiting on the retired Upstream's connection: %v, want OK through the new one", err)
	}
}

// TestMovedWaitKeepsItsBound: a call waiting for a slot that the queue
// moves to another backend (its own left the set) and that waits there
// again is bound by BackendPendingTimeout over both waits, not by a fresh
// one per move: the wait on the second backend started its timer anew, so
// the call waited 0.8 s + 1.5 s before its UNAVAILABLE.
func TestMovedWaitKeepsItsBound(t *testing.T) {
	verifyNoLeaks(t)
	const bound = 1500 * time.Millisecond
	e := oneSlotEnv(t, 2, bound, nil)
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	first, second := e.backends[0], e.backends[1]
	e.setBackends(first.Addr(), second.Addr())
	srv.RetainBackends([]string{first.Addr(), second.Addr()})
	for range 4 { // learns both backends' SETTINGS
		if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
			t.Fatal(err)
		}
	}
	// One hangs on each: a call the full one refuses goes to the other.
	for range 2 {
		release, hung := hangOnAny(ctx, t, e)
		defer hung.Wait()
		defer release()
	}
	if first.InFlight() != 1 || second.InFlight() != 1 {
		t.Fatalf("hanging calls in flight: %d and %d, want one on each backend", first.InFlight(), second.InFlight())
	}

	res := make(chan error, 1)
	start := time.Now()
	go func() {
		_, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
		res <- err
	}()
	testkit.WaitFor(ctx, t, "a call waiting", func() bool { return srv.Waiting() == 1 })
	time.Sleep(800 * time.Millisecond)
	// Whichever backend it waits on leaves; the other stays, full.
	var stays *testserver.Server
	select {
	case err := <-res:
		t.Fatalf("call ended while waiting: %v", err)
	default:
	}
	stays = first
	if srv.WaitingOn(first.Addr()) == 1 {
		stays = second
	}
	e.setBackends(stays.Addr())
	srv.RetainBackends([]string{stays.Addr()})
	testkit.WaitFor(ctx, t, "the call waiting on the backend left", func() bool { return srv.WaitingOn(stays.Addr()) == 1 })
	err := <-res
	took := time.Since(start)
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("call waiting on full backends: %v, want UNAVAILABLE", err)
	}
	// The bound is 1.5 s; a fresh one after the move ends it at 2.3 s.
	if took > bound+500*time.Millisecond {
		t.Errorf("call failed after %v, want about %v: the move restarted its wait", took.Round(time.Millisecond), bound)
	}
	if took < bound-100*time.Millisecond {
		t.Errorf("call failed after %v, before its %v bound", took.Round(time.Millisecond), bound)
	}
}
