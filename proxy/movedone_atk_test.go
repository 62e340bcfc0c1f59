package proxy_test

import (
	"context"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestMovedFirstWaiterDoneOnce: a call's first attempt waits for a slot
// on one connection of a full backend, and a slot comes free on its
// other connection (rebalance moves it there). The pick it made to wait
// and the pick it makes to take the moved slot are two picks: each done
// is called once. The move re-made the call's first attempt in place
// (stream.first), so the done meant for the old pick was the new one's:
// the new pick's done ran at the move and again at the call's end, and
// the old pick's never (a metered Picker's pooled done, reused by
// another call in between, counted that call's end twice).
func TestMovedFirstWaiterDoneOnce(t *testing.T) {
	verifyNoLeaks(t)
	unsettled := proxy.UnsettledStreams()
	live0, _ := proxy.LiveStreams()
	var pk *onceCheckPicker
	e := oneSlotEnv(t, 1, 10*time.Second, func(c *proxy.Config) {
		pk = checkDoneOnce(c)
		c.MaxBackendConns = 2
	})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	ts := e.backends[0]
	mustEmptyCalls(ctx, t, e, 2) // learns the backend's SETTINGS
	// Either hanging call may share a connection with the waiting call:
	// freeing the other's moves it (rebalance); freeing its own's gives
	// it the slot in place. Both orders, so one of them moves it.
	for round := range 2 {
		testkit.WaitFor(ctx, t, "no call on the backend", func() bool { return ts.InFlight() == 0 })
		relA, hungA := hangOn(ctx, t, e, ts)
		relB, hungB := hangOn(ctx, t, e, ts)
		res := make(chan error, 1)
		go func() {
			_, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
			res <- err
		}()
		testkit.WaitFor(ctx, t, "a call waiting", func() bool { return srv.Waiting() == 1 })
		first, second := relA, relB
		if round == 1 {
			first, second = relB, relA
		}
		first()
		if err := <-res; err != nil {
			t.Errorf("round %d: waiting call: %v", round, err)
		}
		second()
		hungA.Wait()
		hungB.Wait()
	}
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
				t.Errorf("call after: %v", err)
			}
		}()
	}
	wg.Wait()
	pk.check(ctx, t)
	checkSettled(t, unsettled)
	waitStreamsReleased(ctx, t, live0)
}

// phasePicker picks addrs[phase] for every pick and retry.
type phasePicker struct {
	addrs []string
	phase atomic.Int32
}

func (p *phasePicker) Pick(context.Context, string) (string, func(error), error) {
	return p.addrs[p.phase.Load()], nil, nil
}

func (p *phasePicker) PickExcluding(ctx context.Context, m string, _ []string) (string, func(error), error) {
	return p.Pick(ctx, m)
}

// TestRetryAfterSlotWaitsAFreshBound: a call waits for a slot on a full
// backend for most of BackendPendingTimeout, gets it, is answered
// UNAVAILABLE there (a RetryOn method) and is retried on another full
// backend, where it waits again: that wait has a bound of its own, not
// what was left of the first one.
func TestRetryAfterSlotWaitsAFreshBound(t *testing.T) {
	verifyNoLeaks(t)
	const bound = 1500 * time.Millisecond
	pk := &phasePicker{}
	e := oneSlotEnv(t, 2, bound, func(c *proxy.Config) {
		c.Picker = pk
		c.RetryOn = []string{"/grpc.testing.TestService/UnaryCall"}
		c.MaxRetries = 5
	})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	first, second := e.backends[0], e.backends[1]
	pk.addrs = []string{first.Addr(), second.Addr()}
	for i := range 2 { // learns both backends' SETTINGS
		pk.phase.Store(int32(i))
		if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
			t.Fatal(err)
		}
	}
	pk.phase.Store(1)
	relSecond, hungSecond := hangOn(ctx, t, e, second)
	defer hungSecond.Wait()
	defer relSecond()
	pk.phase.Store(0)
	relFirst, hungFirst := hangOn(ctx, t, e, first)
	defer hungFirst.Wait()
	defer relFirst()

	res := make(chan error, 1)
	go func() {
		fail := metadata.AppendToOutgoingContext(ctx, testserver.MetadataFailCode, strconv.Itoa(int(codes.Unavailable)))
		_, err := e.client.UnaryCall(fail, &testgrpc.SimpleRequest{})
		res <- err
	}()
	testkit.WaitFor(ctx, t, "the call waiting on the first backend", func() bool { return srv.WaitingOn(first.Addr()) == 1 })
	time.Sleep(bound * 2 / 3)
	// Its retry goes to the second backend, full.
	pk.phase.Store(1)
	relFirst()
	testkit.WaitFor(ctx, t, "the retry waiting on the second backend", func() bool { return srv.WaitingOn(second.Addr()) == 1 })
	slot := time.Now()
	err := <-res
	took := time.Since(slot)
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("call: %v, want UNAVAILABLE", err)
	}
	if took < bound-200*time.Millisecond {
		t.Errorf("retry's wait failed after %v, want about %v: it kept the first wait's bound", took.Round(time.Millisecond), bound)
	}
}

