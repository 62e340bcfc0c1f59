package director

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/streamlb/streamlb/resolver"
)

// Policy names accepted in [Config.Policy].
const (
	// RoundRobin cycles through the backends in address order, starting at
	// a random offset so a fleet of proxies does not move in lockstep.
	RoundRobin = "round_robin"
	// LeastRequest samples [Config.ChoiceCount] distinct backends at random
	// and picks the one with the fewest streams in flight (power of d
	// choices, gRFC A48).
	LeastRequest = "least_request"
)

// Bounds for [Config.ChoiceCount]. gRFC A48 uses the same default and cap.
const (
	DefaultChoiceCount = 2
	MaxChoiceCount     = 10
)

// ErrNoBackend is returned by [Director.Pick] when the current set has no
// usable backend. The proxy maps it to codes.Unavailable.
var ErrNoBackend = errors.New("director: no backend available")

// Policies returns the policy names [New] accepts, for flag help and error
// messages. The caller owns the result.
func Policies() []string { return []string{RoundRobin, LeastRequest} }

// Config configures a [Director]. The zero value is valid: round robin,
// outlier ejection with Envoy's defaults, slog.Default, math/rand/v2 and
// time.Now.
type Config struct {
	// Policy is one of [Policies]; "" means [RoundRobin].
	Policy string
	// ChoiceCount is how many backends [LeastRequest] samples per pick,
	// 2..[MaxChoiceCount]; 0 means [DefaultChoiceCount]. Other policies
	// ignore it.
	ChoiceCount int
	// Logger receives state-change logs; nil means slog.Default(). The
	// director adds component=director.
	Logger *slog.Logger
	// Rand supplies randomness to policies; nil means math/rand/v2's global
	// source. Pick calls it concurrently, so it must be safe for concurrent
	// use. Tests inject a deterministic source here.
	Rand interface{ IntN(n int) int }

	// EjectAfter is how many streams of a backend in a row must end with
	// codes.Unavailable for the backend to be ejected: left out of picking
	// for a while. 0 means [DefaultEjectAfter]; a negative value disables
	// ejection. A stream that ends in success or with another backend
	// status ends the run; Canceled and DeadlineExceeded neither count nor
	// end it. See [Director.Pick].
	EjectAfter int
	// BaseEjection is how long a first ejection lasts; the n-th lasts n
	// times as long, up to MaxEjection. The count decays by one for every
	// BaseEjection the backend spends back in the set. 0 means
	// [DefaultBaseEjection].
	BaseEjection time.Duration
	// MaxEjection caps one ejection's length. 0 means [DefaultMaxEjection],
	// or BaseEjection if that is longer; otherwise it must be at least
	// BaseEjection.
	MaxEjection time.Duration
	// MaxEjectionPercent is the largest share of the set, 1..100, that may
	// be ejected at once; an ejection that would exceed it does not
	// happen. Whatever the value, the last pickable backend is never
	// ejected. 0 means [DefaultMaxEjectionPercent].
	MaxEjectionPercent int
	// Now is the clock for ejection times; nil means time.Now. Pick calls
	// it concurrently while a backend is ejected, so it must be safe for
	// concurrent use. Tests inject a fake clock here.
	Now func() time.Time
}

// randSource is the randomness policies use; see [Config.Rand].
type randSource = interface{ IntN(n int) int }

// globalRand adapts math/rand/v2's goroutine-safe global source.
type globalRand struct{}

func (globalRand) IntN(n int) int { return rand.IntN(n) }

// policy chooses one backend for a stream. pick is called concurrently from
// Pick, must not block, and may only read bs and the backends' atomic
// counters. bs is the snapshot's usable set: non-empty, sorted by address,
// shared, and must not be modified.
type policy interface {
	pick(bs []*backend) *backend
}

