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
// slog.Default and math/rand/v2.
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

	// snap is the current snapshot. It is never nil after New. It is only
	// stored while holding mu, and loaded without it.
	snap atomic.Pointer[snapshot]

	mu sync.Mutex // mu serialises rebuilds and guards the fields below.
	// counters holds the long-lived per-backend counters keyed by address,
	// for exactly the addresses of the current snapshot.
	counters map[string]*counters
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
	logger := cfg.Logger
	if logger == nil {
		logger = slog.Default()
	}
	d := &Director{
		logger:     logger.With("component", "director"),
		policyName: name,
		policy:     p,
		counters:   make(map[string]*counters),
	}
	d.snap.Store(emptySnapshot)
	return d, nil
}

var _ resolver.Updater = (*Director)(nil)

// UpdateState replaces the backend set with s. It is called by a resolver,
// and may be called concurrently with Pick, done and itself; rebuilds are
// serialised. Counters of addresses present before and after survive;
// counters of removed addresses are dropped, though done functions already
// handed out for them stay safe to call. An empty set is accepted (Pick
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
	snap := newSnapshot(bs)
	d.counters = next
	d.snap.Store(snap)
	d.logChanges(old, snap)
	return nil
}

// logChanges logs how the set moved from old to next. Caller must hold mu,
// which keeps the log lines in the order of the rebuilds.
func (d *Director) logChanges(old, next *snapshot) {
	for _, b := range next.all {
		switch ob := old.find(b.addr); {
		case ob == nil:
			d.logger.Info("backend added", "backend", b.addr, "weight", b.weight, "policy", d.policyName)
		case ob.weight != b.weight:
			d.logger.Info("backend weight changed", "backend", b.addr, "weight", b.weight, "old_weight", ob.weight, "policy", d.policyName)
		}
	}
	for _, b := range old.all {
		if next.find(b.addr) == nil {
			d.logger.Info("backend removed", "backend", b.addr, "policy", d.policyName)
		}
	}
	if len(next.all) == 0 {
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
// with nil if it ended with grpc-status 0, with the error otherwise. Any
// non-nil error counts as a failure of that backend. Calling done more than
// once is safe: only the first call counts.
//
// If no backend is usable, Pick returns [ErrNoBackend] and a nil done.
func (d *Director) Pick(ctx context.Context, fullMethod string) (addr string, done func(error), err error) {
	s := d.snap.Load()
	if len(s.ready) == 0 {
		return "", nil, ErrNoBackend
	}
	b := d.policy.pick(s.ready)
	b.ctr.inflight.Add(1)
	if d.logger.Enabled(ctx, slog.LevelDebug) {
		d.logger.DebugContext(ctx, "picked backend", "backend", b.addr, "method", fullMethod, "policy", d.policyName)
	}
	c := &call{ctr: b.ctr}
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
}

// Backends returns the stats of the current set, sorted by Addr. The
// counters are read one by one, not as one atomic whole. It is safe to call
// concurrently with everything else, and the caller owns the result.
func (d *Director) Backends() []BackendStats {
	s := d.snap.Load()
	out := make([]BackendStats, len(s.all))
	for i, b := range s.all {
		out[i] = BackendStats{
			Addr:      b.addr,
			Weight:    b.weight,
			InFlight:  b.ctr.inflight.Load(),
			Successes: b.ctr.successes.Load(),
			Failures:  b.ctr.failures.Load(),
		}
	}
	return out
}
