package director

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// fakeRand is a hand-written randomness source for tests.
type fakeRand func(n int) int

func (f fakeRand) IntN(n int) int { return f(n) }

// seqRand returns vals in order, failing the test if a value is out of
// range for the call or the sequence runs out. It records each call's n in
// *args when args is non-nil. Not safe for concurrent use.
func seqRand(t *testing.T, args *[]int, vals ...int) fakeRand {
	t.Helper()
	return func(n int) int {
		if args != nil {
			*args = append(*args, n)
		}
		if len(vals) == 0 {
			t.Fatalf("IntN(%d) called more often than expected", n)
		}
		v := vals[0]
		vals = vals[1:]
		if v < 0 || v >= n {
			t.Fatalf("fake IntN(%d) would return %d, out of range", n, v)
		}
		return v
	}
}

// noRand fails the test if the policy asks for randomness at all.
func noRand(t *testing.T) fakeRand {
	return func(n int) int {
		t.Fatalf("IntN(%d) called, want no randomness", n)
		return 0
	}
}

// testPool returns backends "b0", "b1", … with the given in-flight counts.
func testPool(inflight ...int64) []*backend {
	bs := make([]*backend, len(inflight))
	for i, n := range inflight {
		bs[i] = &backend{addr: fmt.Sprintf("b%d", i), weight: 1, ctr: newCounters(), slowFactor: 1}
		bs[i].ctr.inflight.Store(n)
	}
	return bs
}

// pickFrom builds a picker of bs for p, as a snapshot build would, and
// picks from it with a background context.
func pickFrom(p builder, bs []*backend) *backend {
	return prepared(p, bs).pick(context.Background())
}

// prepared returns p's picker over bs.
func prepared(p builder, bs []*backend) picker {
	anySlow := false
	for _, b := range bs {
		if b.slowSince != 0 {
			anySlow = true
		}
	}
	return p.build(bs, anySlow)
}

// newWeightedRotation is the WeightedRoundRobin builder.
func newWeightedRotation(r randSource) *rotation { return newRotation(r, true) }

func addrsOf(bs []*backend) []string {
	out := make([]string, len(bs))
	for i, b := range bs {
		out[i] = b.addr
	}
	return out
}

