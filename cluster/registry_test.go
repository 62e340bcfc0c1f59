package cluster_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// callLog records, per backend, when calls through the proxy reached it,
// and every failed call.
type callLog struct {
	mu     sync.Mutex
	first  map[string]time.Time
	last   map[string]time.Time
	calls  map[string]int
	failed []error
}

// drive makes unary calls through client back to back on a few
// goroutines until ctx ends, recording each in l; it returns when they
// have all stopped.
func (l *callLog) drive(ctx context.Context, client testgrpc.TestServiceClient, workers int) {
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for ctx.Err() == nil {
				var hdr metadata.MD
				_, err := client.EmptyCall(ctx, &testgrpc.Empty{}, grpc.Header(&hdr))
				now := time.Now()
				l.mu.Lock()
				if err != nil {
					if ctx.Err() == nil {
						l.failed = append(l.failed, err)
					}
				} else {
					b := testserver.BackendFromHeader(hdr)
					if _, ok := l.first[b]; !ok {
						l.first[b] = now
					}
					l.last[b] = now
					l.calls[b]++
				}
				l.mu.Unlock()
			}
		})
	}
	wg.Wait()
}

func (l *callLog) seen(b string) (first, last time.Time, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	first, ok = l.first[b]
	return first, l.last[b], ok
}

// registryStory is the end-to-end story of a service registry: the proxy
// follows target while testservers register, deregister and die, with
// calls flowing the whole time. A new backend gets calls within a second,
// a deregistered one is drained without a failed call, and one that stops
// renewing (killed without deregistering) stops getting calls once the
// registry drops it.
type registryStory struct {
	target string
	// register registers a backend as a service does.
	register func(ctx context.Context, target, addr string, opts testserver.RegisterOptions) (*testserver.Registration, error)
	// ttl is the lease or session timeout of the backends that stay.
	ttl time.Duration
	// gone abandons reg (it stops renewing, its backend keeps serving) and
	// returns the moment the registry dropped it, or the moment it was
	// abandoned if the registry does not say; within bounds the last call
	// after that moment.
	gone   func(ctx context.Context, t *testing.T, reg *testserver.Registration) time.Time
	within time.Duration
}

func (rs registryStory) run(t *testing.T) {
	ctx := testkit.Context(t, 60*time.Second)
	register := func(ts *testserver.Server, ttl time.Duration) *testserver.Registration {
		t.Helper()
		reg, err := rs.register(ctx, rs.target, ts.Addr(), testserver.RegisterOptions{TTL: ttl})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(reg.Abandon)
		return reg
	}

	a := startBackend(t, "a", "127.0.0.1:0")
	register(a, rs.ttl)

	r := runServer(t, cluster.ServerConfig{Cluster: cluster.Config{Targets: []string{rs.target}}})
	client := dial(t, r.addr)
	l := &callLog{first: map[string]time.Time{}, last: map[string]time.Time{}, calls: map[string]int{}}
	dctx, stopCalls := context.WithCancel(ctx)
	driving := make(chan struct{})
	go func() { defer close(driving); l.drive(dctx, client, 4) }()
	defer func() { stopCalls(); <-driving }()
	testkit.WaitFor(ctx, t, "calls on a", func() bool { _, _, ok := l.seen("a"); return ok })

	// Registration → calls within a second.
	b := startBackend(t, "b", "127.0.0.1:0")
	regAt := time.Now()
	regB := register(b, rs.ttl)
	testkit.WaitFor(ctx, t, "calls on b", func() bool { _, _, ok := l.seen("b"); return ok })
	firstB, _, _ := l.seen("b")
	if d := firstB.Sub(regAt); d > time.Second {
		t.Errorf("first call on b %v after its registration, want within 1s", d)
	}
	t.Logf("registration → first call: %v", firstB.Sub(regAt))

	// Graceful deregistration, then stop: drained with no failed call.
	deregAt := time.Now()
	if err := regB.Deregister(ctx); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(ctx, t, "calls on a after b left", func() bool {
		_, lastA, _ := l.seen("a")
		return lastA.After(deregAt.Add(200 * time.Millisecond))
	})
	_, lastB, _ := l.seen("b")
	t.Logf("deregistration → last call on b: %v", lastB.Sub(deregAt))
	b.GracefulStop()

	// A backend killed without deregistering: its 2s lease or session
	// lapses. c keeps serving, so a call that still reaches it succeeds.
	c := startBackend(t, "c", "127.0.0.1:0")
	regC := register(c, 2*time.Second)
	testkit.WaitFor(ctx, t, "calls on c", func() bool { _, _, ok := l.seen("c"); return ok })
	goneAt := rs.gone(ctx, t, regC)
	testkit.WaitFor(ctx, t, "calls on a only, for 500ms", func() bool {
		_, lastC, _ := l.seen("c")
		_, lastA, _ := l.seen("a")
		return lastA.After(goneAt.Add(500*time.Millisecond)) && lastA.After(lastC.Add(500*time.Millisecond))
	})
	_, lastC, _ := l.seen("c")
	t.Logf("dropped → last call on c: %v (TTL 2s)", lastC.Sub(goneAt))
	if d := lastC.Sub(goneAt); d > rs.within {
		t.Errorf("last call on c %v after it was dropped, want within %v", d, rs.within)
	}

	stopCalls()
	<-driving
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.failed) != 0 {
		t.Errorf("%d calls failed while backends came and went, want 0; first: %v", len(l.failed), l.failed[0])
	}
	t.Logf("calls: %v", l.calls)
}
