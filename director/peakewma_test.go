package director

import (
	"container/heap"
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/streamlb/streamlb/resolver"
)

func TestEWMA(t *testing.T) {
	t.Parallel()
	const tau = float64(10 * time.Second)
	ms := float64(time.Millisecond)
	t0 := time.Unix(1_700_000_000, 0)
	at := func(d time.Duration) int64 { return t0.Add(d).UnixNano() }
	type step struct {
		at     time.Duration
		sample float64 // ns; negative means read only
		want   float64 // estimate at `at` after the step, ns
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{name: "initial value", steps: []step{{at: 0, sample: -1, want: 30 * ms}}},
		{name: "peak replaces at once", steps: []step{{at: 0, sample: 80 * ms, want: 80 * ms}}},
		{name: "idle decay toward zero", steps: []step{{at: 10 * time.Second, sample: -1, want: 30 * ms / math.E}}},
		{
			name: "lower sample blends with the elapsed time",
			steps: []step{
				// w = exp(-1) after τ: est = 30/e + 10·(1-1/e).
				{at: 10 * time.Second, sample: 10 * ms, want: 30*ms/math.E + 10*ms*(1-1/math.E)},
			},
		},
		{
			name: "sample at the same instant only counts as a peak",
			steps: []step{
				{at: 0, sample: 10 * ms, want: 30 * ms},
				{at: 0, sample: 40 * ms, want: 40 * ms},
			},
		},
		{
			name: "peak compares with the decayed estimate",
			steps: []step{
				// After τ the estimate is 11.04ms, so 20ms is a peak.
				{at: 10 * time.Second, sample: 20 * ms, want: 20 * ms},
			},
		},
		{
			name: "earlier timestamp does not move time back",
			steps: []step{
				{at: time.Second, sample: 50 * ms, want: 50 * ms},
				{at: 0, sample: 1 * ms, want: 50 * ms},
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var e ewma
			e.reset(30*time.Millisecond, t0)
			for i, s := range tc.steps {
				if s.sample >= 0 {
					e.update(s.sample, at(s.at), tau)
				}
				// Read at the latest time seen, as time never goes back.
				readAt := max(at(s.at), e.at.Load())
				if got := e.estimate(readAt, tau); math.Abs(got-s.want) > 1 {
					t.Errorf("step %d: estimate = %.0fns, want %.0fns", i, got, s.want)
				}
			}
		})
	}
}

func TestPeakEWMAObserve(t *testing.T) {
	t.Parallel()
	clk := newFakeClock()
	p := newPeakEWMA(2, noRand(t), clk.Now, 0, 10*time.Second, time.Second)
	tests := []struct {
		name    string
		elapsed time.Duration
		err     error
		want    time.Duration // estimate right after; the initial one is 30ms
	}{
		{name: "slow success is a peak", elapsed: 50 * time.Millisecond, want: 50 * time.Millisecond},
		{name: "fast failure counts as the penalty", elapsed: time.Millisecond, err: errUnavailable, want: time.Second},
		{name: "application error too", elapsed: time.Millisecond, err: errNotFound, want: time.Second},
		{name: "deadline too", elapsed: time.Millisecond, err: errDeadline, want: time.Second},
		{name: "failure slower than the penalty counts as itself", elapsed: 3 * time.Second, err: errors.New("reset"), want: 3 * time.Second},
		{name: "quick cancel is not counted", elapsed: 5 * time.Millisecond, err: errCanceled, want: 30 * time.Millisecond},
		{name: "quick context cancel is not counted", elapsed: 5 * time.Millisecond, err: fmt.Errorf("relay: %w", context.Canceled), want: 30 * time.Millisecond},
		{name: "long cancel is a peak", elapsed: 5 * time.Second, err: errCanceled, want: 5 * time.Second},
		{name: "long context cancel is a peak", elapsed: 5 * time.Second, err: fmt.Errorf("relay: %w", context.Canceled), want: 5 * time.Second},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c := newCounters()
			start := clk.Now()
			c.latency.reset(30*time.Millisecond, start)
			end := start.Add(tc.elapsed).UnixNano()
			p.observe(c, start.UnixNano(), end, tc.err)
			// As of the last update, so no decay.
			if got := c.latency.estimate(c.latency.at.Load(), p.tau); math.Abs(got-float64(tc.want)) > float64(time.Millisecond) {
				t.Errorf("estimate = %v, want %v", time.Duration(got), tc.want)
			}
		})
	}
}

// TestPeakEWMAPick checks the cost: estimate × (in flight + 1).
func TestPeakEWMAPick(t *testing.T) {
	t.Parallel()
	clk := newFakeClock()
	tests := []struct {
		name     string
		rtts     []time.Duration
		inflight []int64
		draws    []int
		want     string
	}{
		{name: "lower latency wins", rtts: []time.Duration{30 * time.Millisecond, 10 * time.Millisecond}, inflight: []int64{0, 0}, draws: []int{0, 0}, want: "b1"},
		{name: "busy fast backend loses", rtts: []time.Duration{30 * time.Millisecond, 10 * time.Millisecond}, inflight: []int64{0, 3}, draws: []int{0, 0}, want: "b0"},
		{name: "tie goes to first sample", rtts: []time.Duration{10 * time.Millisecond, 20 * time.Millisecond, 10 * time.Millisecond}, inflight: []int64{1, 0, 1}, draws: []int{2, 0}, want: "b2"},
		{name: "zero estimates compare in flight", rtts: []time.Duration{0, 0}, inflight: []int64{2, 1}, draws: []int{0, 0}, want: "b1"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			bs := testPool(tc.inflight...)
			for i, rtt := range tc.rtts {
				bs[i].ctr.latency.reset(rtt, clk.Now())
			}
			p := newPeakEWMA(2, seqRand(t, nil, tc.draws...), clk.Now, 0, 10*time.Second, time.Second)
			if got := pickFrom(p, bs).addr; got != tc.want {
				t.Errorf("pick() = %s, want %s", got, tc.want)
			}
		})
	}
}

