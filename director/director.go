package director

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/streamlb/streamlb/resolver"
	"google.golang.org/grpc/credentials"
)

// ErrNoBackend is returned by [Director.Pick] when the current set has no
// usable backend. The proxy maps it to codes.Unavailable.
var ErrNoBackend = errors.New("director: no backend available")

// Director picks backends for streams. Create one with [New]. All methods
// are safe for concurrent use.
type Director struct {
	logger     *slog.Logger
	policyName string
	builder    builder
	outlier    outlierConfig
	health     healthConfig
	slowStart  time.Duration
	initialRTT time.Duration
	now        func() time.Time
	resolveNow func()
	// ewma is the policy when it is PeakEWMA, else nil: done feeds it
	// latencies.
	ewma *peakEWMA
	// dialHealth opens a health-check client for one backend; see
	// health.go. Tests may replace it before Run.
	dialHealth func(addr string, hc healthConfig) (healthProber, error)
	// handshake is the reconnect probe of an ejected backend; see
	// uneject.go. Tests may replace it before Run.
	handshake func(ctx context.Context, addr string, creds credentials.TransportCredentials) error
	// wake wakes Run: after a snapshot was published (the set, health or
	// ejections changed; Run follows the new set's health checkers and
	// rebuildAt) and when a done call asks for an ejection. Capacity 1,
	// sent to without blocking (see kick): one pending wake-up covers any
	// number of events, as Run reads the whole state.
	wake chan struct{}
	// running is set while Run runs, which may only run once at a time.
	running atomic.Bool

	// snap is the current snapshot. It is never nil after New. It is only
	// stored while holding mu, and loaded without it: Pick, done and
	// Backends never take mu.
	snap atomic.Pointer[snapshot]

	mu sync.Mutex // mu serialises rebuilds and guards the fields below.
	// counters holds the long-lived per-backend counters keyed by address,
	// for exactly the addresses of the current snapshot. Their outlier,
	// health and slow-start fields are guarded by mu too.
	counters map[string]*counters
	// departed holds the in-flight counts (counters.inflight) of
	// addresses that left the set with calls still in flight, for the
	// address's next counters should it come back while they run.
	// UpdateState drops a count once its calls ended, so an address that
	// never comes back is held only while its calls run (and until the
	// next update).
	departed map[string]*atomic.Int64
	// ejectEpoch counts changes of the ejected set; see counters.capWarned.
	ejectEpoch uint64
	// panicking reports that the last published snapshot was in panic
	// mode, so the transitions are logged once.
	panicking bool
	// inherit is the director this one replaces (Inherit), whose
	// verdicts the backends of the first set start with; nil once that
	// set is in. inheritEjections: its ejections too.
	inherit          *Director
	inheritEjections bool
}

// New validates cfg and returns a Director with an empty backend set, so
// Pick returns [ErrNoBackend] until the first [Director.UpdateState]. New
// starts no goroutines and does no I/O. Ejections, their expiry, slow-start
// steps and active health checks happen on the goroutine that runs
// [Director.Run], which the owner must run.
func New(cfg Config) (*Director, error) {
	st, err := validate(cfg)
	if err != nil {
		return nil, err
	}
	p := newBuilder(st)
	d := &Director{
		logger:     st.logger.With("component", "director"),
		policyName: st.policy,
		builder:    p,
		outlier:    st.outlier,
		health:     st.health,
		slowStart:  st.slowStart,
		initialRTT: st.initialRTT,
		now:        st.now,
		resolveNow: st.resolveNow,
		dialHealth: dialGRPCHealth,
		handshake:  h2Handshake,
		wake:       make(chan struct{}, 1),
		counters:   make(map[string]*counters),
		departed:   make(map[string]*atomic.Int64),
	}
	d.ewma, _ = p.(*peakEWMA)
	d.snap.Store(emptySnapshot)
	return d, nil
}

var _ resolver.Updater = (*Director)(nil)

