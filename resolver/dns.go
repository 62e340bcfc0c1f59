package resolver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Defaults of [DNSOptions].
const (
	// DefaultRefresh is how often a DNS target is re-resolved, Envoy's
	// default dns_refresh_rate.
	DefaultRefresh = 5 * time.Second
	// MinRefresh is the shortest Refresh and MinTTL, Envoy's floor on
	// dns_refresh_rate.
	MinRefresh = time.Millisecond
	// DefaultJitter spreads refreshes by ±10% so that a fleet of proxies
	// started together does not query in lockstep.
	DefaultJitter = 0.1
	// DefaultMinTTL and DefaultMaxTTL bound the wait when RespectTTL is
	// set.
	DefaultMinTTL = time.Second
	DefaultMaxTTL = 5 * time.Minute
	// DefaultMinResolveNowInterval rate-limits early re-resolution.
	DefaultMinResolveNowInterval = time.Second
	// DefaultBackoffInitial and DefaultBackoffMax bound the exponential
	// backoff after failed lookups.
	DefaultBackoffInitial = time.Second
	DefaultBackoffMax     = 30 * time.Second
	// DefaultQueryTimeout bounds one DNS query.
	DefaultQueryTimeout = defaultQueryTimeout
	// LookupTimeoutQueries is the default LookupTimeout in query
	// timeouts. Without a bound on the whole, a server answering each of
	// thousands of SRV targets just inside the query timeout held one
	// lookup, and the set with it, for minutes.
	LookupTimeoutQueries = 8
	// MaxAddresses bounds the set one DNS target may resolve to. An SRV
	// answer multiplies: each record's port with each address of its
	// target, so two answers of under 64 KiB (1,000 records on their own
	// ports naming one target with 1,000 A records) would make a set of a
	// million backends. A larger answer fails the lookup, which keeps the
	// last set. A and AAAA answers alone stay far below it (a 64 KiB TCP
	// answer holds about 4,000 A records).
	MaxAddresses = 10000
)

// resolvConfPath is where the system resolver's configuration lives.
const resolvConfPath = "/etc/resolv.conf"

// DNSOptions configures [DNS] resolvers, and through [New] and
// [NewBuilder] every DNS target. The zero value means all defaults.
type DNSOptions struct {
	// Refresh is the interval between lookups while they succeed. Zero
	// means DefaultRefresh.
	Refresh time.Duration
	// Jitter randomises each wait by up to ±Jitter of it: a wait d becomes
	// a uniform value in [d·(1-Jitter), d·(1+Jitter)). It must be below 1.
	// Zero means DefaultJitter; a negative value disables jitter.
	Jitter float64
	// RespectTTL replaces Refresh with the smallest TTL of the answer,
	// bounded to [MinTTL, MaxTTL]. Answers without TTL (IP literals,
	// /etc/hosts) still use Refresh.
	RespectTTL bool
	// MinTTL and MaxTTL bound TTL-driven waits. Zero means DefaultMinTTL
	// and DefaultMaxTTL.
	MinTTL, MaxTTL time.Duration
	// MinResolveNowInterval is the least time between the start of one
	// lookup and an early lookup triggered by ResolveNow. Zero means
	// DefaultMinResolveNowInterval.
	MinResolveNowInterval time.Duration
	// BackoffInitial is the wait after the first failed lookup; each
	// further consecutive failure doubles it, up to BackoffMax. Zero means
	// DefaultBackoffInitial and DefaultBackoffMax.
	BackoffInitial, BackoffMax time.Duration
	// QueryTimeout bounds one DNS query; a lookup makes a few attempts.
	// Zero means DefaultQueryTimeout.
	QueryTimeout time.Duration
	// LookupTimeout bounds one lookup as a whole: an SRV answer's targets
	// (looked up 16 at a time), a CNAME chain, the servers tried in turn.
	// Past it the lookup fails and the last set is kept. Zero means
	// LookupTimeoutQueries times QueryTimeout (16 s by default).
	LookupTimeout time.Duration

	// Logger receives the resolver's logs, with component=resolver added.
	// Nil means slog.Default().
	Logger *slog.Logger

	// OnLookup, if set, is called after every DNS lookup with the target
	// and the lookup's error (nil on success), for metrics. It is called
	// from Run's goroutine and must not block.
	OnLookup func(target string, err error)

	// Etcd configures the etcd targets [New] builds. Its Logger,
	// BackoffInitial and BackoffMax, when unset, are taken from these
	// options.
	Etcd EtcdOptions

	// ZK configures the zk targets [New] builds, with the same defaults
	// taken from these options as Etcd.
	ZK ZKOptions

	// Now, After and Rand replace the clock and randomness, for tests. Now
	// has the contract of time.Now and After of time.After; Rand.Float64
	// returns a value in [0, 1). They are called from Run's goroutine and,
	// for Now, from ResolveNow's callers. Nil means the real ones.
	Now   func() time.Time
	After func(time.Duration) <-chan time.Time
	Rand  interface{ Float64() float64 }
}

