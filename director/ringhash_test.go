package director

import (
	"context"
	"fmt"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/streamlb/streamlb/resolver"
	"google.golang.org/grpc/metadata"
)

// keyCtx returns a context whose incoming metadata carries key in the test
// hash header.
func keyCtx(key string) context.Context {
	return metadata.NewIncomingContext(context.Background(), metadata.Pairs(testHashHeader, key))
}

// ringOwners maps n keys to backend addresses on a ring of bs.
func ringOwners(t *testing.T, bs []*backend, n int) map[string]string {
	t.Helper()
	p := newRingHash(testHashHeader, DefaultRingSize, noRand(t))
	ps := prepared(p, bs)
	out := make(map[string]string, n)
	for i := range n {
		key := fmt.Sprintf("user-%d", i)
		out[key] = ps.pick(keyCtx(key)).addr
	}
	return out
}

func poolOf(addrs ...string) []*backend {
	bs := make([]*backend, len(addrs))
	for i, a := range addrs {
		bs[i] = &backend{addr: a, weight: 1, ctr: newCounters(), slowFactor: 1}
	}
	return bs
}

func TestRingHashSameKeySameBackend(t *testing.T) {
	t.Parallel()
	p := newRingHash(testHashHeader, DefaultRingSize, noRand(t))
	ps := prepared(p, poolOf("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"))
	for i := range 100 {
		key := fmt.Sprintf("user-%d", i)
		first := ps.pick(keyCtx(key))
		for range 3 {
			if got := ps.pick(keyCtx(key)); got != first {
				t.Fatalf("key %s went to %s, then %s", key, first.addr, got.addr)
			}
		}
	}
	// Another ring built from the same set, as in another process, agrees.
	p2 := newRingHash(testHashHeader, DefaultRingSize, noRand(t))
	ps2 := prepared(p2, poolOf("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"))
	if diff := cmp.Diff(ps.(*ringPicker).ring, ps2.(*ringPicker).ring, cmp.AllowUnexported(ringPoint{})); diff != "" {
		t.Errorf("rings of the same set differ (-first +second):\n%s", diff)
	}
}

// TestRingHashKnownPoint pins the hash functions, so a change that would
// remap every key of every deployment does not go unnoticed.
func TestRingHashKnownPoint(t *testing.T) {
	t.Parallel()
	if got, want := hashKey("user-1"), fmix64(fnv1a(fnvOffset64, "user-1")); got != want {
		t.Fatalf("hashKey = %#x, want %#x", got, want)
	}
	// FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c (the hash/fnv test vector).
	if got := fnv1a(fnvOffset64, "a"); got != 0xaf63dc4c8601ec8c {
		t.Errorf("fnv1a(a) = %#x, want 0xaf63dc4c8601ec8c", got)
	}
}

func TestRingHashAddBackend(t *testing.T) {
	t.Parallel()
	const n = 10000
	before := ringOwners(t, poolOf("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"), n)
	after := ringOwners(t, poolOf("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"), n)
	moved := 0
	for key, was := range before {
		if now := after[key]; now != was {
			moved++
			if now != "10.0.0.4:80" {
				t.Errorf("key %s moved from %s to %s, want only moves to the new backend", key, was, now)
			}
		}
	}
	if frac := float64(moved) / n; frac < 0.15 || frac > 0.35 {
		t.Errorf("%d of %d keys moved (%.1f%%), want about 25%%", moved, n, 100*frac)
	}
}

func TestRingHashRemoveBackend(t *testing.T) {
	t.Parallel()
	const n = 10000
	before := ringOwners(t, poolOf("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"), n)
	after := ringOwners(t, poolOf("10.0.0.1:80", "10.0.0.3:80", "10.0.0.4:80"), n)
	for key, was := range before {
		if now := after[key]; now != was && was != "10.0.0.2:80" {
			t.Errorf("key %s moved from %s to %s, but only keys of the removed 10.0.0.2:80 may move", key, was, now)
		}
	}
}

// TestRingHashWeights checks that shares of keys follow weights.
func TestRingHashWeights(t *testing.T) {
	t.Parallel()
	bs := poolOf("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80")
	bs[2].weight = 2
	counts := make(map[string]int)
	for _, addr := range ringOwners(t, bs, 20000) {
		counts[addr]++
	}
	for addr, want := range map[string]int{"10.0.0.1:80": 5000, "10.0.0.2:80": 5000, "10.0.0.3:80": 10000} {
		if got := counts[addr]; got < want*85/100 || got > want*115/100 {
			t.Errorf("%s owns %d of 20000 keys, want about %d", addr, got, want)
		}
	}
}

