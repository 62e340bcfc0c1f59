package director

import (
	"cmp"
	"slices"
	"sync/atomic"
)

// counters are the long-lived per-backend counters. One instance exists per
// address for as long as the address stays in the set; snapshots and
// outstanding done functions point at it.
type counters struct {
	inflight  atomic.Int64
	successes atomic.Int64
	failures  atomic.Int64
}

// backend is one address as seen by one snapshot. It is immutable; only the
// counters it points at change.
type backend struct {
	addr   string
	weight uint32 // at least 1
	ctr    *counters
}

// snapshot is an immutable view of the backend set that Pick reads without
// locking. A new one is built for every change and published atomically.
type snapshot struct {
	// all holds every backend, sorted by addr.
	all []*backend
	// ready holds the backends policies may pick from, sorted by addr.
	// Today it is all of them; health checking and outlier ejection will
	// filter it when the snapshot is built, so policies never see their
	// internals.
	ready []*backend
}

// emptySnapshot is the set before the first update. Shared and read-only.
var emptySnapshot = &snapshot{}

// newSnapshot sorts bs by address and builds a snapshot that owns it.
func newSnapshot(bs []*backend) *snapshot {
	slices.SortFunc(bs, func(a, b *backend) int { return cmp.Compare(a.addr, b.addr) })
	return &snapshot{all: bs, ready: bs}
}

// find returns the backend with address addr, or nil.
func (s *snapshot) find(addr string) *backend {
	i, ok := slices.BinarySearchFunc(s.all, addr, func(b *backend, addr string) int { return cmp.Compare(b.addr, addr) })
	if !ok {
		return nil
	}
	return s.all[i]
}

// call tracks one picked stream. Its done method is the function Pick hands
// out; the flag makes repeated calls harmless, like grpc-go's PickResult.Done
// contract tolerates misbehaving callers.
type call struct {
	ctr      *counters
	finished atomic.Bool
}

// done records the end of the stream: the first call decrements in-flight
// and counts err (nil is a success), later calls do nothing. The counters
// may belong to an address that has since left the set; then the update
// lands on counters nobody reads, which is harmless.
func (c *call) done(err error) {
	if c.finished.Swap(true) {
		return
	}
	c.ctr.inflight.Add(-1)
	if err == nil {
		c.ctr.successes.Add(1)
	} else {
		c.ctr.failures.Add(1)
	}
}