func TestRoundRobin(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		offset int
		pool   int
		picks  int
		want   []string
	}{
		{name: "exact rotation", offset: 0, pool: 3, picks: 7, want: []string{"b0", "b1", "b2", "b0", "b1", "b2", "b0"}},
		{name: "random offset", offset: 4, pool: 3, picks: 4, want: []string{"b1", "b2", "b0", "b1"}},
		{name: "single backend", offset: 9, pool: 1, picks: 3, want: []string{"b0", "b0", "b0"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			p := newRotation(seqRand(t, nil, tc.offset), false)
			ps := prepared(p, testPool(make([]int64, tc.pool)...))
			var got []string
			for range tc.picks {
				got = append(got, ps.pick(context.Background()).addr)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("picks mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestRoundRobinSetChangeContinuesRotation(t *testing.T) {
	t.Parallel()
	p := newRotation(seqRand(t, nil, 0), false)
	three := testPool(0, 0, 0)
	two := three[:2]
	var got []string
	for _, bs := range [][]*backend{three, three, two, two, two} {
		got = append(got, pickFrom(p, bs).addr)
	}
	// Counter 0,1 on three backends, then 2,3,4 mod 2 on two.
	want := []string{"b0", "b1", "b0", "b1", "b0"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("picks mismatch (-want +got):\n%s", diff)
	}
}

func TestLeastRequest(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		choices  int
		inflight []int64
		draws    []int
		want     string
		wantArgs []int // n passed to each IntN call
	}{
		{name: "single backend needs no randomness", choices: 2, inflight: []int64{7}, want: "b0"},
		{name: "second sample less loaded", choices: 2, inflight: []int64{5, 1, 3}, draws: []int{0, 0}, want: "b1", wantArgs: []int{3, 2}},
		{name: "first sample less loaded", choices: 2, inflight: []int64{5, 1, 3}, draws: []int{1, 1}, want: "b1", wantArgs: []int{3, 2}},
		{name: "draws map to distinct indices", choices: 2, inflight: []int64{0, 9, 2, 0, 0}, draws: []int{1, 1}, want: "b2", wantArgs: []int{5, 4}},
		{name: "least loaded not sampled", choices: 2, inflight: []int64{0, 4, 3, 8}, draws: []int{3, 1}, want: "b1", wantArgs: []int{4, 3}},
		{name: "tie goes to first sample", choices: 2, inflight: []int64{2, 2, 2}, draws: []int{2, 0}, want: "b2", wantArgs: []int{3, 2}},
		{name: "pool of two compares both", choices: 2, inflight: []int64{3, 1}, draws: []int{0, 0}, want: "b1", wantArgs: []int{2, 1}},
		{name: "choices capped at pool size", choices: 5, inflight: []int64{4, 0, 4}, draws: []int{2, 1, 0}, want: "b1", wantArgs: []int{3, 2, 1}},
		{name: "three choices", choices: 3, inflight: []int64{1, 1, 1, 0, 9, 1}, draws: []int{4, 0, 2}, want: "b3", wantArgs: []int{6, 5, 4}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var r fakeRand
			var args []int
			if tc.draws == nil {
				r = noRand(t)
			} else {
				r = seqRand(t, &args, tc.draws...)
			}
			p := newLeastRequest(tc.choices, r, nil, 0)
			got := pickFrom(p, testPool(tc.inflight...)).addr
			if got != tc.want {
				t.Errorf("pick() = %s, want %s", got, tc.want)
			}
			if diff := cmp.Diff(tc.wantArgs, args); diff != "" {
				t.Errorf("IntN arguments mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

// TestLeastRequestSamplesDistinct drives the policy with a seeded real
// source, recovers the sampled indices from the raw IntN results, and checks
// that samples are distinct, that the least loaded sample wins (loads fall
// with the index, so that is the highest sampled index), and that the first
// sample, which wins ties, is spread evenly over the pool.
func TestLeastRequestSamplesDistinct(t *testing.T) {
	t.Parallel()
	src := rand.New(rand.NewPCG(1, 2))
	for _, tc := range []struct{ pool, choices int }{{2, 2}, {3, 2}, {5, 3}, {10, 10}, {12, 10}} {
		t.Run(fmt.Sprintf("pool=%d,choices=%d", tc.pool, tc.choices), func(t *testing.T) {
			// Decreasing loads: a later index is always less loaded.
			loads := make([]int64, tc.pool)
			for i := range loads {
				loads[i] = int64(tc.pool - i)
			}
			bs := testPool(loads...)
			firstCounts := make([]int, tc.pool)
			for range 2000 {
				var raw []int
				r := fakeRand(func(n int) int { v := src.IntN(n); raw = append(raw, v); return v })
				p := newLeastRequest(tc.choices, r, nil, 0)
				got := pickFrom(p, bs)
				idx := decodeDraws(raw, tc.pool)
				if len(idx) != min(tc.choices, tc.pool) {
					t.Fatalf("drew %d samples, want %d", len(idx), min(tc.choices, tc.pool))
				}
				sorted := slices.Clone(idx)
				slices.Sort(sorted)
				if len(slices.Compact(sorted)) != len(idx) {
					t.Fatalf("samples %v are not distinct", idx)
				}
				if want := bs[slices.Max(idx)]; got != want {
					t.Fatalf("samples %v: picked %s, want least loaded %s", idx, got.addr, want.addr)
				}
				firstCounts[idx[0]]++
			}
			// The first sample decides ties, so it must not favour any index.
			for i, c := range firstCounts {
				if want := 2000 / tc.pool; c < want/2 || c > want*2 {
					t.Errorf("index %d drawn first %d times of 2000, want about %d", i, c, want)
				}
			}
		})
	}
}

// decodeDraws mirrors leastRequest's rank-to-index mapping, independently
// written, to recover the sampled indices from raw IntN results.
func decodeDraws(raw []int, n int) []int {
	free := make([]int, n)
	for i := range free {
		free[i] = i
	}
	out := make([]int, 0, len(raw))
	for _, r := range raw {
		out = append(out, free[r])
		free = slices.Delete(free, r, r+1)
	}
	return out
}