// withDefaults validates o and fills in defaults.
func (o DNSOptions) withDefaults() (DNSOptions, error) {
	var errs []error
	for _, d := range []struct {
		name string
		p    *time.Duration
		def  time.Duration
	}{
		{"Refresh", &o.Refresh, DefaultRefresh},
		{"MinTTL", &o.MinTTL, DefaultMinTTL},
		{"MaxTTL", &o.MaxTTL, DefaultMaxTTL},
		{"MinResolveNowInterval", &o.MinResolveNowInterval, DefaultMinResolveNowInterval},
		{"BackoffInitial", &o.BackoffInitial, DefaultBackoffInitial},
		{"BackoffMax", &o.BackoffMax, DefaultBackoffMax},
		{"QueryTimeout", &o.QueryTimeout, DefaultQueryTimeout},
		{"LookupTimeout", &o.LookupTimeout, 0}, // below, from QueryTimeout
	} {
		switch {
		case *d.p < 0:
			errs = append(errs, fmt.Errorf("resolver: options: negative %s %v", d.name, *d.p))
		case *d.p == 0:
			*d.p = d.def
		}
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"Refresh", o.Refresh}, {"MinTTL", o.MinTTL}} {
		if d.v > 0 && d.v < MinRefresh {
			// 1ns meant a lookup as soon as the last one ended: a DNS
			// server flooded by one cluster, for a typo of 1s.
			errs = append(errs, fmt.Errorf("resolver: options: %s %v under the minimum %v", d.name, d.v, MinRefresh))
		}
	}
	if o.LookupTimeout == 0 {
		o.LookupTimeout = LookupTimeoutQueries * o.QueryTimeout
	}
	switch {
	case math.IsNaN(o.Jitter) || o.Jitter >= 1:
		errs = append(errs, fmt.Errorf("resolver: options: Jitter %v not below 1", o.Jitter))
	case o.Jitter == 0:
		o.Jitter = DefaultJitter
	case o.Jitter < 0:
		o.Jitter = 0
	}
	if o.MinTTL > o.MaxTTL {
		errs = append(errs, fmt.Errorf("resolver: options: MinTTL %v above MaxTTL %v", o.MinTTL, o.MaxTTL))
	}
	if o.BackoffInitial > o.BackoffMax {
		errs = append(errs, fmt.Errorf("resolver: options: BackoffInitial %v above BackoffMax %v", o.BackoffInitial, o.BackoffMax))
	}
	if len(errs) > 0 {
		return DNSOptions{}, errors.Join(errs...)
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.After == nil {
		o.After = time.After
	}
	if o.Rand == nil {
		o.Rand = mathRand{}
	}
	return o, nil
}

// mathRand adapts math/rand/v2's concurrency-safe top-level source.
type mathRand struct{}

func (mathRand) Float64() float64 { return rand.Float64() }

