package cluster

import (
	"math/rand/v2"
	"runtime"
	"runtime/debug"
	rtmetrics "runtime/metrics"
	"testing"
	"time"
)

// runtimeGoal is the runtime's heap goal for GC percentage p
// (runtime/mgcpacer.go: the larger of its minimum heap, scaled by p, and
// the live heap plus p% of the live heap, stacks and globals).
func runtimeGoal(p int, live, scan uint64) uint64 {
	return max(runtimeHeapMinimum*uint64(p)/100, live+(live+scan)*uint64(p)/100)
}

// TestGCPercentFor checks, over random heaps, that the percentage
// gcPercentFor picks reaches the goal asked for and that one less would
// not: the heap is never held larger than asked.
func TestGCPercentFor(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 100000 {
		goal := uint64(r.IntN(64<<20)) + 1
		live := uint64(r.IntN(48 << 20))
		scan := uint64(r.IntN(1 << 20))
		if i%10 == 0 {
			live = 0 // no cycle yet
		}
		p := gcPercentFor(goal, live, scan)
		if p < 100 || p > maxGCPercent {
			t.Fatalf("gcPercentFor(%d, %d, %d) = %d, out of [100, %d]", goal, live, scan, p, maxGCPercent)
		}
		if p == maxGCPercent {
			continue
		}
		if g := runtimeGoal(p, live, scan); g < goal && runtimeGoal(100, live, scan) < goal {
			t.Fatalf("gcPercentFor(%d, %d, %d) = %d: goal %d, want at least %d", goal, live, scan, p, g, goal)
		}
		if p > 100 && runtimeGoal(p-1, live, scan) >= goal {
			t.Fatalf("gcPercentFor(%d, %d, %d) = %d, but %d already gives goal %d", goal, live, scan, p, p-1, runtimeGoal(p-1, live, scan))
		}
	}
	// The proxy's case: 1 MiB live, 8 MiB asked for. The minimum heap
	// term reaches it at 200.
	if p := gcPercentFor(8<<20, 1<<20, 64<<10); p != 200 {
		t.Errorf("gcPercentFor(8 MiB, 1 MiB, 64 KiB) = %d, want 200", p)
	}
	// A heap already past it: the runtime's own 100.
	if p := gcPercentFor(8<<20, 6<<20, 0); p != 100 {
		t.Errorf("gcPercentFor(8 MiB, 6 MiB, 0) = %d, want 100", p)
	}
}

// readGC returns the runtime's current heap goal and GC percentage.
func readGC() (goal, percent uint64) {
	s := []rtmetrics.Sample{{Name: "/gc/heap/goal:bytes"}, {Name: "/gc/gogc:percent"}}
	rtmetrics.Read(s)
	return s[0].Value.Uint64(), s[1].Value.Uint64()
}

// waitGC runs collections until cond holds for the runtime's goal and
// percentage (the keeper updates after a cycle, on the cleanup goroutine),
// or fails t after 10 s.
func waitGC(t *testing.T, what string, cond func(goal, percent uint64) bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		runtime.GC()
		goal, percent := readGC()
		if cond(goal, percent) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: heap goal %d, GC percentage %d after 10 s of collections", what, goal, percent)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestKeepMinHeapGoal runs a keeper in this process and checks the goal
// the runtime reports: at least the minimum while the live heap is small,
// the runtime's own twice-the-live-heap once the live heap is large (no
// more), and the previous percentage after stop.
func TestKeepMinHeapGoal(t *testing.T) {
	// Not parallel: the GC percentage is the process's.
	const min = 96 << 20 // well over this test binary's live heap
	prev := debug.SetGCPercent(100)
	defer debug.SetGCPercent(prev)

	stop := KeepMinHeapGoal(min)
	waitGC(t, "small live heap", func(goal, percent uint64) bool { return goal >= min && percent > 100 })
	// A second keeper, as a second server in the process, changes nothing
	// and its stop does not stop the first.
	KeepMinHeapGoal(2 * min)()
	waitGC(t, "beside a second keeper", func(goal, percent uint64) bool { return goal >= min && goal < 2*min && percent > 100 })

	// A live heap of 64 MiB: twice that is past the minimum, so the
	// percentage goes back to 100.
	live := make([][]byte, 64)
	for i := range live {
		live[i] = make([]byte, 1<<20)
	}
	waitGC(t, "large live heap", func(goal, percent uint64) bool { return percent == 100 && goal >= 128<<20 })
	runtime.KeepAlive(live)
	live = nil

	stop()
	stop() // idempotent
	if _, percent := readGC(); percent != 100 {
		t.Errorf("GC percentage %d after stop, want 100 as before", percent)
	}
	// Stopped: a small heap stays at the runtime's own goal.
	waitGC(t, "after stop", func(goal, percent uint64) bool { return percent == 100 && goal < min })

	// GOGC in the environment: the operator chose; nothing is kept.
	t.Setenv("GOGC", "100")
	stop = KeepMinHeapGoal(min)
	defer stop()
	runtime.GC()
	time.Sleep(50 * time.Millisecond)
	runtime.GC()
	if _, percent := readGC(); percent != 100 {
		t.Errorf("GC percentage %d with GOGC set, want 100", percent)
	}
}
