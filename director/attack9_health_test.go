package director

import (
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/streamlb/streamlb/resolver"
)

func TestAtkHealthBlackHole(t *testing.T) {
	srv := startBackends(t, 1)
	bh := newBlackHole(t)
	d, err := New(Config{Logger: discardLogger(), HealthCheckInterval: 50 * time.Millisecond, HealthCheckTimeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	addr := bh.ln.Addr().String()
	mustUpdate(t, d, resolver.State{Addresses: []resolver.Address{{Addr: srv[0].Addr()}, {Addr: addr}}})
	runDirector(t, d)
	took := waitFor(t, 5*time.Second, "black hole unhealthy", func() bool { return !healthyOf(d, addr) })
	t.Logf("black hole unhealthy after %v, conns open %d", took, bh.open.Load())
	mustUpdate(t, d, stateOf(srv[0]))
	waitFor(t, 5*time.Second, "black hole conns closed", func() bool { return bh.closed.Load() == bh.open.Load() })
	opened := bh.open.Load()
	time.Sleep(500 * time.Millisecond)
	if n := bh.open.Load(); n != opened {
		t.Errorf("removed backend still dialled: %d conns, was %d", n, opened)
	}
}

func fdCount() int {
	es, _ := os.ReadDir("/proc/self/fd")
	return len(es)
}

func TestAtkHealthChurnLeak(t *testing.T) {
	srv := startBackends(t, 3)
	d, err := New(Config{Logger: discardLogger(), HealthCheckInterval: 20 * time.Millisecond, HealthCheckTimeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	mustUpdate(t, d, stateOf(srv[0]))
	runDirector(t, d)
	time.Sleep(200 * time.Millisecond)
	runtime.GC()
	g0, f0 := runtime.NumGoroutine(), fdCount()
	for i := range 100 {
		if i%2 == 0 {
			mustUpdate(t, d, stateOf(srv...))
		} else {
			mustUpdate(t, d, stateOf(srv[0]))
		}
		time.Sleep(time.Duration(i%7) * time.Millisecond)
	}
	mustUpdate(t, d, stateOf(srv[0]))
	var g1, f1 int
	deadline := time.Now().Add(5 * time.Second)
	for {
		runtime.GC()
		g1, f1 = runtime.NumGoroutine(), fdCount()
		if (g1 <= g0+2 && f1 <= f0+2) || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("goroutines %d -> %d, fds %d -> %d", g0, g1, f0, f1)
	if g1 > g0+2 || f1 > f0+2 {
		t.Errorf("after 100 set changes: goroutines %d -> %d, fds %d -> %d", g0, g1, f0, f1)
	}
}

func TestAtkHealthBlackHoleRunCancel(t *testing.T) {
	srv := startBackends(t, 1)
	bh := newBlackHole(t)
	d, err := New(Config{Logger: discardLogger(), HealthCheckInterval: 50 * time.Millisecond, HealthCheckTimeout: 20 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	addr := bh.ln.Addr().String()
	mustUpdate(t, d, resolver.State{Addresses: []resolver.Address{{Addr: srv[0].Addr()}, {Addr: addr}}})
	stop := runDirector(t, d)
	waitFor(t, 5*time.Second, "check connected", func() bool { return bh.open.Load() >= 1 })
	mustUpdate(t, d, stateOf(srv[0]))
	waitFor(t, 3*time.Second, "black hole conn closed after removal", func() bool { return bh.closed.Load() == bh.open.Load() })
	mustUpdate(t, d, resolver.State{Addresses: []resolver.Address{{Addr: srv[0].Addr()}, {Addr: addr}}})
	waitFor(t, 5*time.Second, "check connected again", func() bool { return bh.open.Load() >= 2 })
	start := time.Now()
	stop()
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("Run returned %v after cancel", took)
	}
}
