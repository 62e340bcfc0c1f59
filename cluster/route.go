package cluster

import (
	"context"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/proxy"
)

// Routing lives entirely at the Picker seam: the data plane asks one
// Picker, the router, for every stream's backend, and the router sends
// the question to the Picker of the cluster the first matching route
// names. The route table is immutable and published with an
// atomic.Pointer, so a reload swaps it in one store and Pick takes no
// lock (the director's snapshot habit). Request headers reach Pick as
// incoming gRPC metadata: the server lists the matched header names in
// proxy.Config.PickMetadata. A Pick error carrying a gRPC status (no
// route, rate limited) is answered to the client with that status.
//
// A route with weighted clusters draws one of them per call (one IntN,
// no lock, no allocation) and answers with that cluster's Upstream; the
// data plane hands that Upstream back with each retry (the call argument
// of PickUpstream), so a call's retries stay in the cluster first drawn.
// A route's timeout goes to the data plane with every pick
// (UpstreamPick.Timeout), which bounds the call by it.

// router is the proxy.Picker, proxy.RetryPicker and proxy.UpstreamPicker
// of a server with a configuration file: the frame engine calls
// PickUpstream, and so learns with each pick the routed cluster's dial
// settings and retry policy; the grpc-proxy engine calls Pick. Its
// methods are safe for concurrent use.
type router struct {
	table atomic.Pointer[routeTable]
	// rand draws a route's weighted cluster; nil means math/rand/v2's
	// global source. Set before the router is used; called concurrently.
	rand interface{ IntN(n int) int }
}

// intN is rand.IntN, or math/rand/v2's.
func (rt *router) intN(n int) int {
	if rt.rand != nil {
		return rt.rand.IntN(n)
	}
	return rand.IntN(n)
}

// routeTable is one configuration's routes, in order. It is never
// modified once published.
type routeTable struct {
	routes      []*route
	headerMatch bool // some route matches headers: read the metadata
	// clusters are the routes' clusters, in route order, each once, and
	// byName the same by name: what clusterSet.current and clusterFor
	// read, once per call, without walking the routes.
	clusters []*Cluster
	byName   map[string]*Cluster
	// drawn are the clusters that new calls can go to: those of routes
	// with one cluster, and the weighted ones above 0 (clusterSet.Ready).
	drawn []*Cluster
}

// route sends the calls it matches to one cluster's picker, or to one of
// its weighted clusters'.
type route struct {
	name    string
	service string // "/pkg.Service/" or ""
	prefix  string // method prefix or ""
	headers []headerMatch
	// dests are the route's clusters: its one, or its weighted ones in
	// the file's order; total is the sum of their weights, 0 for a route
	// with one cluster (no draw).
	dests   []dest
	total   int
	timeout time.Duration      // 0: none
	limit   *tokenBucket       // nil: no rate limit
	limited prometheus.Counter // nil if metrics are off
}

// dest is one cluster of a route.
type dest struct {
	cluster *Cluster
	picker  proxy.Picker
	upTo    int // the running sum of the route's weights, through this one
}

// choose returns the cluster of a call on r: the route's one; for a
// retry (call, the Upstream of the call's first pick, not nil) the
// weighted cluster of that name if r still lists it; else one drawn in
// proportion to the weights (a cluster of weight 0 never is).
func (r *route) choose(rt *router, call *proxy.Upstream) *dest {
	if r.total == 0 {
		return &r.dests[0]
	}
	if call != nil {
		// By name: a reload may have rebuilt the cluster (a new
		// Upstream), and the retry still belongs to it.
		for i := range r.dests {
			if r.dests[i].cluster.name == call.Name() {
				return &r.dests[i]
			}
		}
	}
	x := rt.intN(r.total)
	for i := range r.dests {
		if x < r.dests[i].upTo {
			return &r.dests[i]
		}
	}
	return &r.dests[len(r.dests)-1] // unreachable: x < total = the last upTo
}

// matches reports whether r takes a call to fullMethod with metadata md.
func (r *route) matches(fullMethod string, md metadata.MD) bool {
	if r.service != "" && !strings.HasPrefix(fullMethod, r.service) {
		return false
	}
	if r.prefix != "" && !strings.HasPrefix(fullMethod, r.prefix) {
		return false
	}
	for _, h := range r.headers {
		vs := md.Get(h.Name)
		switch {
		case h.Present:
			if len(vs) == 0 {
				return false
			}
		case h.Exact != nil:
			if len(vs) == 0 || vs[0] != *h.Exact {
				return false
			}
		case h.Prefix != nil:
			if len(vs) == 0 || !strings.HasPrefix(vs[0], *h.Prefix) {
				return false
			}
		}
	}
	return true
}

