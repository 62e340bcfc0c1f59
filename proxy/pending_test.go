package proxy_test

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// pendingEnv is one backend that takes two streams at a time
// (MAX_CONCURRENT_STREAMS 2) behind one backend connection
// (MaxBackendConns 1), with room for two calls waiting
// (MaxBackendPending 2), and a record of the calls that ended.
type pendingEnv struct {
	*env
	mu   sync.Mutex
	ends []proxy.CallInfo
	// unavailable counts the calls whose Picker's done saw UNAVAILABLE:
	// what the director takes for the backend failing (it asks the
	// resolver to look again, and counts it towards ejection).
	unavailable atomic.Int32
}

func newPendingEnv(t *testing.T, wait time.Duration) *pendingEnv {
	p := &pendingEnv{}
	p.env = newEnv(t, envOpts{backends: 1,
		tscfg: func(i int, c *testserver.Config) {
			c.ServerOptions = append(c.ServerOptions, grpc.MaxConcurrentStreams(2))
		},
		pcfg: func(c *proxy.Config) {
			c.MaxBackendConns = 1
			c.MaxBackendPending = 2
			c.BackendPendingTimeout = wait
			c.OnCallEnd = func(ci proxy.CallInfo) {
				p.mu.Lock()
				p.ends = append(p.ends, ci)
				p.mu.Unlock()
			}
		},
		dcfg: func(c *director.Config) { c.ResolveNow = func() { p.unavailable.Add(1) } },
	})
	return p
}

// fill makes two calls that hang on the backend until ctx ends, and waits
// until both are on it.
func (p *pendingEnv) fill(t *testing.T, ctx context.Context) (cancel func(), done *sync.WaitGroup) {
	t.Helper()
	if _, err := p.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil { // learns its SETTINGS
		t.Fatal(err)
	}
	hang, cancel := context.WithCancel(metadata.AppendToOutgoingContext(ctx, testserver.MetadataHang, "1"))
	done = new(sync.WaitGroup)
	for range 2 {
		done.Add(1)
		go func() { defer done.Done(); p.client.EmptyCall(hang, &testgrpc.Empty{}) }()
	}
	testkit.WaitFor(ctx, t, "the backend's two slots taken", func() bool { return p.backends[0].InFlight() == 2 })
	return cancel, done
}

// endOf waits for the end of the call to method (a suffix of its full
// name) that ended with code, and returns it. OnCallEnd is called on a
// goroutine of its own: a call's end may come after its client saw its
// status, and after later calls' ends.
func (p *pendingEnv) endOf(ctx context.Context, t *testing.T, method string, code codes.Code) proxy.CallInfo {
	t.Helper()
	var found proxy.CallInfo
	testkit.WaitFor(ctx, t, "the end of a call to "+method+" "+code.String(), func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		for _, ci := range p.ends {
			if strings.HasSuffix(ci.Method, method) && ci.Code == code {
				found = ci
				return true
			}
		}
		return false
	})
	return found
}

// TestPendingCallsWaitForSlot: with every connection to the only backend
// full at MaxBackendConns, calls wait for a slot, up to MaxBackendPending
// of them, and run in order as slots come free; one past the queue fails
// at once with UNAVAILABLE. They used to fail at once, all of them (as
// nginx's max_conns does; HAProxy and Envoy queue them).
func TestPendingCallsWaitForSlot(t *testing.T) {
	verifyNoLeaks(t)
	p := newPendingEnv(t, 20*time.Second)
	ctx := testkit.Context(t, 30*time.Second)
	release, hung := p.fill(t, ctx)
	defer hung.Wait()
	defer release()

	type result struct {
		i   int
		err error
	}
	results := make(chan result, 2)
	for i := range 2 {
		go func() {
			_, err := p.client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
			results <- result{i, err}
		}()
		// In order: the first waits before the second.
		testkit.WaitFor(ctx, t, "a call waiting", func() bool { return p.srv.(*proxy.Server).Waiting() == i+1 })
	}
	// The queue is full: the next call fails at once.
	_, err := p.client.EmptyCall(ctx, &testgrpc.Empty{})
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "every connection is at its stream limit") {
		t.Fatalf("call past a full queue: %v, want UNAVAILABLE at the stream limit", err)
	}
	if ci := p.endOf(ctx, t, "/EmptyCall", codes.Unavailable); ci.Limit != proxy.LimitMaxBackendConns {
		t.Errorf("call past a full queue logged limit %q, want %q", ci.Limit, proxy.LimitMaxBackendConns)
	}
	select {
	case r := <-results:
		t.Fatalf("waiting call %d ended with the backend full: %v", r.i, r.err)
	case <-time.After(100 * time.Millisecond):
	}
	// The slots come free: both waiting calls run, and succeed.
	release()
	hung.Wait()
	for range 2 {
		if r := <-results; r.err != nil {
			t.Errorf("waiting call %d: %v", r.i, r.err)
		}
	}
	// Each made one attempt: the refusal before its wait is not a retry.
	testkit.WaitFor(ctx, t, "the waiting calls' ends", func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		n := 0
		for _, ci := range p.ends {
			if strings.HasSuffix(ci.Method, "/UnaryCall") {
				if ci.Code != codes.OK || ci.Attempts != 1 {
					t.Errorf("waiting call logged %v after %d attempts, want OK after 1", ci.Code, ci.Attempts)
				}
				n++
			}
		}
		return n == 2
	})
	if n := p.srv.(*proxy.Server).Waiting(); n != 0 {
		t.Errorf("%d calls still counted waiting", n)
	}
}

