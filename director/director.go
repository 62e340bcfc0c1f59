package director

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/streamlb/streamlb/resolver"
)

// ErrNoBackend is returned by [Director.Pick] when the current set has no
// usable backend. The proxy maps it to codes.Unavailable.
var ErrNoBackend = errors.New("director: no backend available")

// policy chooses one backend for a stream. It is one small type per policy
// name, in its own file.
type policy interface {
	// prepare precomputes the policy's fields of ps (a schedule, a ring)
	// from ps.ready, which is non-empty. It is called under Director.mu
	// once for every snapshot with backends, before the snapshot is
	// published, so it may keep state between calls (a cache) without more
	// locking.
	prepare(ps *pickSet)
	// pick is called concurrently from Pick. It must not block, and may
	// only read ps and the backends' atomic counters. ps.ready is
	// non-empty, sorted by address, shared, and must not be modified. ctx
	// is Pick's.
	pick(ctx context.Context, ps *pickSet) *backend
}

// newPolicy returns the policy named in s.
func newPolicy(s settings) policy {
	switch s.policy {
	case WeightedRoundRobin:
		return newWeightedRoundRobin(s.rand)
	case Random:
		return newRandom(s.rand)
	case LeastRequest:
		return newLeastRequest(s.choices, s.rand, s.now, s.slowStart)
	case PeakEWMA:
		return newPeakEWMA(s.choices, s.rand, s.now, s.slowStart, s.decay, s.penalty)
	case RingHash:
		return newRingHash(s.hashHeader, s.ringSize, s.rand)
	default:
		return newRoundRobin(s.rand)
	}
}

// Director picks backends for streams. Create one with [New]. All methods
// are safe for concurrent use.
type Director struct {
	logger     *slog.Logger
	policyName string
	policy     policy
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
	// setChanged wakes Run after UpdateState changed the set. Capacity 1,
	// sent to without blocking: one pending wake-up covers any number of
	// changes, as Run reads the whole set.
	setChanged chan struct{}
	// running is set while Run runs, which may only run once at a time.
	running atomic.Bool

	// snap is the current snapshot. It is never nil after New. It is only
	// stored while holding mu, and loaded without it.
	snap atomic.Pointer[snapshot]

	mu sync.Mutex // mu serialises rebuilds and guards the fields below.
	// counters holds the long-lived per-backend counters keyed by address,
	// for exactly the addresses of the current snapshot. Their outlier,
	// health and slow-start fields are guarded by mu too.
	counters map[string]*counters
	// ejectEpoch counts changes of the ejected set; see counters.capWarned.
	ejectEpoch uint64
	// panicking reports that the last published snapshot was in panic
	// mode, so the transitions are logged once.
	panicking bool
}

// New validates cfg and returns a Director with an empty backend set, so
// Pick returns [ErrNoBackend] until the first [Director.UpdateState]. New
// starts no goroutines and does no I/O; active health checks run only
// inside [Director.Run].
func New(cfg Config) (*Director, error) {
	st, err := validate(cfg)
	if err != nil {
		return nil, err
	}
	p := newPolicy(st)
	d := &Director{
		logger:     st.logger.With("component", "director"),
		policyName: st.policy,
		policy:     p,
		outlier:    st.outlier,
		health:     st.health,
		slowStart:  st.slowStart,
		initialRTT: st.initialRTT,
		now:        st.now,
		resolveNow: st.resolveNow,
		dialHealth: dialGRPCHealth,
		setChanged: make(chan struct{}, 1),
		counters:   make(map[string]*counters),
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
// is set and the set was not empty. If only ejected backends remain, the
// ejection that would end first ends at once. An empty set is accepted
// (Pick then returns [ErrNoBackend]) and logged as a warning. UpdateState
// wakes [Director.Run], if running, to start and stop health checkers.
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
			c = new(counters)
			c.latency.reset(d.initialRTT, now)
			if d.slowStart > 0 && len(old.all) > 0 {
				c.slowStartAt = now
			}
		}
		next[a.Addr] = c
		bs = append(bs, &backend{addr: a.Addr, weight: max(a.Weight, 1), ctr: c})
	}
	sortBackends(bs)
	d.logChanges(old.all, bs)
	d.counters = next
	d.publishLocked(bs, now)
	// Wake Run to start and stop health checkers.
	select {
	case d.setChanged <- struct{}{}:
	default:
	}
	return nil
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