// DNS is a [Resolver] that follows one DNS target ("dns:///name:port",
// "dns://server/name:port", "dns+srv:///name" or "dns+srv://server/name")
// by re-resolving it periodically; see the package documentation for its
// semantics. Create it with [NewDNS] and run it with [DNS.Run].
type DNS struct {
	// Immutable after NewDNS.
	target Target
	opts   DNSOptions
	lookup lookuper
	logger *slog.Logger

	// rn is the coalescing "resolve now" trigger: capacity 1, sent to
	// without blocking.
	rn chan struct{}
}

var _ Resolver = (*DNS)(nil)

// NewDNS validates target and opts and returns a resolver for target, which
// must be a DNS target (see [ParseTarget]). With an authority
// ("dns://host:port/...") that server is asked; without one, the system's
// resolver configuration is used: /etc/hosts first, then the servers of
// /etc/resolv.conf with its search list. NewDNS does no I/O and starts no
// goroutines.
func NewDNS(target Target, opts DNSOptions) (*DNS, error) {
	if target.IsStatic() {
		return nil, fmt.Errorf("resolver: target %q is static; NewDNS needs a %s:// or %s:// target", target, SchemeDNS, SchemeDNSSRV)
	}
	if target.Scheme != SchemeDNS && target.Scheme != SchemeDNSSRV {
		return nil, fmt.Errorf("resolver: target %q: unknown scheme %q", target, target.Scheme)
	}
	if target.Host == "" || (target.Scheme == SchemeDNS && target.Port == 0) {
		return nil, fmt.Errorf("resolver: target %q: incomplete; obtain targets from ParseTarget", target)
	}
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	var l lookuper
	if target.Authority != "" {
		l = newDNSClient([]string{target.Authority}, nil, opts.QueryTimeout)
	} else {
		l = newSystemLookuper(resolvConfPath, opts.QueryTimeout)
	}
	return newDNS(target, opts, l), nil
}

// newDNS builds a DNS with validated opts and the given lookuper.
func newDNS(target Target, opts DNSOptions, l lookuper) *DNS {
	return &DNS{
		target: target,
		opts:   opts,
		lookup: l,
		logger: opts.Logger.With("component", "resolver", "target", target.String()),
		rn:     make(chan struct{}, 1),
	}
}

// Target returns the target d follows.
func (d *DNS) Target() Target { return d.target }

// ResolveNow asks Run to re-resolve early, for example because a backend
// connection failed and the set may be stale. It never blocks, and calls
// made while one is pending coalesce into one lookup. Run honours it no
// sooner than MinResolveNowInterval after its previous lookup started, and
// not while backing off after failures, so a burst of failing connections
// cannot flood the DNS server. It is safe to call concurrently, and at any
// time, also when Run is not running.
func (d *DNS) ResolveNow() {
	select {
	case d.rn <- struct{}{}:
	default:
	}
}

// Run resolves the target, pushes the set to u, and re-resolves until ctx
// is cancelled, when it returns nil; it never returns another error. It
// blocks, and the caller decides whether to run it on its own goroutine.
// Run must not be called concurrently with itself.
//
// u.UpdateState is called with the first answer and then only when the
// sorted set of addresses and weights changes. A failed lookup calls
// u.ReportError and keeps the last set; an authoritative empty answer
// pushes an empty set. If u rejects a set, Run logs it and offers the set
// again after the next lookup.
func (d *DNS) Run(ctx context.Context, u Updater) error {
	var (
		last     []Address // the last set u accepted
		haveLast bool
		failures int // consecutive failed lookups
	)
	for {
		// A pending ResolveNow is satisfied by the lookup about to start.
		select {
		case <-d.rn:
		default:
		}
		started := d.opts.Now()
		lctx, cancel := context.WithTimeout(ctx, d.opts.LookupTimeout)
		addrs, ttl, err := d.resolve(lctx)
		if ctx.Err() != nil {
			cancel()
			return nil
		}
		// The bound passed: the context says so, or, if a query's own
		// deadline (taken from it) fired before the context's timer did,
		// the clock does.
		if deadline, _ := lctx.Deadline(); err != nil && (errors.Is(lctx.Err(), context.DeadlineExceeded) || !time.Now().Before(deadline)) {
			err = fmt.Errorf("%w (the lookup took longer than its bound, %v)", err, d.opts.LookupTimeout)
		}
		cancel()
		if d.opts.OnLookup != nil {
			d.opts.OnLookup(d.target.String(), err)
		}

		var wait time.Duration
		if err != nil {
			failures++
			d.logger.Warn("resolution failed; keeping last set", "err", err, "backends", len(last), "failures", failures)
			u.ReportError(err)
			wait = d.backoff(failures)
		} else {
			if failures > 0 {
				d.logger.Info("resolution recovered", "failures", failures)
			}
			failures = 0
			if !haveLast || !slices.Equal(addrs, last) {
				if d.push(u, last, addrs) {
					last, haveLast = addrs, true
				}
			}
			wait = d.refresh(ttl)
		}

		// ResolveNow is not honoured while backing off: the failing
		// server gets the backoff's rest, and the trigger stays pending
		// until the next lookup.
		var rn <-chan struct{}
		if failures == 0 {
			rn = d.rn
		}
		select {
		case <-ctx.Done():
			return nil
		case <-d.opts.After(d.jitter(wait)):
		case <-rn:
			if early := d.opts.MinResolveNowInterval - d.opts.Now().Sub(started); early > 0 {
				select {
				case <-ctx.Done():
					return nil
				case <-d.opts.After(early):
				}
			}
		}
	}
}

