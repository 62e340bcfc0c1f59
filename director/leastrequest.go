package director

import (
	"context"
	"time"
)

// leastRequest is the power-of-d-choices policy of gRFC A48: sample a few
// backends at random and take the one with the fewest streams in flight.
// Sampling keeps the choice O(d) and avoids the herding that scanning for
// the global minimum causes when many proxies share the same backends.
type leastRequest struct {
	p2c
}

func newLeastRequest(choices int, r randSource, now func() time.Time, slowStart time.Duration) *leastRequest {
	return &leastRequest{p2c{choices: choices, rand: r, slow: slowStarter{window: slowStart, now: now, rand: r}}}
}

func (p *leastRequest) build(ready []*backend, _ bool) picker {
	return &leastRequestPicker{p: p, ready: ready}
}

// leastRequestPicker is one snapshot's least-request choice.
type leastRequestPicker struct {
	p     *leastRequest
	ready []*backend
}

func (lp *leastRequestPicker) pick(context.Context) *backend {
	return lp.p.pickBy(lp.ready, lp.p, 0)
}

// load is the in-flight count.
func (p *leastRequest) load(b *backend, _ int64) float64 { return float64(b.ctr.inflight.Load()) }

// loader scores a sampled backend for p2c; lower is better. now is the
// Unix time in nanoseconds that pickBy was given.
type loader interface {
	load(b *backend, now int64) float64
}

// p2c is the sampling LeastRequest and PeakEWMA share.
type p2c struct {
	choices int // 2..MaxChoiceCount
	rand    randSource
	slow    slowStarter
}

// pickBy picks the best of a sample of bs by l, then, if that backend is
// slow-starting and slowStarter.skip says so, samples once more and takes
// the second result whatever it is.
func (p *p2c) pickBy(bs []*backend, l loader, now int64) *backend {
	b := p.best(bs, l, now)
	if len(bs) > 1 && p.slow.skip(b) {
		b = p.best(bs, l, now)
	}
	return b
}

// best samples min(choices, len(bs)) distinct backends, in random order,
// and returns the one with the lowest load; on a tie the earlier sample
// wins. Unlike grpc-go, which samples with replacement, distinct samples
// mean a pool of two always compares both backends.
//
// The i-th draw is rand.IntN(len(bs)-i), read as a rank among the indices
// not drawn yet, so each draw costs one IntN call and no retries. For
// example, with 5 backends and draws 1 then 1, the samples are indices 1
// and 2.
func (p *p2c) best(bs []*backend, l loader, now int64) *backend {
	n := len(bs)
	if n == 1 {
		return bs[0]
	}
	k := min(p.choices, n)
	var drawn [MaxChoiceCount]int // indices drawn so far, ascending
	var best *backend
	var bestLoad float64
	for i := range k {
		idx := p.rand.IntN(n - i)
		// Turn the rank into an index by skipping every drawn index at or
		// below it; drawn is sorted, so one pass suffices.
		j := 0
		for ; j < i && drawn[j] <= idx; j++ {
			idx++
		}
		copy(drawn[j+1:i+1], drawn[j:i])
		drawn[j] = idx

		b := bs[idx]
		if load := l.load(b, now); best == nil || load < bestLoad {
			best, bestLoad = b, load
		}
	}
	return best
}