// TestWaitersChurnDoneOnce: calls wait for slots on a full backend's
// connections while slots come free on one connection or another (the
// queue moves waiters), some waiters are cancelled, some time out, and the
// backend's set changes under them: every pick's done runs once, no
// stream is released while in use or held past its call.
func TestWaitersChurnDoneOnce(t *testing.T) {
	verifyNoLeaks(t)
	unsettled := proxy.UnsettledStreams()
	live0, _ := proxy.LiveStreams()
	var pk *onceCheckPicker
	e := oneSlotEnv(t, 2, 100*time.Millisecond, func(c *proxy.Config) {
		pk = checkDoneOnce(c)
		c.MaxBackendConns = 2
		c.MaxBackendPending = 64
	})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 60*time.Second)
	addrs := []string{e.backends[0].Addr(), e.backends[1].Addr()}
	var wg sync.WaitGroup
	const workers, perWorker = 12, 40
	var codesSeen sync.Map
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range perWorker {
				cctx, cancel := context.WithCancel(ctx)
				md := []string{testserver.MetadataDelay, strconv.Itoa((w*7+i*13)%40) + "ms"}
				if (w+i)%4 == 0 {
					time.AfterFunc(time.Duration((w+i)%50)*time.Millisecond, cancel)
				}
				_, err := e.client.UnaryCall(metadata.AppendToOutgoingContext(cctx, md...), &testgrpc.SimpleRequest{})
				cancel()
				codesSeen.Store(status.Code(err), true)
			}
		}()
	}
	// The set changes under the calls: one backend leaves and returns.
	churned := make(chan struct{})
	go func() {
		defer close(churned)
		for i := range 10 {
			select {
			case <-ctx.Done():
				return
			case <-time.After(40 * time.Millisecond):
			}
			if i%2 == 0 {
				e.setBackends(addrs[0])
				srv.RetainBackends(addrs[:1])
			} else {
				e.setBackends(addrs...)
				srv.RetainBackends(addrs)
			}
		}
	}()
	wg.Wait()
	<-churned
	testkit.WaitFor(ctx, t, "nothing waiting", func() bool { return srv.Waiting() == 0 && srv.PendingAttempts() == 0 })
	pk.check(ctx, t)
	checkSettled(t, unsettled)
	waitStreamsReleased(ctx, t, live0)
	var seen []codes.Code
	codesSeen.Range(func(k, _ any) bool { seen = append(seen, k.(codes.Code)); return true })
	t.Logf("codes seen: %v; picks %d", seen, pk.picks.Load())
}

// TestWaitersAtCloseDoneOnce: the server closes while calls wait for a
// slot and one holds it: every pick's done runs once.
func TestWaitersAtCloseDoneOnce(t *testing.T) {
	for _, how := range []string{"shutdown", "close"} {
		t.Run(how, func(t *testing.T) {
			verifyNoLeaks(t)
			unsettled := proxy.UnsettledStreams()
			var pk *onceCheckPicker
			e := oneSlotEnv(t, 1, 10*time.Second, func(c *proxy.Config) {
				pk = checkDoneOnce(c)
			})
			srv := e.srv.(*proxy.Server)
			ctx := testkit.Context(t, 30*time.Second)
			mustEmptyCalls(ctx, t, e, 1)
			rel, hung := hangOn(ctx, t, e, e.backends[0])
			defer hung.Wait()
			defer rel()
			var wg sync.WaitGroup
			for range 5 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
				}()
			}
			testkit.WaitFor(ctx, t, "calls waiting", func() bool { return srv.Waiting() == 5 })
			switch how {
			case "shutdown":
				sctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
				srv.Shutdown(sctx)
				cancel()
			case "close":
				srv.Close()
			}
			wg.Wait()
			rel()
			hung.Wait()
			pk.check(ctx, t)
			checkSettled(t, unsettled)
		})
	}
}

