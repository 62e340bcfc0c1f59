package director

import (
	"context"
	"slices"
)

// random picks a backend uniformly at random. While a backend slow-starts,
// it picks with probability proportional to the backends' slow-start
// factors instead (each backend's weight counting as 1).
type random struct {
	rand randSource
}

func newRandom(r randSource) *random { return &random{rand: r} }

// build computes the running sums of the effective weights while a backend
// slow-starts.
func (p *random) build(ready []*backend, anySlow bool) picker {
	rp := &randomPicker{rand: p.rand, ready: ready}
	if anySlow {
		ws := effectiveWeights(ready, false)
		rp.cum = make([]uint64, len(ws))
		var sum uint64
		for i, w := range ws {
			sum += w
			rp.cum[i] = sum
		}
	}
	return rp
}

// randomPicker is one snapshot's random choice.
type randomPicker struct {
	rand  randSource
	ready []*backend
	// cum holds the running sums of the ready backends' effective weights
	// while a backend slow-starts; nil means uniform.
	cum []uint64
}

// pick draws one IntN: over the backends when uniform, else over the total
// effective weight, then finds the backend whose range holds the draw.
func (rp *randomPicker) pick(context.Context) *backend {
	if rp.cum == nil {
		return rp.ready[rp.rand.IntN(len(rp.ready))]
	}
	x := uint64(rp.rand.IntN(int(rp.cum[len(rp.cum)-1])))
	// The first i with cum[i] > x.
	i, _ := slices.BinarySearch(rp.cum, x+1)
	return rp.ready[i]
}
