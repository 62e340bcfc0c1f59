package director

import (
	"context"
	"math"
	"sync/atomic"
)

// roundRobin hands out backends in address order. One counter is shared by
// all snapshots, so a set change shifts the rotation rather than restarting
// it. While a backend slow-starts, it rotates through a weighted schedule
// instead, with every backend's weight 1 times its slow-start factor.
type roundRobin struct {
	next atomic.Uint64
}

// newRoundRobin starts the rotation at a random offset so that many
// proxies started together with the same set do not all send their first
// streams to the same backend.
func newRoundRobin(r randSource) *roundRobin {
	p := &roundRobin{}
	p.next.Store(uint64(r.IntN(math.MaxInt32)))
	return p
}

func (p *roundRobin) prepare(ps *pickSet) {
	ps.sched = nil
	if ps.anySlow {
		ps.sched = buildSchedule(ps.ready, effectiveWeights(ps.ready, false))
	}
}

func (p *roundRobin) pick(_ context.Context, ps *pickSet) *backend {
	return rotate(&p.next, ps)
}

// rotate returns the next backend of ps's schedule, or of ps.ready if there
// is none, advancing the shared counter next.
func rotate(next *atomic.Uint64, ps *pickSet) *backend {
	n := next.Add(1) - 1
	if s := ps.sched; s != nil {
		return s[n%uint64(len(s))]
	}
	return ps.ready[n%uint64(len(ps.ready))]
}