// ReportError records that the resolver failed. The director keeps the last
// set it accepted and logs the error as a warning. It may be called
// concurrently with the other methods.
func (d *Director) ReportError(err error) {
	d.logger.Warn("resolver error; keeping the last backend set",
		"err", err, "backends", len(d.snap.Load().all), "policy", d.policyName)
}

// Pick chooses a backend for a stream of fullMethod ("/pkg.Service/Method").
// It is called by the proxy once per stream, concurrently; it never blocks
// and does no I/O. On success it returns the backend's "host:port" and a
// done function that the caller must call exactly once when the stream ends:
// with nil if it ended with grpc-status 0, with the error otherwise, carrying
// the gRPC status (status.Code must read it). Any non-nil error counts in
// [BackendStats.Failures]. For outlier ejection, codes.Unavailable counts
// as the backend being unreachable (the proxy reports connect failures,
// lost connections and refused streams so), Canceled and DeadlineExceeded
// (or context.Canceled and context.DeadlineExceeded) count as nothing, and
// anything else means the backend answered; see [Config.EjectAfter].
// Calling done more than once is safe: only the first call counts. done may
// be called from any goroutine; it does not block, except briefly on the
// director's mutex when it completes a run of failures, and, with
// [PeakEWMA], on the backend's estimate.
//
// With [PeakEWMA], the time from Pick to done is the backend's latency
// sample. For codes.Unavailable, done also calls [Config.ResolveNow].
//
// Pick does not pick ejected backends, nor backends that failed active
// health checks unless none is healthy (panic mode; see [Director.Run]).
// When an ejection has run out or a slow-start step is due, the first Pick
// that notices it rebuilds the snapshot if it can do so without waiting,
// else a later one does. Besides logging, only [RingHash] reads ctx, for
// the hash key; Pick does not keep it.
//
// If no backend is usable, Pick returns [ErrNoBackend] and a nil done.
func (d *Director) Pick(ctx context.Context, fullMethod string) (addr string, done func(error), err error) {
	s := d.load()
	if len(s.set.ready) == 0 {
		return "", nil, ErrNoBackend
	}
	b := d.policy.pick(ctx, &s.set)
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

// BackendStats is a point-in-time view of one backend's counters.
type BackendStats struct {
	// Addr is the backend's "host:port".
	Addr string
	// Weight is the backend's effective weight (at least 1).
	Weight uint32
	// InFlight is the number of picked streams whose done has not been
	// called yet.
	InFlight int64
	// Successes and Failures count done calls with a nil and a non-nil
	// error, since the address last joined the set.
	Successes int64
	Failures  int64
	// Ejected reports whether outlier ejection currently keeps the backend
	// from being picked.
	Ejected bool
	// Ejections counts the backend's ejections since the address last
	// joined the set.
	Ejections int64
	// Healthy reports the verdict of active health checks: true unless
	// checks found the backend unhealthy. An unhealthy backend gets no
	// streams unless no backend is healthy.
	Healthy bool
}

// Backends returns the stats of the current set, sorted by Addr. The
// counters are read one by one, not as one atomic whole. Like Pick, it
// first restores ejections that have run out, if it can without waiting.
// It is safe to call concurrently with everything else, and the caller owns
// the result.
func (d *Director) Backends() []BackendStats {
	s := d.load()
	out := make([]BackendStats, len(s.all))
	for i, b := range s.all {
		out[i] = BackendStats{
			Addr:      b.addr,
			Weight:    b.weight,
			InFlight:  b.ctr.inflight.Load(),
			Successes: b.ctr.successes.Load(),
			Failures:  b.ctr.failures.Load(),
			Ejected:   b.ejected,
			Ejections: b.ctr.ejections.Load(),
			Healthy:   !b.unhealthy,
		}
	}
	return out
}
