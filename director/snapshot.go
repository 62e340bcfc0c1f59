package director

import (
	"cmp"
	"slices"
	"sync/atomic"
	"time"
)

// counters are the long-lived per-backend counters. One instance exists per
// address for as long as the address stays in the set; snapshots and
// outstanding done functions point at it.
type counters struct {
	inflight  atomic.Int64
	successes atomic.Int64
	failures  atomic.Int64
	// consecutive counts Unavailable outcomes since the last outcome that
	// showed the backend reachable; see observe.
	consecutive atomic.Int64
	// ejections counts ejections since the address joined the set.
	ejections atomic.Int64

	// The outlier state below is guarded by Director.mu.

	// ejectedUntil is when the current ejection ends; zero if the backend
	// is not ejected.
	ejectedUntil time.Time
	// multiplier scales the next ejection's length; see Director.eject.
	multiplier int
	// restoredAt is when the last ejection ended; zero if never ejected.
	restoredAt time.Time
	// capWarned is Director.ejectEpoch+1 when the max ejection percent last
	// kept this backend in, so that is logged at Warn once per epoch.
	capWarned uint64
}

// backend is one address as seen by one snapshot. It is immutable; only the
// counters it points at change.
type backend struct {
	addr    string
	weight  uint32 // at least 1
	ctr     *counters
	ejected bool // excluded from the snapshot's ready list
}

// snapshot is an immutable view of the backend set that Pick reads without
// locking. A new one is built for every change and published atomically.
type snapshot struct {
	// all holds every backend, sorted by addr.
	all []*backend
	// ready holds the backends policies may pick from, sorted by addr:
	// those not ejected. Filtering here means policies never see outlier
	// (or, later, health) internals. It is empty only if all is.
	ready []*backend
	// restoreAt is the earliest end of an ejection in all, in Unix
	// nanoseconds of Config.Now, or 0 if no backend is ejected. It is the
	// snapshot's only mutable field: a picker that finds it due swaps it
	// to 0 to claim the rebuild, so concurrent picks do not all try; see
	// Director.restoreDue.
	restoreAt atomic.Int64
}

// emptySnapshot is the set before the first update. Shared and read-only
// (its restoreAt stays 0, so nobody swaps it).
var emptySnapshot = &snapshot{}

// newSnapshot builds a snapshot that owns bs, which must be sorted by
// address and have their ejected flags set.
func newSnapshot(bs []*backend) *snapshot {
	s := &snapshot{all: bs, ready: bs}
	var restoreAt int64
	ejected := 0
	for _, b := range bs {
		if !b.ejected {
			continue
		}
		ejected++
		if t := b.ctr.ejectedUntil.UnixNano(); restoreAt == 0 || t < restoreAt {
			restoreAt = t
		}
	}
	if ejected > 0 {
		s.ready = make([]*backend, 0, len(bs)-ejected)
		for _, b := range bs {
			if !b.ejected {
				s.ready = append(s.ready, b)
			}
		}
	}
	s.restoreAt.Store(restoreAt)
	return s
}

// sortBackends sorts bs by address in place.
func sortBackends(bs []*backend) {
	slices.SortFunc(bs, func(a, b *backend) int { return cmp.Compare(a.addr, b.addr) })
}

// findBackend returns the backend with address addr in bs, which is sorted
// by address, or nil.
func findBackend(bs []*backend, addr string) *backend {
	i, ok := slices.BinarySearchFunc(bs, addr, func(b *backend, addr string) int { return cmp.Compare(b.addr, addr) })
	if !ok {
		return nil
	}
	return bs[i]
}

// call tracks one picked stream. Its done method is the function Pick hands
// out; the flag makes repeated calls harmless, like grpc-go's PickResult.Done
// contract tolerates misbehaving callers.
type call struct {
	d        *Director
	b        *backend
	finished atomic.Bool
}

// done records the end of the stream: the first call decrements in-flight,
// counts err (nil is a success) and feeds it to outlier detection; later
// calls do nothing. The backend may have left the set since; then the
// update lands on counters nobody reads, which is harmless, and outlier
// detection ignores it.
func (c *call) done(err error) {
	if c.finished.Swap(true) {
		return
	}
	ctr := c.b.ctr
	ctr.inflight.Add(-1)
	if err == nil {
		ctr.successes.Add(1)
	} else {
		ctr.failures.Add(1)
	}
	c.d.observe(c.b, err)
}
