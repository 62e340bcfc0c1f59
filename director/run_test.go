package director

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
)

// TestReady checks that Ready follows what Pick would pick: not ready with
// no backend, nor while every backend fails its health checks (Pick then
// still picks, in panic mode), ready again once one recovers.
func TestReady(t *testing.T) {
	t.Parallel()
	d, err := New(Config{Logger: discardLogger()})
	if err != nil {
		t.Fatal(err)
	}
	if d.Ready() {
		t.Error("Ready() = true before any backend set")
	}
	mustUpdate(t, d, state("a:1", "b:1"))
	if !d.Ready() {
		t.Error("Ready() = false with two healthy backends")
	}
	setHealthy := func(addr string, healthy bool) {
		t.Helper()
		d.mu.Lock()
		ctr := d.counters[addr]
		d.mu.Unlock()
		d.setHealth(addr, ctr, healthy, healthpb.HealthCheckResponse_NOT_SERVING, nil)
	}
	setHealthy("a:1", false)
	if !d.Ready() {
		t.Error("Ready() = false with b:1 still healthy")
	}
	setHealthy("b:1", false)
	if d.Ready() {
		t.Error("Ready() = true with every backend unhealthy")
	}
	for _, b := range d.Backends() {
		if b.Healthy || b.Reason != "health check answered NOT_SERVING" {
			t.Errorf("Backends() %s: Healthy %v, Reason %q; want unhealthy with the check's answer", b.Addr, b.Healthy, b.Reason)
		}
	}
	if _, _, err := d.Pick(t.Context(), "/s/m"); err != nil {
		t.Errorf("Pick() in panic mode error = %v, want a pick", err)
	}
	setHealthy("b:1", true)
	if !d.Ready() {
		t.Error("Ready() = false after b:1 recovered")
	}
	mustUpdate(t, d, state())
	if d.Ready() {
		t.Error("Ready() = true with an empty set")
	}
}

// TestRunEjectionExpiresWhileCallsFlow runs Run on the real clock: a
// backend is ejected by the failures done hands over, calls keep being
// picked and finished while the test holds the director's mutex (so neither
// Pick nor done waits for it), and the ejection ends on Run's timer once
// the mutex is free, without any Pick doing it.
func TestRunEjectionExpiresWhileCallsFlow(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	d, err := New(Config{Logger: discardLogger(), BaseEjection: 200 * time.Millisecond, MaxEjectionPercent: 100})
	if err != nil {
		t.Fatal(err)
	}
	mustUpdate(t, d, state("a:1", "b:1", "c:1"))
	runDirector(t, d)

	unavailable := status.Error(codes.Unavailable, "connection refused")
	ejected := func(addr string) bool {
		for _, b := range d.Backends() {
			if b.Addr == addr {
				return b.Ejected
			}
		}
		return false
	}
	call := func(fail string) string {
		addr, done, err := d.Pick(ctx, "/s/m")
		if err != nil {
			t.Fatalf("Pick() error = %v", err)
		}
		if addr == fail {
			done(unavailable)
		} else {
			done(nil)
		}
		return addr
	}
	for i := 0; !ejected("a:1"); i++ {
		if i > 1000 {
			t.Fatal("a:1 not ejected after 1000 calls failing on it")
		}
		call("a:1")
		if i%10 == 9 {
			testkit.WaitFor(ctx, t, "Run to act", func() bool { return len(d.wake) == 0 })
		}
	}

	// Hold the mutex past the ejection's end; 2,000 calls, failing on b:1
	// too (handing b:1's ejection to Run), must all go through meanwhile.
	d.mu.Lock()
	picked := make(map[string]int)
	for range 2000 {
		picked[call("b:1")]++
	}
	time.Sleep(250 * time.Millisecond) // past the 200ms ejection, mutex still held
	stillEjected := ejected("a:1")
	d.mu.Unlock()
	if picked["a:1"] != 0 {
		t.Errorf("ejected a:1 got %d calls while the mutex was held", picked["a:1"])
	}
	if !stillEjected {
		t.Error("a:1 restored while the mutex was held: something rebuilt without it")
	}

	// Run, free again, restores a:1 on its timer and decides b:1's run.
	testkit.WaitFor(ctx, t, "a:1 restored", func() bool { return !ejected("a:1") })
	testkit.WaitFor(ctx, t, "b:1 ejected", func() bool { return ejected("b:1") })
	got := make(map[string]int)
	for range 30 {
		got[call("")]++
	}
	if got["a:1"] == 0 || got["b:1"] != 0 {
		t.Errorf("picks after restore = %v, want a:1 back and b:1 ejected", got)
	}
}
