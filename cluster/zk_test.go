package cluster_test

import (
	"context"
	"testing"
	"time"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/internal/zktest"
	"github.com/streamlb/streamlb/testserver"
)

// TestZKRegistrationEndToEnd runs the proxy on a zk:// target of a real
// ZooKeeper while testservers register with ephemeral nodes, deregister
// and die, with calls flowing the whole time.
func TestZKRegistrationEndToEnd(t *testing.T) {
	zks := zktest.Start(t)
	ctx := testkit.Context(t, 60*time.Second)
	target := "zk://" + zks.Addr() + "/kitex/echo"

	register := func(ts *testserver.Server, ttl time.Duration) *testserver.Registration {
		t.Helper()
		reg, err := testserver.RegisterZK(ctx, target, ts.Addr(), testserver.RegisterOptions{TTL: ttl})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(reg.Abandon)
		return reg
	}

	a := startBackend(t, "a", "127.0.0.1:0")
	register(a, 4*time.Second)

	r := runServer(t, cluster.ServerConfig{Cluster: cluster.Config{Targets: []string{target}}})
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
	regB := register(b, 4*time.Second)
	testkit.WaitFor(ctx, t, "calls on b", func() bool { _, _, ok := l.seen("b"); return ok })
	firstB, _, _ := l.seen("b")
	if d := firstB.Sub(regAt); d > time.Second {
		t.Errorf("first call on b %v after its registration, want within 1s", d)
	}
	t.Logf("registration → first call: %v", firstB.Sub(regAt))

	// Graceful deregistration (session closed), then stop: no failed call.
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

	// A backend killed without deregistering: its 2s session expires.
	c := startBackend(t, "c", "127.0.0.1:0")
	regC := register(c, 2*time.Second)
	testkit.WaitFor(ctx, t, "calls on c", func() bool { _, _, ok := l.seen("c"); return ok })
	abandonedAt := time.Now()
	regC.Abandon() // c keeps serving, so a call that still reaches it succeeds
	testkit.WaitFor(ctx, t, "calls on a after c expired", func() bool {
		_, lastC, _ := l.seen("c")
		_, lastA, _ := l.seen("a")
		return lastA.After(lastC.Add(500 * time.Millisecond))
	})
	_, lastC, _ := l.seen("c")
	t.Logf("connection dropped → last call on c: %v (session timeout 2s)", lastC.Sub(abandonedAt))
	if d := lastC.Sub(abandonedAt); d > 3*time.Second {
		t.Errorf("last call on c %v after its connection dropped, want within the 2s session timeout + 1s", d)
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