func TestRingHashNoKeyFallsBackToRandom(t *testing.T) {
	t.Parallel()
	p := newRingHash(testHashHeader, DefaultRingSize, seqRand(t, nil, 2, 0, 1))
	ps := prepared(p, testPool(0, 0, 0))
	ctxs := []context.Context{
		context.Background(),
		metadata.NewIncomingContext(context.Background(), metadata.Pairs("other", "x")),
		keyCtx(""),
	}
	var got []string
	for _, ctx := range ctxs {
		got = append(got, ps.pick(ctx).addr)
	}
	if diff := cmp.Diff([]string{"b2", "b0", "b1"}, got); diff != "" {
		t.Errorf("picks mismatch (-want +got):\n%s", diff)
	}
}

func TestRingHashScalesHugeRing(t *testing.T) {
	t.Parallel()
	bs := poolOf("a:1", "b:1", "c:1")
	bs[0].weight, bs[1].weight, bs[2].weight = 1<<31, 1<<30, 1
	const limit = 3000
	ring := buildRing(bs, DefaultRingSize, limit)
	if len(ring) > limit+len(bs) {
		t.Fatalf("ring has %d points, want at most %d", len(ring), limit+len(bs))
	}
	counts := make([]int, len(bs))
	for _, pt := range ring {
		counts[pt.idx]++
	}
	if counts[2] != 1 || counts[0] < 2*counts[1]-2 || counts[0] > 2*counts[1]+2 {
		t.Errorf("points per backend = %v, want 2:1 and one point for the light backend", counts)
	}
}

// TestRingHashDirector runs the policy behind a Director: the header is
// matched case-insensitively, a key sticks to its backend, and when that
// backend leaves the set (here, by ejection) only its keys move.
func TestRingHashDirector(t *testing.T) {
	t.Parallel()
	d, err := New(Config{Policy: RingHash, HashHeader: "X-User", Logger: discardLogger()})
	if err != nil {
		t.Fatal(err)
	}
	mustUpdate(t, d, resolver.State{Addresses: []resolver.Address{{Addr: "a:1"}, {Addr: "b:1"}, {Addr: "c:1"}}})
	owner := func(key string) string {
		t.Helper()
		addr, done, err := d.Pick(keyCtx(key), "/s/m")
		if err != nil {
			t.Fatal(err)
		}
		done(nil)
		return addr
	}
	owners := make(map[string]string)
	for i := range 300 {
		key := fmt.Sprintf("k%d", i)
		owners[key] = owner(key)
		if again := owner(key); again != owners[key] {
			t.Fatalf("key %s went to %s, then %s", key, owners[key], again)
		}
	}
	var victim string
	for _, a := range owners {
		victim = a
		break
	}
	for key, a := range owners {
		if a == victim {
			for range 3 {
				pickWithKey(t, d, key)(errUnavailable)
			}
			break
		}
	}
	if !statsOf(t, d, victim).Ejected {
		t.Fatalf("%s not ejected", victim)
	}
	for key, was := range owners {
		if now := owner(key); now != was && was != victim {
			t.Errorf("key %s moved from %s to %s while only %s left", key, was, now, victim)
		}
	}
}

// pickWithKey picks with key in the hash header and returns done.
func pickWithKey(t *testing.T, d *Director, key string) func(error) {
	t.Helper()
	_, done, err := d.Pick(keyCtx(key), "/s/m")
	if err != nil {
		t.Fatal(err)
	}
	return done
}

func TestPickAllocationsRingHashWithKey(t *testing.T) {
	// Not parallel: AllocsPerRun measures the whole process.
	d, err := New(Config{Policy: RingHash, HashHeader: testHashHeader, Logger: discardLogger()})
	if err != nil {
		t.Fatal(err)
	}
	mustUpdate(t, d, state("a:1", "b:1", "c:1", "d:1"))
	ctx := keyCtx("user-42")
	allocs := testing.AllocsPerRun(1000, func() {
		_, done, _ := d.Pick(ctx, "/s/m")
		done(nil)
	})
	// The call record and done, plus grpc-go's copy of the header values.
	if allocs > 3 {
		t.Errorf("Pick+done with a hash key allocates %v times per call, want at most 3", allocs)
	}
}
