package director

import (
	"cmp"
	"context"
	"slices"
	"strconv"

	"google.golang.org/grpc/metadata"
)

// ringHash is consistent hashing on a ring, Ketama-style: every ready
// backend puts weight×RingSize points on a 64-bit ring, at hashes of
// "addr#i"; a stream's key (the value of Config.HashHeader) hashes to a
// point on the ring and goes to the backend owning the next point
// clockwise. Adding a backend takes over only the arcs in front of its
// points, so only the keys that now map to it move; removing one (or
// leaving it out, for health or ejection) moves only the keys it owned.
//
// Hashes are FNV-1a 64 finished with MurmurHash3's fmix64, which spreads
// FNV's weak low bits over the whole word. Both are fixed functions, so
// every proxy process maps a key to the same backend.
type ringHash struct {
	header   string // lower case
	perPoint int    // points per unit of weight
	rand     randSource

	// The cache below is guarded by Director.mu (build runs under it).
	// Snapshots are rebuilt for reasons that do not change the ring
	// (another backend's ejection ending in panic mode, slow-start steps),
	// so the last ring is reused while the ready addresses and weights are
	// unchanged.
	cacheKey  []ringMember
	cacheRing []ringPoint
}

// ringPoint is one point of the ring: its hash and the index of its
// backend in the snapshot's ready list (stable while the ring is cached,
// as ready is sorted).
type ringPoint struct {
	hash uint64
	idx  int
}

type ringMember struct {
	addr   string
	weight uint32
}

func newRingHash(header string, ringSize int, r randSource) *ringHash {
	return &ringHash{header: header, perPoint: ringSize, rand: r}
}

func (p *ringHash) build(ready []*backend, _ bool) picker {
	key := make([]ringMember, len(ready))
	for i, b := range ready {
		key[i] = ringMember{addr: b.addr, weight: b.weight}
	}
	if p.cacheRing == nil || !slices.Equal(key, p.cacheKey) {
		p.cacheKey, p.cacheRing = key, buildRing(ready, p.perPoint, MaxRingPoints)
	}
	return &ringPicker{header: p.header, rand: p.rand, ready: ready, ring: p.cacheRing}
}

// ringPicker is one snapshot's ring. The ring's indices point into ready.
type ringPicker struct {
	header string
	rand   randSource
	ready  []*backend
	ring   []ringPoint
}

// buildRing places perWeight points per unit of weight for each backend
// of bs, scaled down if the ring would exceed limit points.
func buildRing(bs []*backend, perWeight int, limit uint64) []ringPoint {
	var total uint64
	for _, b := range bs {
		total += uint64(b.weight) * uint64(perWeight)
	}
	ring := make([]ringPoint, 0, min(total, limit+uint64(len(bs))))
	var buf [20]byte
	for i, b := range bs {
		n := uint64(b.weight) * uint64(perWeight)
		if total > limit {
			n = max(1, uint64(float64(n)*float64(limit)/float64(total)))
		}
		h := fnv1a(fnvOffset64, b.addr)
		h = fnv1a(h, "#")
		for j := range n {
			ring = append(ring, ringPoint{hash: fmix64(fnv1aBytes(h, strconv.AppendUint(buf[:0], j, 10))), idx: i})
		}
	}
	// Ties (astronomically rare) go to the lower address, the same in
	// every process.
	slices.SortFunc(ring, func(a, b ringPoint) int {
		return cmp.Or(cmp.Compare(a.hash, b.hash), cmp.Compare(a.idx, b.idx))
	})
	return ring
}

// pick hashes the first value of the configured header in ctx's incoming
// metadata and walks the ring. Without a key it picks uniformly at random:
// such streams have no affinity to keep.
func (rp *ringPicker) pick(ctx context.Context) *backend {
	vals := metadata.ValueFromIncomingContext(ctx, rp.header)
	if len(vals) == 0 || vals[0] == "" || len(rp.ring) == 0 {
		return rp.ready[rp.rand.IntN(len(rp.ready))]
	}
	return rp.ready[ringLookup(rp.ring, hashKey(vals[0]))]
}

// ringLookup returns the backend index of the first point at or after h,
// wrapping around.
func ringLookup(ring []ringPoint, h uint64) int {
	i, _ := slices.BinarySearchFunc(ring, h, func(p ringPoint, h uint64) int { return cmp.Compare(p.hash, h) })
	if i == len(ring) {
		i = 0
	}
	return ring[i].idx
}

// hashKey is the ring position of a stream key.
func hashKey(key string) uint64 { return fmix64(fnv1a(fnvOffset64, key)) }

// FNV-1a, 64 bit (the constants of hash/fnv), inlined so hashing a key
// allocates nothing.
const (
	fnvOffset64 = 14695981039346656037
	fnvPrime64  = 1099511628211
)

func fnv1a(h uint64, s string) uint64 {
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= fnvPrime64
	}
	return h
}

func fnv1aBytes(h uint64, b []byte) uint64 {
	for _, c := range b {
		h ^= uint64(c)
		h *= fnvPrime64
	}
	return h
}

// fmix64 is MurmurHash3's 64-bit finaliser: every input bit affects every
// output bit.
func fmix64(k uint64) uint64 {
	k ^= k >> 33
	k *= 0xff51afd7ed558ccd
	k ^= k >> 33
	k *= 0xc4ceb9fe1a85ec53
	k ^= k >> 33
	return k
}