// match returns the first route that takes the call, or nil.
func (t *routeTable) match(ctx context.Context, fullMethod string) *route {
	var md metadata.MD
	if t.headerMatch {
		md, _ = metadata.FromIncomingContext(ctx)
	}
	for _, r := range t.routes {
		if r.matches(fullMethod, md) {
			return r
		}
	}
	return nil
}

// Pick routes the call and asks the route's cluster (one drawn, with
// weighted clusters) for a backend. A call no route takes fails with
// UNIMPLEMENTED, as Envoy answers a gRPC call without a route; a call
// over its route's rate limit fails at once with RESOURCE_EXHAUSTED.
func (rt *router) Pick(ctx context.Context, fullMethod string) (string, func(error), error) {
	r, err := rt.route(ctx, fullMethod)
	if err != nil {
		return "", nil, err
	}
	d := r.choose(rt, nil)
	if err := r.admit(d); err != nil {
		return "", nil, err
	}
	return d.picker.Pick(ctx, fullMethod)
}

// admit takes a token of r's rate limit for a call's first attempt, to go
// to d.
func (r *route) admit(d *dest) error {
	if r.limit != nil && !r.limit.allow() {
		if r.limited != nil {
			r.limited.Inc()
		}
		return &proxy.PickLimitError{
			Status:   status.Newf(codes.ResourceExhausted, "streamlb: route %s: rate limit exceeded", r.name),
			Limit:    LimitRateLimit,
			Upstream: d.cluster.name,
		}
	}
	return nil
}

// PickUpstream is Pick for a call's first attempt (call nil: it takes a
// token from the route's rate limit) and PickExcluding for a retry, which
// stays in the cluster of call, the Upstream of the call's first pick,
// if the route still has it (see route.choose); both avoid the backends
// in avoid if another will do. It answers with the backend the routed
// cluster's Upstream, the dial settings (backend TLS) and retry policy
// the data plane uses for it, and the route's timeout. The route and the
// Upstream come from the same route table, so a reload between two calls
// never pairs one cluster's backend with another's TLS settings.
func (rt *router) PickUpstream(ctx context.Context, fullMethod string, call *proxy.Upstream, avoid []string) (proxy.UpstreamPick, error) {
	r, err := rt.route(ctx, fullMethod)
	if err != nil {
		return proxy.UpstreamPick{}, err
	}
	d := r.choose(rt, call)
	if call == nil {
		if err := r.admit(d); err != nil {
			return proxy.UpstreamPick{}, err
		}
	}
	pk := proxy.UpstreamPick{Upstream: d.cluster.up, Timeout: r.timeout}
	if mp, ok := d.picker.(*meteredPicker); ok {
		pk.Addr, pk.Sent, pk.Done, err = mp.pickSent(ctx, fullMethod, avoid) // counted started when sent
	} else {
		pk.Addr, pk.Done, err = d.pick(ctx, fullMethod, avoid)
	}
	return pk, err
}

// PickExcluding picks a retry's backend from the routed cluster (one
// drawn anew, with weighted clusters: only PickUpstream knows the call's
// first), avoiding the backends tried. A retry is part of a call already
// admitted, so it takes no token from the rate limit.
func (rt *router) PickExcluding(ctx context.Context, fullMethod string, tried []string) (string, func(error), error) {
	r, err := rt.route(ctx, fullMethod)
	if err != nil {
		return "", nil, err
	}
	return r.choose(rt, nil).pick(ctx, fullMethod, tried)
}

// pick asks d's cluster for a backend, avoiding tried if not empty.
func (d *dest) pick(ctx context.Context, fullMethod string, tried []string) (string, func(error), error) {
	if len(tried) == 0 {
		return d.picker.Pick(ctx, fullMethod)
	}
	if p, ok := d.picker.(proxy.RetryPicker); ok {
		return p.PickExcluding(ctx, fullMethod, tried)
	}
	// The cluster's picker cannot exclude (the metered wrapper before it
	// learned to): ask it again a few times, as the proxy would.
	for i := 1; ; i++ {
		addr, done, err := d.picker.Pick(ctx, fullMethod)
		if err != nil || i == retryRepicks || !slices.Contains(tried, addr) {
			return addr, done, err
		}
		if done != nil {
			done(status.Error(codes.Canceled, "streamlb: repicked: backend already tried"))
		}
	}
}

// retryRepicks bounds the picks PickExcluding makes of a picker that
// cannot exclude.
const retryRepicks = 3

func (rt *router) route(ctx context.Context, fullMethod string) (*route, error) {
	if r := rt.table.Load().match(ctx, fullMethod); r != nil {
		return r, nil
	}
	return nil, status.Errorf(codes.Unimplemented, "streamlb: no route for %s", fullMethod)
}