// Director picks backends for streams. Create one with [New]. All methods
// are safe for concurrent use.
type Director struct {
	logger     *slog.Logger
	policyName string
	policy     policy
	outlier    outlierConfig
	now        func() time.Time

	// snap is the current snapshot. It is never nil after New. It is only
	// stored while holding mu, and loaded without it.
	snap atomic.Pointer[snapshot]

	mu sync.Mutex // mu serialises rebuilds and guards the fields below.
	// counters holds the long-lived per-backend counters keyed by address,
	// for exactly the addresses of the current snapshot. Their outlier
	// fields are guarded by mu too.
	counters map[string]*counters
	// ejectEpoch counts changes of the ejected set; see counters.capWarned.
	ejectEpoch uint64
}

// New validates cfg and returns a Director with an empty backend set, so
// Pick returns [ErrNoBackend] until the first [Director.UpdateState]. New
// starts no goroutines and does no I/O.
func New(cfg Config) (*Director, error) {
	name := cfg.Policy
	if name == "" {
		name = RoundRobin
	}
	r := randSource(globalRand{})
	if cfg.Rand != nil {
		r = cfg.Rand
	}
	var p policy
	switch name {
	case RoundRobin:
		p = newRoundRobin(r)
	case LeastRequest:
		n := cfg.ChoiceCount
		if n == 0 {
			n = DefaultChoiceCount
		}
		if n < 2 || n > MaxChoiceCount {
			return nil, fmt.Errorf("director: %s choice count %d out of range 2..%d", LeastRequest, cfg.ChoiceCount, MaxChoiceCount)
		}
		p = newLeastRequest(n, r)
	default:
		return nil, fmt.Errorf("director: unknown policy %q (valid: %s)", cfg.Policy, strings.Join(Policies(), ", "))
	}
	oc, err := newOutlierConfig(cfg)
	if err != nil {
		return nil, err
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.Default()
	}
	now := cfg.Now
	if now == nil {
		now = time.Now
	}
	d := &Director{
		logger:     logger.With("component", "director"),
		policyName: name,
		policy:     p,
		outlier:    oc,
		now:        now,
		counters:   make(map[string]*counters),
	}
	d.snap.Store(emptySnapshot)
	return d, nil
}

var _ resolver.Updater = (*Director)(nil)

// UpdateState replaces the backend set with s. It is called by a resolver,
// and may be called concurrently with Pick, done and itself; rebuilds are
// serialised. Counters and ejection state of addresses present before and
// after survive; those of removed addresses are dropped, though done
// functions already handed out for them stay safe to call. If only ejected
// backends remain, the ejection that would end first ends at once. An empty set is accepted (Pick
// then returns [ErrNoBackend]) and logged as a warning.
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
	old := d.snap.Load()
	next := make(map[string]*counters, len(s.Addresses))
	bs := make([]*backend, 0, len(s.Addresses))
	for _, a := range s.Addresses {
		c := d.counters[a.Addr]
		if c == nil {
			c = new(counters)
		}
		next[a.Addr] = c
		bs = append(bs, &backend{addr: a.Addr, weight: max(a.Weight, 1), ctr: c})
	}
	sortBackends(bs)
	d.logChanges(old.all, bs)
	d.counters = next
	d.publishLocked(bs, d.now())
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
// director's mutex when it completes a run of failures.
//
// Pick does not pick ejected backends. When an ejection has run out, the
// first Pick that notices it rebuilds the snapshot if it can do so without
// waiting, else a later one does.
//
// If no backend is usable, Pick returns [ErrNoBackend] and a nil done.
func (d *Director) Pick(ctx context.Context, fullMethod string) (addr string, done func(error), err error) {
	s := d.load()
	if len(s.ready) == 0 {
		return "", nil, ErrNoBackend
	}
	b := d.policy.pick(s.ready)
	b.ctr.inflight.Add(1)
	if d.logger.Enabled(ctx, slog.LevelDebug) {
		d.logger.DebugContext(ctx, "picked backend", "backend", b.addr, "method", fullMethod, "policy", d.policyName)
	}
	c := &call{d: d, b: b}
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
		}
	}
	return out
}
