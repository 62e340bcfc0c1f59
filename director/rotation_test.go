package director

import (
	"context"
	"fmt"
	"math"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/streamlb/streamlb/resolver"
)

// weightedPool returns backends "b0", "b1", … with the given weights.
func weightedPool(weights ...uint32) []*backend {
	bs := testPool(make([]int64, len(weights))...)
	for i, w := range weights {
		bs[i].weight = w
	}
	return bs
}

func TestBuildSchedule(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		weights []uint64
		want    string // "" means nil: plain rotation
	}{
		{name: "one two three", weights: []uint64{1, 2, 3}, want: "b2 b1 b0 b2 b1 b2"},
		{name: "heavy backend spread out", weights: []uint64{5, 1, 1}, want: "b0 b0 b0 b1 b2 b0 b0"},
		{name: "common divisor removed", weights: []uint64{2, 4, 6}, want: "b2 b1 b0 b2 b1 b2"},
		{name: "two to one", weights: []uint64{2, 1}, want: "b0 b1 b0"},
		{name: "equal weights rotate", weights: []uint64{3, 3, 3}},
		{name: "single backend", weights: []uint64{7}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			bs := testPool(make([]int64, len(tc.weights))...)
			got := strings.Join(addrsOf(buildSchedule(bs, tc.weights)), " ")
			if got != tc.want {
				t.Errorf("buildSchedule(%v) = %q, want %q", tc.weights, got, tc.want)
			}
		})
	}
}

// TestBuildScheduleHugeWeights checks that weights far beyond the schedule
// bound are scaled down, keep every backend in, and keep their shares.
func TestBuildScheduleHugeWeights(t *testing.T) {
	t.Parallel()
	ws := []uint64{math.MaxUint32, 1, math.MaxUint32 / 2, 1 << 20}
	bs := testPool(make([]int64, len(ws))...)
	sched := buildSchedule(bs, ws)
	if len(sched) > maxSchedule+len(ws) {
		t.Fatalf("schedule has %d entries, want at most %d", len(sched), maxSchedule+len(ws))
	}
	counts := make(map[string]int)
	for _, b := range sched {
		counts[b.addr]++
	}
	if counts["b1"] != 1 {
		t.Errorf("weight-1 backend appears %d times, want once", counts["b1"])
	}
	if r := float64(counts["b0"]) / float64(counts["b2"]); math.Abs(r-2) > 0.01 {
		t.Errorf("b0:b2 = %d:%d, want 2:1", counts["b0"], counts["b2"])
	}
}

func TestReduceWeights(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name  string
		ws    []uint64
		limit uint64
		want  []uint64
	}{
		{name: "coprime", ws: []uint64{1, 2, 3}, limit: 100, want: []uint64{1, 2, 3}},
		{name: "gcd", ws: []uint64{100, 200, 300}, limit: 100, want: []uint64{1, 2, 3}},
		{name: "scaled", ws: []uint64{999, 1, 1000}, limit: 100, want: []uint64{49, 1, 50}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if diff := cmp.Diff(tc.want, reduceWeights(tc.ws, tc.limit)); diff != "" {
				t.Errorf("reduceWeights(%v, %d) mismatch (-want +got):\n%s", tc.ws, tc.limit, diff)
			}
		})
	}
}

// TestWeightedRoundRobinShares checks exact shares over whole cycles, from
// any starting offset.
func TestWeightedRoundRobinShares(t *testing.T) {
	t.Parallel()
	for _, offset := range []int{0, 1, 5, 12345} {
		t.Run(fmt.Sprintf("offset=%d", offset), func(t *testing.T) {
			t.Parallel()
			p := newWeightedRotation(seqRand(t, nil, offset))
			ps := prepared(p, weightedPool(1, 2, 3))
			got := make(map[string]int)
			for range 6000 {
				got[ps.pick(context.Background()).addr]++
			}
			want := map[string]int{"b0": 1000, "b1": 2000, "b2": 3000}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("pick counts mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestWeightedRoundRobinEqualWeightsRotate(t *testing.T) {
	t.Parallel()
	p := newWeightedRotation(seqRand(t, nil, 0))
	ps := prepared(p, weightedPool(4, 4, 4))
	if sched := ps.(*rotationPicker).sched; sched != nil {
		t.Fatalf("equal weights built a schedule of %d entries, want plain rotation", len(sched))
	}
	var got []string
	for range 4 {
		got = append(got, ps.pick(context.Background()).addr)
	}
	if diff := cmp.Diff([]string{"b0", "b1", "b2", "b0"}, got); diff != "" {
		t.Errorf("picks mismatch (-want +got):\n%s", diff)
	}
}

// TestWeightedRoundRobinDirector runs the policy behind a Director, with
// weights from the resolver, and checks that a set change reweights.
func TestWeightedRoundRobinDirector(t *testing.T) {
	t.Parallel()
	d, err := New(Config{Policy: WeightedRoundRobin, Logger: discardLogger(), Rand: fakeRand(func(int) int { return 0 })})
	if err != nil {
		t.Fatal(err)
	}
	mustUpdate(t, d, resolver.State{Addresses: []resolver.Address{{Addr: "a:1", Weight: 1}, {Addr: "b:1", Weight: 2}, {Addr: "c:1", Weight: 3}}})
	if diff := cmp.Diff(map[string]int{"a:1": 100, "b:1": 200, "c:1": 300}, pickCounts(t, d, 600)); diff != "" {
		t.Errorf("picks mismatch (-want +got):\n%s", diff)
	}
	// Weight 0 means 1.
	mustUpdate(t, d, resolver.State{Addresses: []resolver.Address{{Addr: "a:1", Weight: 3}, {Addr: "b:1"}}})
	if diff := cmp.Diff(map[string]int{"a:1": 300, "b:1": 100}, pickCounts(t, d, 400)); diff != "" {
		t.Errorf("picks after reweighting mismatch (-want +got):\n%s", diff)
	}
}
