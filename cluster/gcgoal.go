package cluster

import (
	"math"
	"os"
	"runtime"
	"runtime/debug"
	rtmetrics "runtime/metrics"
	"sync"
	"sync/atomic"
)

// DefaultMinHeapGoal is the heap goal below which [KeepMinHeapGoal] keeps
// the collector from starting a cycle, unless set otherwise
// (ServerConfig.MinHeapGoal, --gc-min-heap).
const DefaultMinHeapGoal = 8 << 20

// runtimeHeapMinimum is the Go runtime's own minimum heap goal at GOGC=100
// (runtime/mgcpacer.go, defaultHeapMinimum); it scales with GOGC.
const runtimeHeapMinimum = 4 << 20

// maxGCPercent bounds the GC percentage KeepMinHeapGoal sets.
const maxGCPercent = 10000

// Minimum heap goal. The collector starts a cycle when the heap reaches its
// goal: by default (GOGC=100) twice the heap that was live after the last
// cycle (plus the goroutine stacks and globals scanned), and never less
// than 4 MiB. A proxy's live heap is small, about 1 MiB under a unary load
// on one connection, while each call allocates about 2 KiB that dies with
// it, so the 4 MiB minimum makes the collector run every 1,200 calls or
// so; a cycle costs its marking, and every span of the short-lived objects
// must then be swept again (issue 12: about 5% of the CPU per call at full
// speed, the same with GOGC=200 as with 400). The runtime has no minimum
// heap knob (golang/go#23044, #42430), and a larger GOGC would also grow
// large heaps, those of many connections, by the same factor.
//
// So KeepMinHeapGoal raises the GC percentage after each cycle just enough
// for the heap goal to be at least min while the live heap is small, and
// sets it back to 100 once twice the live heap is past min on its own:
// the price is at most min minus 4 MiB of heap when the heap is small, and
// nothing once it is not. It leaves the collector alone when the
// environment sets GOGC (the operator chose), and GOMEMLIMIT still
// applies: the runtime collects sooner when the limit is near, whatever
// the percentage.

// gcPercentFor returns the smallest GC percentage, at least 100, that
// gives a heap goal of at least min, for live bytes of heap marked live by
// the last cycle and scan bytes of stacks and globals. The runtime's goal
// with percentage p is max(4 MiB × p/100, live + (live+scan) × p/100).
func gcPercentFor(goal, live, scan uint64) int {
	if goal <= runtimeHeapMinimum || live+(live+scan) >= goal {
		return 100
	}
	// Either term of the runtime's goal may reach goal first.
	byMinimum := ceilDiv(100*goal, runtimeHeapMinimum)
	byLive := uint64(math.MaxUint64)
	if live+scan > 0 {
		byLive = ceilDiv(100*(goal-live), live+scan)
	}
	return int(max(100, min(byMinimum, byLive, maxGCPercent)))
}

func ceilDiv(a, b uint64) uint64 { return (a + b - 1) / b }

// gcGoalKeeper re-arms itself after each GC cycle: a cleanup on an object
// nothing references runs once a cycle found it unreachable.
type gcGoalKeeper struct {
	min     uint64
	mu      sync.Mutex
	stopped bool
	percent int // last set
	samples []rtmetrics.Sample
}

// gcSentinel is the object whose cleanup marks a cycle. It holds a pointer
// so the allocator does not pack it with other tiny objects, which would
// tie its cleanup to theirs.
type gcSentinel struct{ _ *int }

// keeperActive is set while a keeper runs.
var keeperActive atomic.Bool

var gcGoalMetrics = []string{"/gc/heap/live:bytes", "/gc/scan/stack:bytes", "/gc/scan/globals:bytes"}

// KeepMinHeapGoal keeps the collector's heap goal at least min bytes (see
// above) until stop is called, which sets the GC percentage back to what
// it was. It does nothing, and stop does nothing, when min is 4 MiB or
// less, when the environment sets GOGC, or while another keeper runs: the
// GC percentage is the process's, so the first keeper rules (servers run
// side by side in one process share it).
func KeepMinHeapGoal(min int64) (stop func()) {
	if min <= runtimeHeapMinimum {
		return func() {}
	}
	if _, set := os.LookupEnv("GOGC"); set {
		return func() {}
	}
	if !keeperActive.CompareAndSwap(false, true) {
		return func() {}
	}
	k := &gcGoalKeeper{min: uint64(min), percent: 100}
	for _, name := range gcGoalMetrics {
		k.samples = append(k.samples, rtmetrics.Sample{Name: name})
	}
	prev := debug.SetGCPercent(100)
	k.update()
	k.arm()
	return func() {
		k.mu.Lock()
		defer k.mu.Unlock()
		if !k.stopped {
			k.stopped = true
			debug.SetGCPercent(prev)
			keeperActive.Store(false)
		}
	}
}

func (k *gcGoalKeeper) arm() {
	runtime.AddCleanup(&gcSentinel{}, func(k *gcGoalKeeper) {
		if k.update() {
			k.arm()
		}
	}, k)
}

// update sets the percentage for the heap the last cycle left; false once
// stopped.
func (k *gcGoalKeeper) update() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.stopped {
		return false
	}
	rtmetrics.Read(k.samples)
	var v [3]uint64
	for i, s := range k.samples {
		if s.Value.Kind() == rtmetrics.KindUint64 {
			v[i] = s.Value.Uint64()
		}
	}
	if p := gcPercentFor(k.min, v[0], v[1]+v[2]); p != k.percent {
		k.percent = p
		debug.SetGCPercent(p)
	}
	return true
}
