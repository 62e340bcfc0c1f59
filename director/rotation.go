package director

import (
	"container/heap"
	"context"
	"math"
	"sync/atomic"
)

// rotation is RoundRobin and WeightedRoundRobin, which differ only in the
// weights they rotate by. RoundRobin hands out the ready backends in
// address order; WeightedRoundRobin rotates through a schedule in which
// every backend appears in proportion to its weight, interleaved. While a
// backend slow-starts, both rotate through a schedule of effective weights
// (the weight, or 1 for RoundRobin, times the slow-start factor).
//
// The schedule is built once per snapshot, so a pick is one atomic add and
// an index; over any whole cycle of the schedule the shares are exact. One
// counter is shared by all pickers, so a set change shifts the rotation
// rather than restarting it.
type rotation struct {
	weighted bool
	next     atomic.Uint64
}

// newRotation starts the rotation at a random offset so that many proxies
// started together with the same set do not all send their first streams
// to the same backend.
func newRotation(r randSource, weighted bool) *rotation {
	p := &rotation{weighted: weighted}
	p.next.Store(uint64(r.IntN(math.MaxInt32)))
	return p
}

func (p *rotation) build(ready []*backend, anySlow bool) picker {
	rp := &rotationPicker{next: &p.next, ready: ready}
	if p.weighted || anySlow {
		rp.sched = buildSchedule(ready, effectiveWeights(ready, p.weighted))
	}
	return rp
}

// rotationPicker is one snapshot's rotation.
type rotationPicker struct {
	next  *atomic.Uint64 // the builder's, shared by all its pickers
	ready []*backend
	// sched is one cycle of the weighted rotation; nil means ready in
	// order (all weights equal).
	sched []*backend
}

func (rp *rotationPicker) pick(context.Context) *backend {
	n := rp.next.Add(1) - 1
	if s := rp.sched; s != nil {
		return s[n%uint64(len(s))]
	}
	return rp.ready[n%uint64(len(rp.ready))]
}

// maxSchedule bounds the length of a schedule. Weights whose reduced sum
// is larger are scaled down to fit, which makes the shares approximate
// (each within about one part in maxSchedule/len(bs) of the exact one).
const maxSchedule = 1 << 14

// buildSchedule returns one cycle of a smooth weighted rotation over bs
// with weights ws, or nil if all weights are equal (then plain rotation
// over bs is the same thing, and cheaper).
//
// The order is earliest deadline first, as in grpc-go's former EDF
// scheduler and Envoy's: the k-th appearance (k = 0, 1, …) of backend i is
// due at (k + 1/2) / w_i, and the schedule lists appearances by due time,
// ties going to the lower index. The half-step offset (Sainte-Laguë's
// divisors) spreads a heavy backend's appearances around the lighter ones
// instead of bunching them at the start, much as nginx's smooth weighted
// round robin does: weights 5, 1, 1 give a a a b c a a, and 1, 2, 3 give
// c b a c b c. Due times are compared exactly, as (2k_i+1)·w_j against
// (2k_j+1)·w_i.
func buildSchedule(bs []*backend, ws []uint64) []*backend {
	if len(ws) < 2 {
		return nil
	}
	equal := true
	for _, w := range ws[1:] {
		if w != ws[0] {
			equal = false
			break
		}
	}
	if equal {
		return nil
	}
	ws = reduceWeights(ws, maxSchedule)
	var total uint64
	for _, w := range ws {
		total += w
	}
	h := make(edfHeap, len(bs))
	for i, w := range ws {
		h[i] = edfEntry{idx: i, w: w}
	}
	heap.Init(&h)
	sched := make([]*backend, 0, total)
	for range total {
		e := &h[0]
		sched = append(sched, bs[e.idx])
		e.k++
		heap.Fix(&h, 0)
	}
	return sched
}

// reduceWeights divides ws by their greatest common divisor and, if their
// sum still exceeds limit, scales them down to about limit, keeping every
// weight at least 1. It returns a new slice.
func reduceWeights(ws []uint64, limit uint64) []uint64 {
	var g, sum uint64
	for _, w := range ws {
		g = gcd(g, w)
	}
	out := make([]uint64, len(ws))
	for i, w := range ws {
		out[i] = w / g
		sum += out[i]
	}
	if sum <= limit {
		return out
	}
	for i, w := range out {
		// w*limit fits: w < 2⁴⁰ (a uint32 weight times slowStartScale)
		// and limit ≤ 2¹⁴.
		out[i] = max(1, w*limit/sum)
	}
	return out
}

func gcd(a, b uint64) uint64 {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

// edfEntry is one backend in the schedule builder: index into bs, weight,
// and appearances so far.
type edfEntry struct {
	idx  int
	w, k uint64
}

// edfHeap orders entries by the due time of their next appearance.
type edfHeap []edfEntry

func (h edfHeap) Len() int { return len(h) }
func (h edfHeap) Less(i, j int) bool {
	a, b := (2*h[i].k+1)*h[j].w, (2*h[j].k+1)*h[i].w
	if a != b {
		return a < b
	}
	return h[i].idx < h[j].idx
}
func (h edfHeap) Swap(i, j int) { h[i], h[j] = h[j], h[i] }
func (h *edfHeap) Push(any)     { panic("director: edfHeap does not grow") }
func (h *edfHeap) Pop() any     { panic("director: edfHeap does not shrink") }