// TestMovedBeforeBoundKeepsItsBound: a waiting call the queue moves
// (its backend left the set) is moved again before its new wait was
// bounded (watchQueue): its wait still ends at BackendPendingTimeout
// from its first. watchQueue took the attempt unlinked by the move for
// one whose wait was over and forgot the call's bound, so its third
// wait had a fresh one: 0.7 s + 1.5 s.
func TestMovedBeforeBoundKeepsItsBound(t *testing.T) {
	verifyNoLeaks(t)
	const bound = 1500 * time.Millisecond
	var srv *proxy.Server
	var armed atomic.Bool
	var e *env
	var moving sync.WaitGroup
	defer moving.Wait()
	e = newEnv(t, envOpts{backends: 3,
		tscfg: func(i int, c *testserver.Config) {
			c.ServerOptions = append(c.ServerOptions, grpc.MaxConcurrentStreams(1))
		},
		pcfg: func(c *proxy.Config) {
			c.MaxBackendConns = 1
			c.MaxBackendPending = 8
			c.BackendPendingTimeout = bound
			c.MaxRetries = 5 // each move is a transparent retry
		},
		hook: func(s *proxy.Server) {
			srv = s
			proxy.SetBeforeWatchQueue(s, func(addr string) {
				if !armed.CompareAndSwap(true, false) {
					return
				}
				// The call is queued on addr, not yet bounded: addr
				// leaves the set, which moves it to the one left.
				var keep []string
				for _, ts := range e.backends {
					if ts.Addr() != addr && srv.WaitingOn(ts.Addr()) == 0 && ts.Addr() != e.backends[0].Addr() {
						keep = append(keep, ts.Addr())
					}
				}
				moving.Add(1)
				go func() {
					defer moving.Done()
					e.setBackends(keep...)
					srv.RetainBackends(keep)
				}()
				deadline := time.Now().Add(5 * time.Second)
				for srv.WaitingOn(addr) != 0 && time.Now().Before(deadline) {
					time.Sleep(time.Millisecond)
				}
			})
		},
	})
	ctx := testkit.Context(t, 30*time.Second)
	mustEmptyCalls(ctx, t, e, 6) // learns every backend's SETTINGS
	for range 3 {
		release, hung := hangOnAny(ctx, t, e)
		defer hung.Wait()
		defer release()
	}
	for _, ts := range e.backends {
		if ts.InFlight() != 1 {
			t.Fatalf("hanging calls: %d on %s, want one on each backend", ts.InFlight(), ts.Addr())
		}
	}
	// The call waits on the first backend alone.
	e.setBackends(e.backends[0].Addr())
	res := make(chan error, 1)
	start := time.Now()
	go func() {
		_, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
		res <- err
	}()
	testkit.WaitFor(ctx, t, "the call waiting on the first backend", func() bool { return srv.WaitingOn(e.backends[0].Addr()) == 1 })
	time.Sleep(700 * time.Millisecond)
	// The first backend leaves: the call moves to the second or the
	// third, and from there (the hook) to the other.
	armed.Store(true)
	rest := []string{e.backends[1].Addr(), e.backends[2].Addr()}
	e.setBackends(rest...)
	srv.RetainBackends(rest)
	err := <-res
	took := time.Since(start)
	if armed.Load() {
		t.Fatal("the call was not moved a second time")
	}
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("call waiting on full backends: %v, want UNAVAILABLE", err)
	}
	if took > bound+500*time.Millisecond {
		t.Errorf("call failed after %v, want about %v: a move restarted its wait", took.Round(time.Millisecond), bound)
	}
	if took < bound-100*time.Millisecond {
		t.Errorf("call failed after %v, before its %v bound", took.Round(time.Millisecond), bound)
	}
}
