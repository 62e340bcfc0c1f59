package cluster

import (
	"context"
	"testing"
	"time"

	"github.com/streamlb/streamlb/proxy"
)

func TestTokenBucket(t *testing.T) {
	t.Parallel()
	now := time.Unix(1000, 0)
	b := newTokenBucket(10, 5, func() time.Time { return now })
	take := func() int {
		n := 0
		for b.allow() {
			n++
		}
		return n
	}
	for _, tc := range []struct {
		name    string
		advance time.Duration
		want    int
	}{
		{name: "starts full", want: 5},
		{name: "empty", want: 0},
		{name: "refills at rate", advance: 300 * time.Millisecond, want: 3},
		{name: "caps at burst", advance: time.Hour, want: 5},
		{name: "fractions accumulate", advance: 50 * time.Millisecond, want: 0},
		{name: "to a whole token", advance: 50 * time.Millisecond, want: 1},
		{name: "clock going back adds nothing", advance: -time.Second, want: 0},
	} {
		now = now.Add(tc.advance)
		if got := take(); got != tc.want {
			t.Errorf("%s: admitted %d, want %d", tc.name, got, tc.want)
		}
	}
}

// seqRand is a rand whose IntN returns the draws in turn, recording n.
type seqRand struct {
	draws []int
	ns    []int
}

func (r *seqRand) IntN(n int) int {
	r.ns = append(r.ns, n)
	d := r.draws[0]
	r.draws = r.draws[1:]
	return d
}

// TestRouteChoose: a route's weighted clusters split the draw over the
// total weight by their running sums, in the file's order, so a cluster
// of weight 0 is never drawn; a retry stays in the cluster of the call's
// first pick, by name, with no draw, even at weight 0 now (a reload), and
// draws anew if the route no longer lists it; a route with one cluster
// draws nothing.
func TestRouteChoose(t *testing.T) {
	t.Parallel()
	up := func(name string) *proxy.Upstream {
		u, err := proxy.NewUpstream(proxy.UpstreamConfig{Name: name})
		if err != nil {
			t.Fatal(err)
		}
		return u
	}
	f := &File{Routes: []fileRoute{{Clusters: []weightedCluster{
		{Name: "a", Weight: ptr[routeWeight](3)}, {Name: "zero", Weight: ptr[routeWeight](0)}, {Name: "b", Weight: ptr[routeWeight](2)},
	}}, {Cluster: "a"}}}
	clusters := map[string]*Cluster{}
	for _, n := range []string{"a", "zero", "b"} {
		clusters[n] = &Cluster{name: n, up: up(n)}
	}
	table := buildTable(f, clusters, nil, nil, time.Now)
	if got := len(table.clusters); got != 3 {
		t.Errorf("table lists %d clusters, want 3 (the weight-0 one too)", got)
	}
	split, single := table.routes[0], table.routes[1]
	for _, tc := range []struct {
		name string
		call *proxy.Upstream
		draw []int // nil: no draw
		want string
	}{
		{name: "draw 0", draw: []int{0}, want: "a"},
		{name: "draw 2", draw: []int{2}, want: "a"},
		{name: "draw 3", draw: []int{3}, want: "b"},
		{name: "draw 4", draw: []int{4}, want: "b"},
		{name: "retry in b", call: up("b"), want: "b"},
		{name: "retry in zero", call: up("zero"), want: "zero"},
		{name: "retry of a cluster gone", call: up("gone"), draw: []int{1}, want: "a"},
	} {
		rnd := &seqRand{draws: tc.draw}
		rt := &router{rand: rnd}
		if got := split.choose(rt, tc.call).cluster.name; got != tc.want {
			t.Errorf("%s: chose %s, want %s", tc.name, got, tc.want)
		}
		if tc.draw == nil && len(rnd.ns) != 0 || tc.draw != nil && (len(rnd.ns) != 1 || rnd.ns[0] != 5) {
			t.Errorf("%s: drew IntN(%v), want %d draws over the total weight 5", tc.name, rnd.ns, len(tc.draw))
		}
	}
	rnd := &seqRand{}
	if got := single.choose(&router{rand: rnd}, nil).cluster.name; got != "a" || len(rnd.ns) != 0 {
		t.Errorf("route with one cluster chose %s after draws %v, want a and no draw", got, rnd.ns)
	}
}

// ptr returns a pointer to a copy of v.
func ptr[T any](v T) *T { return &v }

// TestPickUpstreamAllocs: routing a call costs no allocation, with a
// route's weighted clusters and timeout as without, for the first pick
// and for a retry (which finds the call's cluster by name).
func TestPickUpstreamAllocs(t *testing.T) { // not parallel: AllocsPerRun
	p := proxy.PickerFunc(func(context.Context, string) (string, func(error), error) { return "127.0.0.1:1", nil, nil })
	var clusters [2]*Cluster
	for i, n := range []string{"a", "b"} {
		up, err := proxy.NewUpstream(proxy.UpstreamConfig{Name: n})
		if err != nil {
			t.Fatal(err)
		}
		clusters[i] = &Cluster{name: n, up: up}
	}
	var rt router
	rt.table.Store(&routeTable{routes: []*route{
		{prefix: "/split/", dests: []dest{{cluster: clusters[0], picker: p, upTo: 9}, {cluster: clusters[1], picker: p, upTo: 10}}, total: 10, timeout: time.Second},
		{dests: []dest{{cluster: clusters[0], picker: p}}},
	}})
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		method string
		call   *proxy.Upstream
	}{
		{name: "weighted, first pick", method: "/split/M"},
		{name: "weighted, retry", method: "/split/M", call: clusters[1].up},
		{name: "one cluster", method: "/other/M"},
	} {
		var pk proxy.UpstreamPick
		if a := testing.AllocsPerRun(100, func() { pk, _ = rt.PickUpstream(ctx, tc.method, tc.call, nil) }); a != 0 {
			t.Errorf("%s: PickUpstream allocates %v times per call, want 0", tc.name, a)
		}
		if pk.Addr != "127.0.0.1:1" || pk.Upstream == nil {
			t.Errorf("%s: PickUpstream = %+v", tc.name, pk)
		}
	}
}
