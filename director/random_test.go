package director

import (
	"context"
	"math/rand/v2"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestRandom(t *testing.T) {
	t.Parallel()
	p := newRandom(seqRand(t, nil, 2, 0, 1, 1))
	ps := prepared(p, testPool(0, 0, 0))
	var got []string
	for range 4 {
		got = append(got, ps.pick(context.Background()).addr)
	}
	if diff := cmp.Diff([]string{"b2", "b0", "b1", "b1"}, got); diff != "" {
		t.Errorf("picks mismatch (-want +got):\n%s", diff)
	}
}

func TestRandomUniform(t *testing.T) {
	t.Parallel()
	p := newRandom(rand.New(rand.NewPCG(3, 4)))
	// Weights are ignored.
	ps := prepared(p, weightedPool(1, 5, 1, 9))
	counts := make(map[string]int)
	for range 40000 {
		counts[ps.pick(context.Background()).addr]++
	}
	for addr, n := range counts {
		if n < 9500 || n > 10500 {
			t.Errorf("%s picked %d of 40000 times, want about 10000", addr, n)
		}
	}
}

// TestRandomSlowStart checks the weighted draw while a backend slow-starts:
// effective weights 100, 10 and 100, so draws 0..99 go to b0, 100..109 to
// b1, 110..209 to b2.
func TestRandomSlowStart(t *testing.T) {
	t.Parallel()
	bs := testPool(0, 0, 0)
	bs[1].slowSince, bs[1].slowFactor = 1, 0.1
	var args []int
	p := newRandom(seqRand(t, &args, 0, 99, 100, 109, 110, 209))
	ps := prepared(p, bs)
	var got []string
	for range 6 {
		got = append(got, ps.pick(context.Background()).addr)
	}
	if diff := cmp.Diff([]string{"b0", "b0", "b1", "b1", "b2", "b2"}, got); diff != "" {
		t.Errorf("picks mismatch (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]int{210, 210, 210, 210, 210, 210}, args); diff != "" {
		t.Errorf("IntN arguments mismatch (-want +got):\n%s", diff)
	}
}