// LimitRateLimit is the access log's limit of a call a route's rate limit
// refused.
const LimitRateLimit = "rate_limit"

// tokenBucket admits calls at rate per second with bursts of up to burst.
// It starts full. allow never blocks beyond a short critical section.
type tokenBucket struct {
	rate  float64
	burst float64
	now   func() time.Time

	mu     sync.Mutex // guards the fields below
	tokens float64
	last   time.Time
}

func newTokenBucket(rate float64, burst int, now func() time.Time) *tokenBucket {
	if burst < 1 {
		burst = 1
	}
	return &tokenBucket{rate: rate, burst: float64(burst), now: now, tokens: float64(burst), last: now()}
}

// allow takes a token if there is one.
func (b *tokenBucket) allow() bool {
	now := b.now()
	b.mu.Lock()
	defer b.mu.Unlock()
	if d := now.Sub(b.last); d > 0 {
		b.tokens = min(b.burst, b.tokens+d.Seconds()*b.rate)
		b.last = now
	}
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// buildTable makes the route table of f over clusters (by name). The
// rate limiters of routes whose name and limit are unchanged from old
// carry over, so a reload neither refills nor empties their buckets.
// limited, if not nil, counts the calls each route's limit rejects.
func buildTable(f *File, clusters map[string]*Cluster, old *routeTable, limited *prometheus.CounterVec, now func() time.Time) *routeTable {
	oldLimits := map[string]*tokenBucket{}
	if old != nil {
		for _, r := range old.routes {
			if r.limit != nil {
				oldLimits[r.name] = r.limit
			}
		}
	}
	t := &routeTable{byName: map[string]*Cluster{}}
	for i, fr := range f.Routes {
		r := &route{
			name:    f.routeName(i),
			prefix:  fr.Match.MethodPrefix,
			headers: slices.Clone(fr.Match.Headers),
			timeout: fr.Timeout,
		}
		if fr.Clusters == nil {
			c := clusters[fr.Cluster]
			r.dests = []dest{{cluster: c, picker: c.Picker()}}
		} else {
			total := 0
			for _, wc := range fr.Clusters {
				c := clusters[wc.Name]
				total += int(*wc.Weight)
				r.dests = append(r.dests, dest{cluster: c, picker: c.Picker(), upTo: total})
			}
			if len(r.dests) > 1 {
				r.total = total
			}
		}
		for k, d := range r.dests {
			// A cluster of weight 0 too: a retry may still go to it
			// (route.choose), and its calls are counted by name.
			if c := d.cluster; t.byName[c.name] == nil {
				t.byName[c.name] = c
				t.clusters = append(t.clusters, c)
			}
			if k > 0 && d.upTo == r.dests[k-1].upTo || k == 0 && r.total > 0 && d.upTo == 0 {
				continue // weight 0: no new call is drawn to it
			}
			if !slices.Contains(t.drawn, d.cluster) {
				t.drawn = append(t.drawn, d.cluster)
			}
		}
		if s := strings.Trim(fr.Match.Service, "/"); s != "" {
			r.service = "/" + s + "/"
		}
		if r.prefix != "" && !strings.HasPrefix(r.prefix, "/") {
			r.prefix = "/" + r.prefix // as grpcurl writes methods
		}
		for j := range r.headers {
			r.headers[j].Name = strings.ToLower(r.headers[j].Name)
		}
		t.headerMatch = t.headerMatch || len(r.headers) > 0
		if rl := fr.RateLimit; rl != nil {
			burst := rl.Burst
			if burst == 0 {
				// One second's worth, within an int32 (a float64 over an
				// int's range converts to an undefined int).
				burst = int(max(1, min(math.Ceil(rl.Rate), math.MaxInt32)))
			}
			b := oldLimits[r.name]
			if b == nil || b.rate != rl.Rate || b.burst != float64(burst) {
				b = newTokenBucket(rl.Rate, burst, now)
			}
			r.limit = b
			if limited != nil {
				r.limited = limited.WithLabelValues(r.name)
			}
		}
		t.routes = append(t.routes, r)
	}
	return t
}

// pickHeaders returns the request headers the routes of f and the hash
// policies of its clusters read, lower case and sorted: what the data
// plane must hand to Pick.
func pickHeaders(f *File) []string {
	var hs []string
	for _, r := range f.Routes {
		for _, h := range r.Match.Headers {
			hs = append(hs, strings.ToLower(h.Name))
		}
	}
	for _, c := range f.Clusters {
		if c.HashHeader != "" {
			hs = append(hs, strings.ToLower(c.HashHeader))
		}
	}
	slices.Sort(hs)
	return slices.Compact(hs)
}