// push offers addrs to u and reports whether u accepted the set. The
// change is logged once, by the Updater that applies it (the director logs
// every backend added and removed, and an empty set as a warning); here
// only at Debug, with the target that changed.
func (d *DNS) push(u Updater, last, addrs []Address) bool {
	if err := u.UpdateState(State{Addresses: slices.Clone(addrs)}); err != nil {
		d.logger.Warn("backend set rejected", "err", err, "backends", len(addrs))
		return false
	}
	if d.logger.Enabled(context.Background(), slog.LevelDebug) {
		added, removed := diffAddresses(last, addrs)
		d.logger.Debug("backend set changed", "added", added, "removed", removed, "backends", len(addrs))
	}
	return true
}

// resolve looks up the target once and returns its set, sorted and without
// duplicates, with the answer's TTL.
func (d *DNS) resolve(ctx context.Context) ([]Address, time.Duration, error) {
	if d.target.Scheme == SchemeDNSSRV {
		recs, ttl, err := d.lookup.lookupSRV(ctx, d.target.Host)
		if err != nil {
			return nil, 0, fmt.Errorf("resolver: %s: %w", d.target, err)
		}
		addrs, err := srvAddresses(recs)
		if err != nil {
			return nil, 0, fmt.Errorf("resolver: %s: %w", d.target, err)
		}
		var dropped []netip.Addr
		for _, r := range recs {
			dropped = append(dropped, r.dropped...)
		}
		d.warnDropped(dropped)
		return addrs, ttl, nil
	}
	// An IP literal needs no lookup, as in grpc-go's DNS resolver.
	if _, err := netip.ParseAddr(d.target.Host); err == nil {
		return []Address{{Addr: d.target.Addr()}}, noTTL, nil
	}
	ips, ttl, err := d.lookup.lookupHost(ctx, d.target.Host)
	if err != nil {
		return nil, 0, fmt.Errorf("resolver: %s: %w", d.target, err)
	}
	ips, dropped := usableAddrs(ips)
	d.warnDropped(dropped)
	if len(ips) > MaxAddresses {
		return nil, 0, fmt.Errorf("resolver: %s: %d addresses, over the limit of %d", d.target, len(ips), MaxAddresses)
	}
	port := strconv.FormatUint(uint64(d.target.Port), 10)
	addrs := make([]Address, 0, len(ips))
	for _, ip := range ips {
		addrs = append(addrs, Address{Addr: net.JoinHostPort(ip.String(), port)})
	}
	return dedupAddresses(addrs), ttl, nil
}