// UpdateState replaces the backend set with s. It is called by a resolver,
// and may be called concurrently with Pick, done and itself; rebuilds are
// serialised. Counters and ejection state of addresses present before and
// after survive; those of removed addresses are dropped, though done
// functions already handed out for them stay safe to call. A new address
// starts healthy, with fresh counters, and slow-starts if [Config.SlowStart]
// is set and the set was not empty; but an address back in the set while
// calls picked before it left still run keeps counting them in flight
// ([BackendStats.InFlight], what LeastRequest and PeakEWMA compare). If only ejected backends remain, the
// ejection that would end first ends at once; if more than
// [Config.MaxEjectionPercent] of the new set is ejected, the ejections
// that would end first end until it is not. Each change is logged: a
// backend added, removed or reweighted at Info, an empty set as a warning
// (Pick then returns [ErrNoBackend]). UpdateState wakes [Director.Run], if
// running, to start and stop health checkers.
//
// UpdateState rejects a set with an empty or duplicate address, returning
// an error and keeping the previous set. It does not retain s.
func (d *Director) UpdateState(s resolver.State) error {
	seen := make(map[string]struct{}, len(s.Addresses))
	for i, a := range s.Addresses {
		if a.Addr == "" {
			return fmt.Errorf("director: address %d of %d is empty", i, len(s.Addresses))
		}
		if _, dup := seen[a.Addr]; dup {
			return fmt.Errorf("director: duplicate address %q", a.Addr)
		}
		seen[a.Addr] = struct{}{}
	}

	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.now()
	old := d.snap.Load()
	next := make(map[string]*counters, len(s.Addresses))
	bs := make([]*backend, 0, len(s.Addresses))
	for _, a := range s.Addresses {
		c := d.counters[a.Addr]
		if c == nil {
			c = newCounters()
			if n := d.departed[a.Addr]; n != nil {
				// Back while its calls from before still run: they
				// are still in flight on it.
				c.inflight = n
				delete(d.departed, a.Addr)
			}
			c.latency.reset(d.initialRTT, now)
			if d.slowStart > 0 && len(old.all) > 0 {
				c.slowStartAt = now
			}
			if d.inherit != nil {
				d.inheritLocked(a.Addr, c, now)
			}
		}
		next[a.Addr] = c
		bs = append(bs, &backend{addr: a.Addr, weight: max(a.Weight, 1), ctr: c})
	}
	d.inherit = nil // the first set only: a backend that joins later is new
	for addr, c := range d.counters {
		if _, ok := next[addr]; !ok && c.inflight.Load() > 0 {
			d.departed[addr] = c.inflight
		}
	}
	for addr, n := range d.departed {
		if n.Load() <= 0 {
			delete(d.departed, addr) // its calls ended
		}
	}
	sortBackends(bs)
	d.logChanges(old.all, bs)
	d.counters = next
	d.publishLocked(bs, now) // wakes Run to start and stop health checkers
	return nil
}

