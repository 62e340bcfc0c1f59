package proxy_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// onceCheckPicker wraps a Picker and checks its contract with the
// proxy: every pick's done is called exactly once (proxy.Picker).
type onceCheckPicker struct {
	next         proxy.Picker
	picks, dones atomic.Int64
	twice        atomic.Int64 // dones called again
}

func (p *onceCheckPicker) Pick(ctx context.Context, m string) (string, func(error), error) {
	addr, done, err := p.next.Pick(ctx, m)
	if err != nil {
		return addr, done, err
	}
	p.picks.Add(1)
	var calls atomic.Int32
	return addr, func(err error) {
		if calls.Add(1) > 1 {
			p.twice.Add(1)
			return
		}
		p.dones.Add(1)
		if done != nil {
			done(err)
		}
	}, nil
}

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
	e := newEnv(t, envOpts{backends: 1,
		tscfg: func(i int, c *testserver.Config) {
			c.ServerOptions = append(c.ServerOptions, grpc.MaxConcurrentStreams(1))
		},
		pcfg: func(c *proxy.Config) {
			pk = &onceCheckPicker{next: c.Picker}
			c.Picker = pk
			c.MaxBackendConns = 2
			c.MaxBackendPending = 8
			c.BackendPendingTimeout = 10 * time.Second
		},
	})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	ts := e.backends[0]
	for range 2 { // learns the backend's SETTINGS
		if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
			t.Fatal(err)
		}
	}
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
	testkit.WaitFor(ctx, t, "every pick done", func() bool { return pk.dones.Load()+pk.twice.Load() >= pk.picks.Load() })
	if n := pk.twice.Load(); n != 0 {
		t.Errorf("%d dones called twice", n)
	}
	if p, d := pk.picks.Load(), pk.dones.Load(); p != d {
		t.Errorf("picks %d, dones %d: want one done per pick", p, d)
	}
	if n := proxy.UnsettledStreams() - unsettled; n != 0 {
		t.Errorf("%d streams lost their last reference while in use", n)
	}
	if _, counted := proxy.LiveStreams(); counted {
		testkit.WaitFor(ctx, t, "no stream held past its call", func() bool { n, _ := proxy.LiveStreams(); return n == live0 })
	}
}
