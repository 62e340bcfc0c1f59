package resolver

import (
	"cmp"
	"context"
	"slices"
)

// Address is one backend endpoint in a [State].
type Address struct {
	// Addr is the backend's "host:port". Hosts are IP literals or host
	// names; IPv6 literals are enclosed in brackets, as net.JoinHostPort
	// writes them.
	Addr string
	// Weight is the backend's relative weight for weighted policies. 0 means
	// the default weight, 1.
	Weight uint32
}

// State is a complete backend set, as produced by a [Resolver]. Each push
// replaces the previous set; it is not a delta.
type State struct {
	// Addresses are the backends, sorted by Addr, without duplicates.
	Addresses []Address
}

// Updater receives backend sets from a [Resolver]. It is implemented by the
// component that consumes the set (the director).
//
// A Resolver calls the methods of one Updater from one goroutine at a time,
// only while its Run is executing, so an Updater sees a single ordered
// sequence of calls per Resolver.
type Updater interface {
	// UpdateState replaces the backend set. The Updater owns the State and
	// its slice after the call. A non-nil error means the Updater rejected
	// the set and kept the previous one.
	UpdateState(State) error
	// ReportError tells the Updater that resolution failed. The Updater
	// should keep the last set it accepted.
	ReportError(error)
}

// Resolver produces backend sets for a fixed list of targets.
type Resolver interface {
	// Run pushes backend sets to u until ctx is done. It blocks, and returns
	// nil once ctx is cancelled. A non-nil error means the resolver cannot
	// continue. The caller decides whether to run it on its own goroutine.
	Run(ctx context.Context, u Updater) error
	// ResolveNow asks Run to look the targets up again early, for example
	// because a backend refused a connection and the set may be stale. It
	// never blocks, coalesces, may be rate-limited, and is safe to call
	// concurrently and when Run is not running. A resolver with nothing to
	// look up ignores it.
	ResolveNow()
}

// sortAddresses sorts as by Addr in place, so that sets compare equal
// regardless of the order in which they were discovered.
func sortAddresses(as []Address) {
	slices.SortFunc(as, func(a, b Address) int { return cmp.Compare(a.Addr, b.Addr) })
}

// Tee returns an Updater that hands every state and error to each of us,
// in order. UpdateState stops at, and returns, the first error, so a
// state the first updater rejects goes no further. main uses it to give
// each set to the director and then to the data plane, which drains the
// backends that left.
func Tee(us ...Updater) Updater { return tee(us) }

type tee []Updater

func (t tee) UpdateState(s State) error {
	for _, u := range t {
		if err := u.UpdateState(s); err != nil {
			return err
		}
	}
	return nil
}

func (t tee) ReportError(err error) {
	for _, u := range t {
		u.ReportError(err)
	}
}

// AddrsFunc adapts a function of the backend addresses to an Updater, for
// consumers that need only the addresses (proxy.Server.RetainBackends).
// Errors are not passed on.
type AddrsFunc func(addrs []string)

// UpdateState calls f with the addresses of s, in order.
func (f AddrsFunc) UpdateState(s State) error {
	addrs := make([]string, len(s.Addresses))
	for i, a := range s.Addresses {
		addrs[i] = a.Addr
	}
	f(addrs)
	return nil
}

// ReportError does nothing.
func (AddrsFunc) ReportError(error) {}