// Inherit makes d, built to replace old (a reload rebuilt their cluster
// for other settings), start the backends of its first set that old has
// with old's verdicts on them rather than as new backends, so that a
// reload of an unrelated setting does not send calls to a backend known
// to fail them: unhealthy, if old's health checks said so and d checks
// health too (d's checks then decide, as after any verdict); and, if
// ejections and d ejects, ejected until old's ejection ends (within d's
// MaxEjection), with old's ejection count and length multiplier. Call it
// before d's first UpdateState, while old still runs: a director whose
// Run ended counts every backend healthy.
func (d *Director) Inherit(old *Director, ejections bool) {
	if old == nil || old == d {
		return
	}
	old.mu.Lock()
	from, fromEjections := old.inherit, old.inheritEjections
	old.mu.Unlock()
	if from != nil {
		// old never got a set: what it was to inherit. Directors that
		// never get one, rebuilt reload after reload, hold one other
		// director, not a chain of them.
		old, ejections = from, ejections && fromEjections
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.inherit, d.inheritEjections = old, ejections
}

// inheritLocked gives c, the new counters of addr, what d.inherit knows
// of addr (see Inherit). Caller must hold d.mu; it takes the old
// director's, which never takes d's.
func (d *Director) inheritLocked(addr string, c *counters, now time.Time) {
	o := d.inherit
	o.mu.Lock()
	defer o.mu.Unlock()
	oc := o.counters[addr]
	if oc == nil {
		return
	}
	if oc.unhealthy && d.health.interval > 0 && o.health.interval > 0 {
		c.unhealthy, c.unhealthyReason = true, oc.unhealthyReason
	}
	if !d.inheritEjections || d.outlier.ejectAfter == 0 {
		return
	}
	c.ejections.Store(oc.ejections.Load())
	c.multiplier = min(oc.multiplier, d.outlier.maxMultiplier)
	c.restoredAt = oc.restoredAt
	if !oc.ejectedUntil.IsZero() && now.Before(oc.ejectedUntil) {
		c.ejectedUntil = oc.ejectedUntil
		if limit := now.Add(d.outlier.max); c.ejectedUntil.After(limit) {
			c.ejectedUntil = limit
		}
		c.reconnectProbe, c.ejectReason = oc.reconnectProbe, oc.ejectReason
	}
}

// kick wakes Run without blocking; see Director.wake.
func (d *Director) kick() {
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// logChanges logs how the set moved from old to next, both sorted by
// address. Caller must hold mu, which keeps the log lines in the order of
// the rebuilds.
func (d *Director) logChanges(old, next []*backend) {
	for _, b := range next {
		switch ob := findBackend(old, b.addr); {
		case ob == nil:
			d.logger.Info("backend added", "backend", b.addr, "weight", b.weight, "policy", d.policyName)
		case ob.weight != b.weight:
			d.logger.Info("backend weight changed", "backend", b.addr, "weight", b.weight, "old_weight", ob.weight, "policy", d.policyName)
		}
	}
	for _, b := range old {
		if findBackend(next, b.addr) == nil {
			d.logger.Info("backend removed", "backend", b.addr, "policy", d.policyName)
		}
	}
	if len(next) == 0 {
		d.logger.Warn("backend set is empty; picks fail until backends return", "policy", d.policyName)
	}
}

// ReportError is told that the resolver failed. The director keeps the last
// set it accepted and does not log: the resolver logged the failure, with
// the target and its backoff, where it happened. It may be called
// concurrently with the other methods.
func (d *Director) ReportError(error) {}

// Policy returns the name of the director's policy, one of [Policies].
func (d *Director) Policy() string { return d.policyName }

// Ready reports whether a stream picked now would go to a backend that is
// neither ejected nor failing its health checks. It is false while the set
// is empty and while every backend is unhealthy or ejected: then Pick still
// picks among the unejected backends (panic mode, see [Director.Run]), but
// an orchestrator should send clients to a proxy that has a healthy
// backend. Ready reads the current snapshot; it never blocks.
func (d *Director) Ready() bool { return d.snap.Load().healthy }

// Pick chooses a backend for a stream of fullMethod ("/pkg.Service/Method").
// It is called by the proxy once per stream, concurrently; it never blocks
// and does no I/O. On success it returns the backend's "host:port" and a
// done function that the caller must call exactly once when the stream ends:
// with nil if it ended with grpc-status 0, with the error otherwise, carrying
// the gRPC status (status.Code must read it). Any non-nil error but a
// cancel (codes.Canceled or context.Canceled) counts in
// [BackendStats.Failures]. For outlier ejection, codes.Unavailable counts
// as the backend being unreachable (the proxy reports connect failures,
// lost connections and refused streams so), Canceled and DeadlineExceeded
// (or context.Canceled and context.DeadlineExceeded) count as nothing, as
// does an error with a method Draining() bool that returns true (the
// backend announced a graceful restart), an error with a method
// Unanswered() bool that returns true (a route's timeout passed with the
// backend given the whole request and no answer from it) counts as
// unreachable, and anything else means the backend answered; see
// [Config.EjectAfter].
// Calling done more than once is safe: only the first call counts. done may
// be called from any goroutine, also while the caller holds its own locks:
// it updates atomics, with [PeakEWMA] takes the backend's estimate's own
// short lock, and hands an ejection to Run without waiting; it never takes
// the director's mutex.
//
// With [PeakEWMA], the time from Pick to done is the backend's latency
// sample. For codes.Unavailable, done also calls [Config.ResolveNow].
//
// Pick does not pick ejected backends, nor backends that failed active
// health checks unless none is healthy (panic mode; see [Director.Run]).
// Pick only reads the current snapshot, as grpc-go's pickers do: it never
// rebuilds one and never takes the director's mutex, so it may be called
// under the caller's locks. Ejections end, and slow-start steps advance, on
// Run's timer. Besides logging, only [RingHash] reads ctx, for the hash
// key; Pick does not keep it.
//
// If no backend is usable, Pick returns [ErrNoBackend] and a nil done.
func (d *Director) Pick(ctx context.Context, fullMethod string) (addr string, done func(error), err error) {
	s := d.snap.Load()
	if s.picker == nil {
		return "", nil, ErrNoBackend
	}
	return d.picked(ctx, s.picker.pick(ctx), fullMethod)
}

// PickExcluding is [Director.Pick] for a retry of a stream: it avoids the
// backends in tried, the addresses the stream's earlier attempts went to,
// so a retry does not land on the backend that just failed it (Envoy's
// previous_hosts retry predicate, HAProxy's redispatch). It asks the
// policy again a few times and then takes the next ready backend, in
// address order, that is not in tried; if every ready backend was tried
// it returns the policy's pick. Its contract is otherwise Pick's: it never
// blocks, never takes the director's mutex, and does not keep tried.
func (d *Director) PickExcluding(ctx context.Context, fullMethod string, tried []string) (addr string, done func(error), err error) {
	s := d.snap.Load()
	if s.picker == nil {
		return "", nil, ErrNoBackend
	}
	b := s.picker.pick(ctx)
	for range excludeRepicks {
		if !slices.Contains(tried, b.addr) {
			return d.picked(ctx, b, fullMethod)
		}
		b = s.picker.pick(ctx)
	}
	if slices.Contains(tried, b.addr) {
		// Walk on from the policy's choice, so that retries spread
		// over the untried backends as the policy's picks do.
		i, _ := slices.BinarySearchFunc(s.ready, b.addr, func(x *backend, addr string) int { return cmp.Compare(x.addr, addr) })
		for j := 1; j < len(s.ready); j++ {
			if x := s.ready[(i+j)%len(s.ready)]; !slices.Contains(tried, x.addr) {
				b = x
				break
			}
		}
	}
	return d.picked(ctx, b, fullMethod)
}

// excludeRepicks is how many more times PickExcluding asks the policy
// before it walks the ready list; for random and P2C policies a repick
// keeps their spread.
const excludeRepicks = 2

// picked accounts a pick of b and returns Pick's results.
func (d *Director) picked(ctx context.Context, b *backend, fullMethod string) (string, func(error), error) {
	b.ctr.inflight.Add(1)
	if d.logger.Enabled(ctx, slog.LevelDebug) {
		d.logger.DebugContext(ctx, "picked backend", "backend", b.addr, "method", fullMethod, "policy", d.policyName)
	}
	c := &call{d: d, b: b}
	if d.ewma != nil {
		c.start = d.now().UnixNano()
	}
	return b.addr, c.done, nil
}

// BackendStats is a point-in-time view of one backend's counters. Its JSON
// form (the admin endpoint /backends) uses snake_case names, as the
// loadtest report does.
type BackendStats struct {
	// Addr is the backend's "host:port".
	Addr string `json:"addr"`
	// Weight is the backend's effective weight (at least 1).
	Weight uint32 `json:"weight"`
	// InFlight is the number of picked streams whose done has not been
	// called yet.
	InFlight int64 `json:"in_flight"`
	// Successes and Failures count done calls with a nil and a non-nil
	// error, since the address last joined the set. A call that ended
	// CANCELLED (or context.Canceled: the client gave up or went away,
	// or the proxy did not use the pick) counts in neither.
	Successes int64 `json:"successes"`
	Failures  int64 `json:"failures"`
	// Ejected reports whether outlier ejection currently keeps the backend
	// from being picked; EjectedUntil is when that ejection ends.
	Ejected      bool      `json:"ejected"`
	EjectedUntil time.Time `json:"ejected_until,omitzero"`
	// Ejections counts the backend's ejections since the address last
	// joined the set.
	Ejections int64 `json:"ejections"`
	// Healthy reports the verdict of active health checks: true unless
	// checks found the backend unhealthy. An unhealthy backend gets no
	// streams unless no backend is healthy.
	Healthy bool `json:"healthy"`
	// Reason says why the backend is unhealthy or ejected: the last failing
	// health check's status or error, or the failures that ejected it.
	// Empty while it is healthy and not ejected.
	Reason string `json:"reason,omitempty"`
}

// Backends returns the stats of the current set, sorted by Addr. The
// counters are read one by one, not as one atomic whole. Like Pick, it
// only reads the current snapshot. It is safe to call concurrently with
// everything else, and the caller owns the result.
func (d *Director) Backends() []BackendStats {
	s := d.snap.Load()
	out := make([]BackendStats, len(s.all))
	for i, b := range s.all {
		out[i] = BackendStats{
			Addr:         b.addr,
			Weight:       b.weight,
			InFlight:     b.ctr.inflight.Load(),
			Successes:    b.ctr.successes.Load(),
			Failures:     b.ctr.failures.Load(),
			Ejected:      b.ejected,
			EjectedUntil: b.ejectedUntil,
			Ejections:    b.ctr.ejections.Load(),
			Healthy:      !b.unhealthy,
			Reason:       b.reason,
		}
	}
	return out
}
