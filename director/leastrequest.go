package director

// leastRequest is the power-of-d-choices policy of gRFC A48: sample a few
// backends at random and take the one with the fewest streams in flight.
// Sampling keeps the choice O(d) and avoids the herding that scanning for
// the global minimum causes when many proxies share the same backends.
type leastRequest struct {
	choices int // 2..MaxChoiceCount
	rand    randSource
}

func newLeastRequest(choices int, r randSource) *leastRequest {
	return &leastRequest{choices: choices, rand: r}
}

// pick samples min(choices, len(bs)) distinct backends, in random order,
// and returns the one with the lowest in-flight count; on a tie the earlier
// sample wins. Unlike grpc-go, which samples with replacement, distinct
// samples mean a pool of two always compares both backends.
//
// The i-th draw is rand.IntN(len(bs)-i), read as a rank among the indices
// not drawn yet, so each draw costs one IntN call and no retries. For
// example, with 5 backends and draws 1 then 1, the samples are indices 1
// and 2.
func (p *leastRequest) pick(bs []*backend) *backend {
	n := len(bs)
	if n == 1 {
		return bs[0]
	}
	k := min(p.choices, n)
	var drawn [MaxChoiceCount]int // indices drawn so far, ascending
	var best *backend
	var bestLoad int64
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
		if load := b.ctr.inflight.Load(); best == nil || load < bestLoad {
			best, bestLoad = b, load
		}
	}
	return best
}