// warnDropped logs the addresses an answer gave that no backend can have
// (see usableAddrs), which the set leaves out.
func (d *DNS) warnDropped(dropped []netip.Addr) {
	if len(dropped) == 0 {
		return
	}
	shown := dropped[:min(len(dropped), 8)]
	d.logger.Warn("skipping unspecified, multicast or broadcast addresses in the answer", "addrs", shown, "count", len(dropped))
}

// srvAddresses turns SRV records into a set: one address per target address
// and port, for the lowest priority that has addresses only (see
// firstUsableGroup), weighted by the record's weight. RFC 2782 weight 0
// means "rarely chosen" among heavier targets; as a relative weight it
// becomes 1, so such a target still gets traffic. A group of more than
// MaxAddresses addresses (counted before duplicates are dropped) is an
// error, found before the set is built.
func srvAddresses(recs []srvRecord) ([]Address, error) {
	for _, group := range priorityGroups(recs) {
		n := 0
		for _, r := range group {
			n += len(r.addrs)
		}
		if n > MaxAddresses {
			return nil, fmt.Errorf("%d SRV records of priority %d give %d addresses, over the limit of %d", len(group), group[0].priority, n, MaxAddresses)
		}
		var addrs []Address
		for _, r := range group {
			w := uint32(max(r.weight, 1))
			port := strconv.FormatUint(uint64(r.port), 10)
			for _, ip := range r.addrs {
				addrs = append(addrs, Address{Addr: net.JoinHostPort(ip.String(), port), Weight: w})
			}
		}
		if len(addrs) > 0 {
			return dedupAddresses(addrs), nil
		}
	}
	return []Address{}, nil
}

// dedupAddresses sorts addrs by Addr and drops later duplicates of an Addr.
func dedupAddresses(addrs []Address) []Address {
	slices.SortStableFunc(addrs, func(a, b Address) int { return strings.Compare(a.Addr, b.Addr) })
	return slices.CompactFunc(addrs, func(a, b Address) bool { return a.Addr == b.Addr })
}

// refresh returns the wait after a successful lookup whose answer had ttl.
func (d *DNS) refresh(ttl time.Duration) time.Duration {
	if !d.opts.RespectTTL || ttl == noTTL {
		return d.opts.Refresh
	}
	return min(max(ttl, d.opts.MinTTL), d.opts.MaxTTL)
}

// backoff returns the wait after the given number of consecutive failures
// (at least 1): BackoffInitial doubled per further failure, capped at
// BackoffMax.
func (d *DNS) backoff(failures int) time.Duration {
	b := d.opts.BackoffInitial
	for i := 1; i < failures && b < d.opts.BackoffMax; i++ {
		b *= 2
	}
	return min(b, d.opts.BackoffMax)
}

// jitter spreads wait uniformly over [wait·(1-J), wait·(1+J)).
func (d *DNS) jitter(wait time.Duration) time.Duration {
	if d.opts.Jitter == 0 {
		return wait
	}
	f := 1 + d.opts.Jitter*(2*d.opts.Rand.Float64()-1)
	return time.Duration(float64(wait) * f)
}

// diffAddresses returns the addresses of next not in prev (added) and of
// prev not in next (removed), rendered as static targets ("host:port" with
// ";weight=N" when weighted), so a weight change shows as both.
//
// It takes time linear in the sets' sizes: with slices.Contains per
// address it was O(N·M), and a registry of 3,000 keys written one by one
// took 20 s to follow at Debug instead of 1.2 s.
func diffAddresses(prev, next []Address) (added, removed []string) {
	inPrev := make(map[Address]struct{}, len(prev))
	for _, a := range prev {
		inPrev[a] = struct{}{}
	}
	inNext := make(map[Address]struct{}, len(next))
	for _, a := range next {
		inNext[a] = struct{}{}
		if _, ok := inPrev[a]; !ok {
			added = append(added, addressString(a))
		}
	}
	for _, a := range prev {
		if _, ok := inNext[a]; !ok {
			removed = append(removed, addressString(a))
		}
	}
	return added, removed
}

func addressString(a Address) string {
	if a.Weight == 0 {
		return a.Addr
	}
	return a.Addr + ";weight=" + strconv.FormatUint(uint64(a.Weight), 10)
}
