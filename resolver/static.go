package resolver

import (
	"context"
	"errors"
	"fmt"
	"slices"
)

// Static is a [Resolver] for a fixed list of static host:port targets. It
// is immutable after [NewStatic] and safe for concurrent use.
type Static struct {
	addrs []Address // sorted by Addr; never mutated after NewStatic
}

var _ Resolver = (*Static)(nil)

// NewStatic validates targets and returns a resolver that serves them as one
// fixed set. Every target must be a static "host:port" (optionally with
// ";weight=N"); DNS targets are rejected, since [New] handles them. Targets that name the same endpoint, even in different
// spellings, are rejected as duplicates. All problems are reported at once,
// joined with [errors.Join]. NewStatic does no I/O, starts no goroutines and
// does not retain targets.
func NewStatic(targets []string) (*Static, error) {
	if len(targets) == 0 {
		return nil, errors.New("resolver: no targets given")
	}
	var errs []error
	addrs := make([]Address, 0, len(targets))
	seen := make(map[string]string, len(targets)) // canonical addr -> first spelling
	for _, s := range targets {
		t, err := ParseTarget(s)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if !t.IsStatic() {
			errs = append(errs, fmt.Errorf("resolver: target %q: NewStatic takes static host:port targets only; use New for %s:// targets", s, t.Scheme))
			continue
		}
		addr := t.Addr()
		if first, dup := seen[addr]; dup {
			errs = append(errs, fmt.Errorf("resolver: duplicate target %q (already given as %q)", s, first))
			continue
		}
		seen[addr] = s
		addrs = append(addrs, Address{Addr: addr, Weight: t.Weight})
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	sortAddresses(addrs)
	return &Static{addrs: addrs}, nil
}

// State returns the resolver's backend set, sorted by Addr. The caller owns
// the result.
func (s *Static) State() State {
	return State{Addresses: slices.Clone(s.addrs)}
}

// Run pushes the set to u exactly once, then blocks until ctx is done and
// returns nil. If u rejects the set, Run returns that error wrapped at once,
// because a static set will never change into one u accepts. Run may be
// called concurrently with different Updaters.
func (s *Static) Run(ctx context.Context, u Updater) error {
	if err := u.UpdateState(s.State()); err != nil {
		return fmt.Errorf("resolver: static: set of %d backends rejected: %w", len(s.addrs), err)
	}
	<-ctx.Done()
	return nil
}

// ResolveNow does nothing: a static set has nothing to look up again.
func (s *Static) ResolveNow() {}
