package director

import (
	"math/rand/v2"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/streamlb/streamlb/resolver"
)

func TestSlowStartFactor(t *testing.T) {
	t.Parallel()
	const w = 10 * time.Second
	tests := []struct {
		elapsed time.Duration
		want    float64
	}{
		{-time.Second, 0.1},
		{0, 0.1},
		{500 * time.Millisecond, 0.1},
		{time.Second, 0.1},
		{2 * time.Second, 0.2},
		{5 * time.Second, 0.5},
		{9 * time.Second, 0.9},
		{w, 1},
		{time.Hour, 1},
	}
	for _, tc := range tests {
		if got := slowStartFactor(tc.elapsed, w); got != tc.want {
			t.Errorf("slowStartFactor(%v, %v) = %v, want %v", tc.elapsed, w, got, tc.want)
		}
	}
}

// newSlowStartDirector returns a director on clk with SlowStart 10s, the
// first set (which does not slow-start) already applied.
func newSlowStartDirector(t *testing.T, policy string, r randSource, clk *fakeClock, first resolver.State) *Director {
	t.Helper()
	if r == nil {
		r = fakeRand(func(int) int { return 0 })
	}
	d, err := New(Config{Policy: policy, Logger: discardLogger(), Rand: r, Now: clk.Now, SlowStart: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	mustUpdate(t, d, first)
	return d
}

// TestSlowStartRoundRobin walks a joining backend through its window: the
// counts are exact, as each step's schedule is picked through whole cycles.
func TestSlowStartRoundRobin(t *testing.T) {
	t.Parallel()
	clk := newFakeClock()
	d := newSlowStartDirector(t, RoundRobin, nil, clk, state("a:1", "b:1"))
	if diff := cmp.Diff(map[string]int{"a:1": 100, "b:1": 100}, pickCounts(t, d, 200)); diff != "" {
		t.Errorf("first set slow-started (-want +got):\n%s", diff)
	}
	mustUpdate(t, d, state("a:1", "b:1", "c:1"))
	steps := []struct {
		advance time.Duration
		picks   int
		want    map[string]int
	}{
		{advance: 0, picks: 210, want: map[string]int{"a:1": 100, "b:1": 100, "c:1": 10}},
		{advance: 5 * time.Second, picks: 250, want: map[string]int{"a:1": 100, "b:1": 100, "c:1": 50}},
		{advance: 4 * time.Second, picks: 290, want: map[string]int{"a:1": 100, "b:1": 100, "c:1": 90}},
		{advance: time.Second, picks: 300, want: map[string]int{"a:1": 100, "b:1": 100, "c:1": 100}},
	}
	elapsed := time.Duration(0)
	for _, s := range steps {
		clk.Advance(s.advance)
		elapsed += s.advance
		if diff := cmp.Diff(s.want, pickCounts(t, d, s.picks)); diff != "" {
			t.Errorf("after %v: picks mismatch (-want +got):\n%s", elapsed, diff)
		}
	}
	d.reconcile()
	if s := d.snap.Load(); s.rebuildAt != 0 || s.picker.(*rotationPicker).sched != nil {
		t.Errorf("after the window: rebuildAt = %d, schedule of %d; want no more rebuilds and plain rotation", s.rebuildAt, len(s.picker.(*rotationPicker).sched))
	}
}

func TestSlowStartWeightedRoundRobin(t *testing.T) {
	t.Parallel()
	clk := newFakeClock()
	d := newSlowStartDirector(t, WeightedRoundRobin, nil, clk,
		resolver.State{Addresses: []resolver.Address{{Addr: "a:1", Weight: 1}, {Addr: "b:1", Weight: 3}}})
	mustUpdate(t, d, resolver.State{Addresses: []resolver.Address{{Addr: "a:1", Weight: 1}, {Addr: "b:1", Weight: 3}, {Addr: "c:1", Weight: 2}}})
	// Effective weights 100, 300 and 2×100×0.1.
	if diff := cmp.Diff(map[string]int{"a:1": 50, "b:1": 150, "c:1": 10}, pickCounts(t, d, 210)); diff != "" {
		t.Errorf("picks at the window's start (-want +got):\n%s", diff)
	}
	clk.Advance(10 * time.Second)
	if diff := cmp.Diff(map[string]int{"a:1": 100, "b:1": 300, "c:1": 200}, pickCounts(t, d, 600)); diff != "" {
		t.Errorf("picks after the window (-want +got):\n%s", diff)
	}
}

// TestSlowStartShares checks the joining backend's share for the policies
// that draw randomness, at the start of the window, half way and after it.
// For the P2C policies all loads are equal, so the first sample wins: the
// share is f/3 + (1-f)/3 · 1/3 (picked, or skipped and picked again).
func TestSlowStartShares(t *testing.T) {
	t.Parallel()
	p2c := func(f float64) float64 { return f/3 + (1-f)/9 }
	tests := []struct {
		policy string
		want   func(f float64) float64
	}{
		{policy: Random, want: func(f float64) float64 { return f / (2 + f) }},
		{policy: LeastRequest, want: p2c},
		{policy: PeakEWMA, want: p2c},
	}
	for _, tc := range tests {
		t.Run(tc.policy, func(t *testing.T) {
			t.Parallel()
			clk := newFakeClock()
			d := newSlowStartDirector(t, tc.policy, rand.New(rand.NewPCG(7, 8)), clk, state("a:1", "b:1"))
			mustUpdate(t, d, state("a:1", "b:1", "c:1"))
			for _, s := range []struct {
				advance time.Duration
				f       float64
			}{{0, 0.1}, {5 * time.Second, 0.5}, {5 * time.Second, 1}} {
				clk.Advance(s.advance)
				const n = 12000
				got := float64(pickCounts(t, d, n)["c:1"]) / n
				if want := tc.want(s.f); got < want-0.02 || got > want+0.02 {
					t.Errorf("factor %.1f: c:1 share %.3f, want %.3f±0.02", s.f, got, want)
				}
			}
		})
	}
}

// TestSlowStartNotForFirstSet checks that neither the first set nor one
// that follows an empty set slow-starts.
func TestSlowStartNotForFirstSet(t *testing.T) {
	t.Parallel()
	for _, policy := range []string{RoundRobin, WeightedRoundRobin} {
		t.Run(policy, func(t *testing.T) {
			t.Parallel()
			clk := newFakeClock()
			d := newSlowStartDirector(t, policy, nil, clk, state("a:1", "b:1", "c:1"))
			want := map[string]int{"a:1": 100, "b:1": 100, "c:1": 100}
			if diff := cmp.Diff(want, pickCounts(t, d, 300)); diff != "" {
				t.Errorf("first set (-want +got):\n%s", diff)
			}
			mustUpdate(t, d, resolver.State{})
			mustUpdate(t, d, state("a:1", "b:1", "c:1"))
			if diff := cmp.Diff(want, pickCounts(t, d, 300)); diff != "" {
				t.Errorf("set after an empty one (-want +got):\n%s", diff)
			}
		})
	}
}

// TestSlowStartStepsRebuild checks the rebuild schedule: every
// SlowStart/20 while a backend slow-starts, and never after.
func TestSlowStartStepsRebuild(t *testing.T) {
	t.Parallel()
	clk := newFakeClock()
	d := newSlowStartDirector(t, RoundRobin, nil, clk, state("a:1"))
	start := clk.Now()
	mustUpdate(t, d, state("a:1", "b:1"))
	for i := 1; i <= slowStartSteps; i++ {
		want := monoNanos(start.Add(time.Duration(i) * 500 * time.Millisecond))
		if got := d.snap.Load().rebuildAt; got != want {
			t.Fatalf("step %d: rebuildAt = %d, want %d", i, got, want)
		}
		clk.Advance(500 * time.Millisecond)
		pickCounts(t, d, 1)
	}
	if got := d.snap.Load().rebuildAt; got != 0 {
		t.Errorf("after the window: rebuildAt = %d, want 0", got)
	}
}
