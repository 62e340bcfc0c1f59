package proxy_test

import (
	"context"
	"net"
	"strings"
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

// The helpers below are shared by the tests of calls past a backend's
// stream limit (overlimit_test.go) and of waiting calls the queue moves
// (movedone_atk_test.go): each builds a scenario's world or checks its
// end, so that the tests read as their scenario and their assertions.

// limitOpts sets up a limitEnv.
type limitOpts struct {
	// gated: the backend holds back its SETTINGS until gate is closed,
	// so that the calls take slots on the assumed limit meanwhile. The
	// proxy's HandshakeTimeout is then 20 s: the calls wait for the
	// test, not for the handshake to time out.
	gated      bool
	conns      int           // MaxBackendConns
	maxPending int           // MaxBackendPending, when not 0
	queueOff   bool          // MaxBackendPending -1: no wait queue
	wait       time.Duration // BackendPendingTimeout
	// checkOnce wraps the proxy's Picker in an onceCheckPicker (limitEnv.pk).
	checkOnce bool
	// settleAtSecondReserve: when the proxy has reserved the second
	// call's slot on the assumed limit, the backend's SETTINGS arrive and
	// the first call takes the one slot, before the second is queued on
	// the connection (the afterReserve hook holds it there). Needs gated.
	settleAtSecondReserve bool
	// onConn, if set, sees every connection the backend accepts before
	// the backend serves it.
	onConn func(nc net.Conn)
}

// limitEnv is a proxy in front of one settingsBackend: a raw HTTP/2
// backend that says SETTINGS_MAX_CONCURRENT_STREAMS 1 and holds the calls
// sent with x-hang (hanging) until released.
type limitEnv struct {
	*env
	b       *settingsBackend
	backend string        // b's address
	gate    chan struct{} // closing it lets b send its SETTINGS (limitOpts.gated)
	srv     *proxy.Server
	ctx     context.Context  // the test's, 30 s
	pk      *onceCheckPicker // with limitOpts.checkOnce
}

// newLimitEnv builds a limitEnv; its teardown is registered on t.
func newLimitEnv(t *testing.T, o limitOpts) *limitEnv {
	t.Helper()
	le := &limitEnv{b: &settingsBackend{}}
	if o.gated {
		le.gate = make(chan struct{})
		le.b.gate = le.gate
	}
	serve := le.b.serve
	if o.onConn != nil {
		serve = func(nc net.Conn) {
			o.onConn(nc)
			le.b.serve(nc)
		}
	}
	le.backend = rawBackend(t, serve)
	eo := envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		if o.checkOnce {
			le.pk = checkDoneOnce(c)
		}
		c.MaxBackendConns = o.conns
		if o.maxPending != 0 {
			c.MaxBackendPending = o.maxPending
		}
		if o.queueOff {
			c.MaxBackendPending = -1
		}
		c.BackendPendingTimeout = o.wait
		if o.gated {
			c.HandshakeTimeout = 20 * time.Second
		}
	}}
	if o.settleAtSecondReserve {
		var reserved atomic.Int32
		eo.hook = func(s *proxy.Server) {
			proxy.SetAfterReserve(s, func(string) {
				if reserved.Add(1) != 2 {
					return
				}
				close(le.gate)
				waitInHook(t, "the first call on the backend", func() bool { return le.b.heldCalls() == 1 })
			})
		}
	}
	le.env = newEnv(t, eo)
	le.setBackends(le.backend)
	le.srv = le.env.srv.(*proxy.Server)
	le.ctx = testkit.Context(t, 30*time.Second)
	return le
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

// waitPending waits until n attempts are pending on the backend's
// connections (before its SETTINGS: waiting for the handshake).
func (le *limitEnv) waitPending(what string, n int) {
	le.t.Helper()
	testkit.WaitFor(le.ctx, le.t, what, func() bool { return le.srv.PendingAttempts() == n })
}

// waitWaiting waits until n calls are counted waiting for a slot.
func (le *limitEnv) waitWaiting(what string, n int) {
	le.t.Helper()
	testkit.WaitFor(le.ctx, le.t, what, func() bool { return le.srv.Waiting() == n })
}

// waitHeld waits until the backend holds n hanging calls.
func (le *limitEnv) waitHeld(what string, n int) {
	le.t.Helper()
	testkit.WaitFor(le.ctx, le.t, what, func() bool { return le.b.heldCalls() == n })
}

// waitNothingPending waits until no call waits and no attempt is pending.
func (le *limitEnv) waitNothingPending() {
	le.t.Helper()
	testkit.WaitFor(le.ctx, le.t, "nothing pending", func() bool { return le.srv.Waiting() == 0 && le.srv.PendingAttempts() == 0 })
}

// heldCalls is how many calls b holds (sent with x-hang, not released).
func (b *settingsBackend) heldCalls() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.held)
}

// hanging marks ctx's calls to hang on a settingsBackend until released.
func hanging(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "x-hang", "1")
}

// goEmptyCall starts an EmptyCall on c and sends its error to out, which
// must have room for it.
func goEmptyCall(ctx context.Context, c testgrpc.TestServiceClient, out chan<- error) {
	go func() {
		_, err := c.EmptyCall(ctx, &testgrpc.Empty{})
		out <- err
	}()
}

// checkOverLimitEnd checks how a call found past the backend's limit
// ended, at after the backend's SETTINGS: UNAVAILABLE, saying its wait
// for a slot timed out (queue) or, with the wait queue off, that every
// connection is full; and within 8 s either way.
func checkOverLimitEnd(t *testing.T, queue bool, err error, at time.Duration) {
	t.Helper()
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
}

// onceCheckPicker wraps a Picker and checks its contract with the
// proxy: every pick's done is called exactly once (proxy.Picker).
type onceCheckPicker struct {
	next         proxy.Picker
	picks, dones atomic.Int64
	twice        atomic.Int64 // dones called again
}

// checkDoneOnce wraps c's Picker in an onceCheckPicker and returns it.
func checkDoneOnce(c *proxy.Config) *onceCheckPicker {
	pk := &onceCheckPicker{next: c.Picker}
	c.Picker = pk
	return pk
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

// check waits until every pick has had its done, then fails t if a done
// was called twice or a pick's never was.
func (p *onceCheckPicker) check(ctx context.Context, t *testing.T) {
	t.Helper()
	testkit.WaitFor(ctx, t, "every pick done", func() bool { return p.dones.Load()+p.twice.Load() >= p.picks.Load() })
	if n := p.twice.Load(); n != 0 {
		t.Errorf("%d dones called twice", n)
	}
	if pk, d := p.picks.Load(), p.dones.Load(); pk != d {
		t.Errorf("picks %d, dones %d: want one done per pick", pk, d)
	}
}

// waitStreamsReleased waits, in the streamdebug build that counts them,
// until the live streams are back to live0 (proxy.LiveStreams before the
// calls): no stream held past its call. Other builds cannot tell.
func waitStreamsReleased(ctx context.Context, t *testing.T, live0 int64) {
	t.Helper()
	if _, counted := proxy.LiveStreams(); counted {
		testkit.WaitFor(ctx, t, "no stream held past its call", func() bool { n, _ := proxy.LiveStreams(); return n == live0 })
	}
}

// mustEmptyCalls makes n EmptyCalls one after another, each of which must
// succeed: the proxy learns the backends' SETTINGS.
func mustEmptyCalls(ctx context.Context, t *testing.T, e *env, n int) {
	t.Helper()
	for range n {
		if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
			t.Fatal(err)
		}
	}
}