// TestPendingCallTimesOut: a call that waits BackendPendingTimeout for a
// slot in vain fails with UNAVAILABLE, and does not count against the
// backend (which is full, not failing): the director's done sees no
// UNAVAILABLE. A waiting call whose deadline passes ends DEADLINE_EXCEEDED,
// and one its client cancels leaves the queue too, at once: 50 calls that
// give up one after another while the backend stays full leave nothing
// behind (they stayed in the connection's pending list until a slot came
// free). Afterwards the slots and the queue are whole, and calls go
// through.
func TestPendingCallTimesOut(t *testing.T) {
	verifyNoLeaks(t)
	unsettled := proxy.UnsettledStreams()
	p := newPendingEnv(t, 300*time.Millisecond)
	ctx := testkit.Context(t, 30*time.Second)
	release, hung := p.fill(t, ctx)
	defer hung.Wait()
	defer release()

	_, err := p.client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "no slot came free within 300ms") {
		t.Fatalf("call waiting past BackendPendingTimeout: %v, want UNAVAILABLE, no slot within 300ms", err)
	}
	if ci := p.endOf(ctx, t, "/UnaryCall", codes.Unavailable); ci.Limit != proxy.LimitMaxBackendConns {
		t.Errorf("logged limit %q, want %q", ci.Limit, proxy.LimitMaxBackendConns)
	}
	if n := p.unavailable.Load(); n != 0 {
		t.Errorf("the director saw %d calls UNAVAILABLE: a wait at the connection cap counted against the backend", n)
	}

	dctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	_, err = p.client.UnaryCall(dctx, &testgrpc.SimpleRequest{})
	cancel()
	if status.Code(err) != codes.DeadlineExceeded {
		t.Errorf("waiting call whose deadline passed: %v, want DEADLINE_EXCEEDED", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	go func() {
		testkit.WaitFor(ctx, t, "a call waiting", func() bool { return p.srv.(*proxy.Server).Waiting() == 1 })
		cancel()
	}()
	if _, err = p.client.UnaryCall(cctx, &testgrpc.SimpleRequest{}); status.Code(err) != codes.Canceled {
		t.Errorf("waiting call cancelled: %v, want CANCELLED", err)
	}
	testkit.WaitFor(ctx, t, "no call waiting", func() bool { return p.srv.(*proxy.Server).Waiting() == 0 })
	// Calls that gave up do not pile up while the backend stays full.
	for range 50 {
		dctx, cancel := context.WithTimeout(ctx, 5*time.Millisecond)
		p.client.EmptyCall(dctx, &testgrpc.Empty{})
		cancel()
	}
	testkit.WaitFor(ctx, t, "no call waiting", func() bool { return p.srv.(*proxy.Server).Waiting() == 0 })
	if n := p.srv.(*proxy.Server).PendingAttempts(); n != 0 {
		t.Errorf("%d attempts of calls that gave up still in the pending lists", n)
	}

	release()
	hung.Wait()
	for i := range 5 {
		if _, err := p.client.UnaryCall(ctx, &testgrpc.SimpleRequest{}); err != nil {
			t.Fatalf("call %d after the waits: %v", i, err)
		}
	}
	// Each stream's references, the wait's (pending list, queue timer)
	// among them, were given back in step with its use.
	checkSettled(t, unsettled)
}

// checkSettled fails t if a stream lost its last reference while still
// in use (proxy.UnsettledStreams) since the count was unsettled.
func checkSettled(t *testing.T, unsettled int64) {
	t.Helper()
	if n := proxy.UnsettledStreams() - unsettled; n != 0 {
		t.Errorf("%d streams lost their last reference while still in use", n)
	}
}
