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

// prepare builds the running sums of the effective weights while a backend
// slow-starts, and clears them otherwise.
func (p *random) prepare(ps *pickSet) {
	ps.cum = nil
	if !ps.anySlow {
		return
	}
	ws := effectiveWeights(ps.ready, false)
	ps.cum = make([]uint64, len(ws))
	var sum uint64
	for i, w := range ws {
		sum += w
		ps.cum[i] = sum
	}
}

// pick draws one IntN: over the backends when uniform, else over the total
// effective weight, then finds the backend whose range holds the draw.
func (p *random) pick(_ context.Context, ps *pickSet) *backend {
	if ps.cum == nil {
		return ps.ready[p.rand.IntN(len(ps.ready))]
	}
	x := uint64(p.rand.IntN(int(ps.cum[len(ps.cum)-1])))
	// The first i with cum[i] > x.
	i, _ := slices.BinarySearch(ps.cum, x+1)
	return ps.ready[i]
}
