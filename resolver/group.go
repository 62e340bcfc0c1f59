package resolver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"
)

// Group is a [Resolver] that combines the sets of several resolvers, static
// and DNS, into one: their union, without duplicate addresses. [New] builds
// one from a list of targets. A Group is immutable and safe for concurrent
// use; Run must not be called concurrently with itself.
type Group struct {
	children []child
	logger   *slog.Logger
}

// child is one resolver of a Group.
type child struct {
	name string // for logs: the target, or "static" for the static set
	r    Resolver
}

var _ Resolver = (*Group)(nil)

// New validates targets and builds one resolver for all of them: static
// "host:port" targets form one fixed set (as [NewStatic] builds it), each
// DNS target gets a [DNS] resolver configured by opts, each etcd target an
// [Etcd] resolver configured by opts.Etcd, and each zk target a [ZK]
// resolver configured by opts.ZK. The result is a *[Group]. All
// problems are reported at once, joined with [errors.Join]. New does no
// network I/O and starts no goroutines; it reads opts.Etcd's TLS files if
// an etcd target is given.
func New(targets []string, opts DNSOptions) (Resolver, error) {
	if len(targets) == 0 {
		return nil, errors.New("resolver: no targets given")
	}
	var (
		errs    []error
		static  []string
		dnsTgts []Target
		seen    = make(map[Target]string)
	)
	for _, s := range targets {
		t, err := ParseTarget(s)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if t.IsStatic() {
			static = append(static, s) // NewStatic reports its duplicates
			continue
		}
		if first, dup := seen[t]; dup {
			errs = append(errs, fmt.Errorf("resolver: duplicate target %q (already given as %q)", s, first))
			continue
		}
		seen[t] = s
		dnsTgts = append(dnsTgts, t)
	}
	opts, err := opts.withDefaults()
	if err != nil {
		errs = append(errs, err)
	}
	// The registries take the logger and backoff of opts unless their own
	// options set them.
	eopts, zopts := opts.Etcd, opts.ZK
	inherit(&eopts.Logger, &eopts.BackoffInitial, &eopts.BackoffMax, opts)
	inherit(&zopts.Logger, &zopts.BackoffInitial, &zopts.BackoffMax, opts)
	registries := make(map[Target]Resolver)
	failed := make(map[string]bool) // schemes whose options were rejected
	for _, t := range dnsTgts {
		var r Resolver
		var err error
		switch t.Scheme {
		case SchemeEtcd:
			r, err = NewEtcd(t, eopts)
		case SchemeZK:
			r, err = NewZK(t, zopts)
		default:
			continue // DNS, built below once every target is known good
		}
		if err != nil {
			// The options' problems would repeat for every target.
			if !failed[t.Scheme] {
				errs = append(errs, err)
			}
			failed[t.Scheme] = true
			continue
		}
		registries[t] = r
	}
	g := &Group{}
	if len(static) > 0 {
		st, err := NewStatic(static)
		if err != nil {
			errs = append(errs, err)
		} else {
			g.children = append(g.children, child{name: "static", r: st})
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	for _, t := range dnsTgts {
		if r := registries[t]; r != nil {
			g.children = append(g.children, child{name: t.String(), r: r})
			continue
		}
		d, err := NewDNS(t, opts)
		if err != nil {
			return nil, err // unreachable: t and opts were validated
		}
		g.children = append(g.children, child{name: t.String(), r: d})
	}
	g.logger = opts.Logger.With("component", "resolver")
	return g, nil
}

// inherit fills a registry's logger and backoff from opts where unset.
func inherit(logger **slog.Logger, initial, max *time.Duration, opts DNSOptions) {
	if *logger == nil {
		*logger = opts.Logger
	}
	if *initial == 0 && *max == 0 {
		*initial, *max = opts.BackoffInitial, opts.BackoffMax
	}
}

// ResolveNow asks every resolver of the group to re-resolve early; see
// [DNS.ResolveNow]. It never blocks and is safe to call concurrently.
func (g *Group) ResolveNow() {
	for _, c := range g.children {
		c.r.ResolveNow()
	}
}

// childEvent is what a child resolver reported to the Group.
type childEvent struct {
	idx   int
	state *State // nil for an error
	err   error
}

// childUpdater is the Updater a Group gives each child. It forwards calls
// to Run's merge loop and accepts every set: the Group itself offers the
// union to the real Updater.
type childUpdater struct {
	idx    int
	events chan<- childEvent
	done   <-chan struct{}
}

func (c *childUpdater) UpdateState(s State) error {
	select {
	case c.events <- childEvent{idx: c.idx, state: &s}:
	case <-c.done:
	}
	return nil
}

func (c *childUpdater) ReportError(err error) {
	select {
	case c.events <- childEvent{idx: c.idx, err: err}:
	case <-c.done:
	}
}

// Run runs every child resolver on its own goroutine and pushes the union
// of their sets to u: first once every child has reported (a set or an
// error), so that a slower DNS target does not make the set flap at start,
// then whenever the union changes. An address given by several children
// appears once, with the weight of the first child (in target order) that
// has it. A child's error is passed to u.ReportError and the union keeps
// that child's last set. Run blocks until ctx is cancelled, then waits for
// its goroutines and returns nil. If u rejects a union, Run offers the next
// one that differs from the last accepted.
func (g *Group) Run(ctx context.Context, u Updater) error {
	ctx, cancel := context.WithCancel(ctx)
	events := make(chan childEvent)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
	}()
	for i, c := range g.children {
		wg.Go(func() {
			cu := &childUpdater{idx: i, events: events, done: ctx.Done()}
			if err := c.r.Run(ctx, cu); err != nil {
				cu.ReportError(fmt.Errorf("resolver: %s stopped: %w", c.name, err))
			}
		})
	}
	return g.merge(ctx, events, u)
}

// merge is Run's loop: it folds child events into the union and offers it
// to u.
func (g *Group) merge(ctx context.Context, events <-chan childEvent, u Updater) error {
	sets := make([][]Address, len(g.children))
	produced := make([]bool, len(g.children)) // the child has sent a set, possibly empty
	reported := make([]bool, len(g.children))
	waiting := len(g.children)
	var (
		last     []Address
		haveLast bool
	)
	for {
		var ev childEvent
		select {
		case <-ctx.Done():
			return nil
		case ev = <-events:
		}
		if !reported[ev.idx] {
			reported[ev.idx] = true
			waiting--
		}
		if ev.state == nil {
			u.ReportError(ev.err)
		} else {
			sets[ev.idx] = ev.state.Addresses
			produced[ev.idx] = true
		}
		if waiting > 0 {
			continue
		}
		if !haveLast && !slices.Contains(produced, true) {
			// Every target has reported, but only with errors: keep
			// waiting for a first set rather than push an empty one
			// (a lone DNS resolver pushes nothing on a failed lookup
			// either). Errors went to ReportError above.
			continue
		}
		union := unionAddresses(sets)
		if haveLast && slices.Equal(union, last) {
			continue
		}
		if err := u.UpdateState(State{Addresses: slices.Clone(union)}); err != nil {
			g.logger.Warn("backend set rejected", "err", err, "backends", len(union))
			continue
		}
		last, haveLast = union, true
	}
}

// unionAddresses merges sets into one sorted set. For an Addr in several
// sets, the first set's entry wins.
func unionAddresses(sets [][]Address) []Address {
	var all []Address
	for _, s := range sets {
		all = append(all, s...)
	}
	return dedupAddresses(all) // stable: the first set's entry is kept
}