// simBackend is a simulated backend: how long its streams take, and how
// they end.
type simBackend struct {
	latency time.Duration
	err     error
}

// simEvent is a stream that ends at a simulated time.
type simEvent struct {
	at   time.Time
	seq  int // tie-break: end in pick order
	done func(error)
	err  error
}

type simQueue []simEvent

func (q simQueue) Len() int { return len(q) }
func (q simQueue) Less(i, j int) bool {
	if !q[i].at.Equal(q[j].at) {
		return q[i].at.Before(q[j].at)
	}
	return q[i].seq < q[j].seq
}
func (q simQueue) Swap(i, j int) { q[i], q[j] = q[j], q[i] }
func (q *simQueue) Push(x any)   { *q = append(*q, x.(simEvent)) }
func (q *simQueue) Pop() any {
	old := *q
	x := old[len(old)-1]
	*q = old[:len(old)-1]
	return x
}

// simulate drives d on clk with picks every gap of simulated time, each
// stream ending after its backend's latency, streams overlapping when gap
// is shorter than a latency. It returns the pick counts by address.
func simulate(t *testing.T, d *Director, clk *fakeClock, backends map[string]simBackend, picks int, gap time.Duration) map[string]int {
	t.Helper()
	var q simQueue
	counts := make(map[string]int)
	endDue := func(until time.Time) {
		for q.Len() > 0 && !q[0].at.After(until) {
			ev := heap.Pop(&q).(simEvent)
			clk.Set(ev.at)
			ev.done(ev.err)
		}
		clk.Set(until)
	}
	for i := range picks {
		addr, done, err := d.Pick(context.Background(), "/s/m")
		if err != nil {
			t.Fatalf("Pick() error = %v", err)
		}
		counts[addr]++
		sb := backends[addr]
		heap.Push(&q, simEvent{at: clk.Now().Add(sb.latency), seq: i, done: done, err: sb.err})
		endDue(clk.Now().Add(gap))
	}
	endDue(clk.Now().Add(time.Hour))
	return counts
}

// TestPeakEWMASimulated checks, on a fake clock, that latency-aware
// picking sends clearly less traffic to a slow backend, and little to one
// that fails fast, than to its fast siblings, both with streams one at a
// time and overlapping.
func TestPeakEWMASimulated(t *testing.T) {
	t.Parallel()
	fast := simBackend{latency: 10 * time.Millisecond}
	tests := []struct {
		name     string
		slow     simBackend
		gap      time.Duration
		maxShare float64 // of c:1, relative to the mean of a:1 and b:1
	}{
		{name: "20ms slower, sequential", slow: simBackend{latency: 30 * time.Millisecond}, gap: 30 * time.Millisecond, maxShare: 0.5},
		{name: "20ms slower, overlapping", slow: simBackend{latency: 30 * time.Millisecond}, gap: 2 * time.Millisecond, maxShare: 0.5},
		{name: "fails fast, sequential", slow: simBackend{latency: time.Millisecond, err: errInternal}, gap: 30 * time.Millisecond, maxShare: 0.05},
		{name: "fails fast, overlapping", slow: simBackend{latency: time.Millisecond, err: errUnavailable}, gap: 2 * time.Millisecond, maxShare: 0.05},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			clk := newFakeClock()
			d, err := New(Config{
				Policy: PeakEWMA,
				Logger: discardLogger(),
				Rand:   rand.New(rand.NewPCG(5, 6)),
				Now:    clk.Now,
				// Ejection would hide the policy's own reaction.
				EjectAfter: -1,
			})
			if err != nil {
				t.Fatal(err)
			}
			mustUpdate(t, d, state("a:1", "b:1", "c:1"))
			counts := simulate(t, d, clk, map[string]simBackend{"a:1": fast, "b:1": fast, "c:1": tc.slow}, 10000, tc.gap)
			fastMean := float64(counts["a:1"]+counts["b:1"]) / 2
			share := float64(counts["c:1"]) / fastMean
			t.Logf("picks %v; c:1 share relative to fast backends %.3f", counts, share)
			if share > tc.maxShare {
				t.Errorf("c:1 got %d picks, %.2f of a fast backend's %.0f; want at most %.2f", counts["c:1"], share, fastMean, tc.maxShare)
			}
			for _, b := range d.Backends() {
				if b.InFlight != 0 {
					t.Errorf("%s has %d in flight after the simulation", b.Addr, b.InFlight)
				}
			}
		})
	}
}

// TestLeastRequestIgnoresLatency is the control for TestPeakEWMASimulated:
// with streams one at a time, in-flight counts are all equal, so
// least_request cannot tell the slow backend apart.
func TestLeastRequestIgnoresLatency(t *testing.T) {
	t.Parallel()
	clk := newFakeClock()
	d, err := New(Config{Policy: LeastRequest, Logger: discardLogger(), Rand: rand.New(rand.NewPCG(5, 6)), Now: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	mustUpdate(t, d, resolver.State{Addresses: []resolver.Address{{Addr: "a:1"}, {Addr: "b:1"}, {Addr: "c:1"}}})
	counts := simulate(t, d, clk, map[string]simBackend{
		"a:1": {latency: 10 * time.Millisecond},
		"b:1": {latency: 10 * time.Millisecond},
		"c:1": {latency: 30 * time.Millisecond},
	}, 3000, 30*time.Millisecond)
	if n := counts["c:1"]; n < 800 || n > 1200 {
		t.Errorf("c:1 got %d of 3000 picks, want about 1000", n)
	}
}
