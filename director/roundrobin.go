package director

import (
	"math"
	"sync/atomic"
)

// roundRobin hands out backends in address order. One counter is shared by
// all snapshots, so a set change shifts the rotation rather than restarting
// it.
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

func (p *roundRobin) pick(bs []*backend) *backend {
	n := p.next.Add(1) - 1
	return bs[n%uint64(len(bs))]
}
