package director

import "context"

// A policy is two small types, after grpc-go's base.PickerBuilder and
// balancer.Picker: a builder, which lives as long as the Director, and the
// pickers it builds, one per snapshot. Policies see only the ready
// backends; health, ejection and panic mode were resolved before
// (Caddy's Upstream.Available habit).

// builder builds the picker of every snapshot that has ready backends.
type builder interface {
	// build returns a picker over ready, which is non-empty, sorted by
	// address, shared, and must not be modified. anySlow reports whether a
	// backend of ready was slow-starting when the snapshot was built. build
	// is called under Director.mu, once per snapshot, so a builder may keep
	// state between calls (a cache, a rotation counter shared by its
	// pickers) without more locking.
	build(ready []*backend, anySlow bool) picker
}

// picker chooses one backend for a stream. pick is called concurrently from
// Pick: it must not block, must not allocate in the common case, and may
// only read the picker's own immutable fields and the backends' atomic
// counters. ctx is Pick's.
type picker interface {
	pick(ctx context.Context) *backend
}

// newBuilder returns the builder of the policy named in s.
func newBuilder(s settings) builder {
	switch s.policy {
	case WeightedRoundRobin:
		return newRotation(s.rand, true)
	case Random:
		return newRandom(s.rand)
	case LeastRequest:
		return newLeastRequest(s.choices, s.rand, s.now, s.slowStart)
	case PeakEWMA:
		return newPeakEWMA(s.choices, s.rand, s.now, s.slowStart, s.decay, s.penalty)
	case RingHash:
		return newRingHash(s.hashHeader, s.ringSize, s.rand)
	default:
		return newRotation(s.rand, false)
	}
}
