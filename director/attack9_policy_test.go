package director

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/streamlb/streamlb/resolver"
	"google.golang.org/grpc/metadata"
)

func atkWeighted(ws ...uint32) resolver.State {
	var s resolver.State
	for i, w := range ws {
		s.Addresses = append(s.Addresses, resolver.Address{Addr: fmt.Sprintf("b%02d:1", i), Weight: w})
	}
	return s
}

func TestAtkWeightedSplit(t *testing.T) {
	cases := [][]uint32{
		{1, 3, 0, 5},
		{1, math.MaxUint32},
		{math.MaxUint32, math.MaxUint32 - 1, 7},
		{100, 1, 1, 1, 1, 1, 1, 1, 1, 1},
	}
	for _, policy := range []string{WeightedRoundRobin, RingHash} {
		for _, ws := range cases {
			t.Run(fmt.Sprint(policy, ws), func(t *testing.T) {
				d, err := New(Config{Policy: policy, HashHeader: "k", Logger: discardLogger(), Rand: rand.New(rand.NewPCG(3, 4))})
				if err != nil {
					t.Fatal(err)
				}
				mustUpdate(t, d, atkWeighted(ws...))
				var total float64
				for _, w := range ws {
					total += float64(max(w, 1))
				}
				const n = 50000
				counts := map[string]int{}
				for i := range n {
					ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs("k", fmt.Sprint("key-", i)))
					a, done, err := d.Pick(ctx, "/s/M")
					if err != nil {
						t.Fatal(err)
					}
					done(nil)
					counts[a]++
				}
				for i, w := range ws {
					want := float64(max(w, 1)) / total
					got := float64(counts[fmt.Sprintf("b%02d:1", i)]) / n
					tol := 0.01
					if policy == RingHash {
						tol = 0.05
					}
					if math.Abs(got-want) > tol && math.Abs(got-want)/want > 0.25 {
						t.Errorf("backend %d weight %d: share %.4f, want %.4f", i, w, got, want)
					}
				}
			})
		}
	}
}

func TestAtkPanicsEdgeSets(t *testing.T) {
	for _, policy := range Policies() {
		d, err := New(Config{Policy: policy, HashHeader: "k", Logger: discardLogger(), SlowStart: 1e9})
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := d.Pick(context.Background(), "/s/M"); err != ErrNoBackend {
			t.Errorf("%s empty: %v", policy, err)
		}
		mustUpdate(t, d, atkWeighted(0))
		mustUpdate(t, d, atkWeighted(0, math.MaxUint32, 1))
		for range 100 {
			_, done, err := d.Pick(context.Background(), "/s/M")
			if err != nil {
				t.Fatal(err)
			}
			done(nil)
		}
		if _, _, err := d.PickExcluding(context.Background(), "/s/M", []string{"b00:1", "b01:1", "b02:1"}); err != nil {
			t.Fatal(err)
		}
		mustUpdate(t, d, resolver.State{})
		if _, _, err := d.Pick(context.Background(), "/s/M"); err != ErrNoBackend {
			t.Errorf("%s emptied: %v", policy, err)
		}
	}
}
