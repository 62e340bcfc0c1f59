// Package cluster is streamlb's wiring root: the one place that turns a
// cluster's settings (targets, policy, health checks, limits) into a
// running resolver, director and data plane, and serves them with the
// admin endpoints and a graceful drain. The proxy command, the demo and,
// later, every cluster of the configuration file go through it; nothing
// else builds those three by hand (compare CoreDNS's setup.go and Caddy's
// Provision).
//
// The packages it wires know nothing of each other beyond small seams:
// resolver pushes sets to a resolver.Updater (the director, then the data
// plane's RetainBackends), the proxy asks a proxy.Picker (the director)
// for a backend per stream, and the director asks the resolver to
// ResolveNow when a backend refuses. This package owns the goroutines
// that run them and waits for all of them.
package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/resolver"
)

// Config configures one cluster: where its backends come from and how
// streams are spread over them.
type Config struct {
	// Name names the cluster in logs; "" means "default".
	Name string
	// Targets are the backend targets, as resolver.New takes them:
	// HOST:PORT[;weight=N], dns:///NAME:PORT, dns://DNSHOST:DNSPORT/NAME:PORT,
	// dns+srv:///NAME, etcd://HOST:PORT[,...]/PREFIX or
	// zk://HOST:PORT[,...]/PATH. At least one is
	// required.
	Targets []string
	// DNSRefresh is how often DNS targets are resolved again; 0 means
	// resolver.DefaultRefresh.
	DNSRefresh time.Duration
	// DNSRespectTTL re-resolves DNS targets when their records' TTL runs
	// out instead of every DNSRefresh.
	DNSRespectTTL bool
	// Etcd configures etcd:// targets (TLS, authentication); its Logger
	// defaults to Logger.
	Etcd resolver.EtcdOptions
	// ZK configures zk:// targets (digest credentials); its Logger
	// defaults to Logger.
	ZK resolver.ZKOptions
	// Director configures the policy, health checks and outlier ejection.
	// Its Logger and ResolveNow are set by New, and its HealthCredentials
	// too when BackendTLS is set.
	Director director.Config
	// BackendTLS, if set, turns TLS on for the connections to the
	// backends, health checks included; nil means cleartext (h2c).
	BackendTLS *BackendTLS
	// Retry is the cluster's retry policy, for the data plane of a
	// configuration file that pools each cluster's connections apart
	// (see [Cluster.Upstream]); a server of one cluster takes its retry
	// policy from ServerConfig.Proxy instead.
	Retry Retry
	// Logger receives the cluster's logs; nil means slog.Default().
	Logger *slog.Logger
	// Metrics, if set, gets the cluster's Prometheus metrics (see
	// metrics.go); nil means none are kept.
	Metrics prometheus.Registerer

	// from, if set, is the cluster this one replaces on a reload, with
	// equal BackendTLS and Retry: its backend TLS and Upstream are reused,
	// so the replacement keeps the data plane's connections.
	from *Cluster
	// prev, if set, is the running cluster this one replaces on a reload,
	// whatever changed: its director's verdicts on the backends both
	// have, health and, if prevEjections (the backend TLS is the same),
	// outlier ejections, carry over (director.Director.Inherit).
	prev          *Cluster
	prevEjections bool
}

// Retry is a cluster's retry policy: what proxy.Config's fields of the
// same meaning say (RetryOn, MaxRetries, RetryBudget, RetryBudgetRatio),
// with the same defaults for zero values.
type Retry struct {
	On          []string
	MaxRetries  int
	Budget      int
	BudgetRatio float64
}

// TargetError reports backend targets that [New] could not use, so that
// callers can point at the setting that holds them.
type TargetError struct {
	Cluster string
	Err     error // the resolver's error
}

func (e *TargetError) Error() string {
	return fmt.Sprintf("cluster %s: backend targets: %v", e.Cluster, e.Err)
}

func (e *TargetError) Unwrap() error { return e.Err }

// Cluster is one backend pool: a resolver feeding a director. Create it
// with [New] and run it with [Cluster.Run]. Its methods are safe for
// concurrent use.
type Cluster struct {
	name    string
	res     resolver.Resolver
	dir     *director.Director
	picker  proxy.Picker    // dir, metered if metrics are on
	tls     *backendTLS     // nil: cleartext to backends
	up      *proxy.Upstream // its dial settings and retry policy
	metrics *metrics        // nil if off
	logger  *slog.Logger

	resolvedOnce sync.Once
	resolved     chan struct{} // closed when the first set was accepted
}

// New validates cfg and builds the cluster's resolver and director. It
// does no I/O and starts nothing.
func New(cfg Config) (*Cluster, error) {
	if cfg.Name == "" {
		cfg.Name = "default"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if len(cfg.Targets) == 0 {
		return nil, errors.New("cluster: no backend target")
	}
	var c *Cluster // set below, before anything runs; OnLookup reads it
	res, err := resolver.New(cfg.Targets, resolver.DNSOptions{
		Refresh:    cfg.DNSRefresh,
		RespectTTL: cfg.DNSRespectTTL,
		Logger:     cfg.Logger,
		Etcd:       cfg.Etcd,
		ZK:         cfg.ZK,
		OnLookup: func(_ string, err error) {
			if c.metrics != nil {
				c.metrics.lookup(err)
			}
		},
	})
	if err != nil {
		return nil, &TargetError{Cluster: cfg.Name, Err: err}
	}
	warnTargets(cfg)
	btls, up := cfg.from.reusable()
	if up == nil {
		if cfg.BackendTLS != nil {
			if btls, err = newBackendTLS(*cfg.BackendTLS, cfg.Logger); err != nil {
				return nil, fmt.Errorf("cluster %s: %w", cfg.Name, err)
			}
		}
		uc := proxy.UpstreamConfig{
			Name: cfg.Name, RetryOn: cfg.Retry.On, MaxRetries: cfg.Retry.MaxRetries,
			RetryBudget: cfg.Retry.Budget, RetryBudgetRatio: cfg.Retry.BudgetRatio,
		}
		if btls != nil {
			uc.Dial = btls.dial
		}
		if up, err = proxy.NewUpstream(uc); err != nil {
			return nil, fmt.Errorf("cluster %s: %w", cfg.Name, err)
		}
	}
	dc := cfg.Director
	if btls != nil {
		dc.HealthCredentials = btls.credentials()
	}
	dc.Logger = cfg.Logger
	dc.ResolveNow = res.ResolveNow
	dir, err := director.New(dc)
	if err != nil {
		return nil, fmt.Errorf("cluster %s: %w", cfg.Name, err)
	}
	if cfg.prev != nil {
		dir.Inherit(cfg.prev.dir, cfg.prevEjections)
	}
	c = &Cluster{
		name:     cfg.Name,
		res:      res,
		dir:      dir,
		picker:   dir,
		tls:      btls,
		up:       up,
		logger:   cfg.Logger,
		resolved: make(chan struct{}),
	}
	if cfg.Metrics != nil {
		if c.metrics, err = newMetrics(cfg.Metrics, cfg.Name, c); err != nil {
			return nil, err
		}
		c.picker = &meteredPicker{next: dir, m: c.metrics}
	}
	return c, nil
}

// reusable returns what a successor of c with the same backend TLS and
// retry settings takes over; nothing when c is nil.
func (c *Cluster) reusable() (*backendTLS, *proxy.Upstream) {
	if c == nil {
		return nil, nil
	}
	return c.tls, c.up
}

// Upstream returns the cluster's dial settings (backend TLS) and retry
// policy, as the data plane of a configuration file takes them with each
// pick (see proxy.UpstreamPicker).
func (c *Cluster) Upstream() *proxy.Upstream { return c.up }

// Picker returns what a data plane asks for every stream's backend: the
// director, counted in the metrics if they are on.
func (c *Cluster) Picker() proxy.Picker { return c.picker }

// Name returns the cluster's name.
func (c *Cluster) Name() string { return c.name }

// Director returns the cluster's director: the Picker a data plane asks
// for every stream's backend.
func (c *Cluster) Director() *director.Director { return c.dir }

// Ready reports whether a stream picked now would go to a healthy backend;
// see [director.Director.Ready].
func (c *Cluster) Ready() bool { return c.dir.Ready() }

// Backends returns the director's per-backend state; see
// [director.Director.Backends].
func (c *Cluster) Backends() []director.BackendStats { return c.dir.Backends() }

// Resolved returns a channel that is closed once the first backend set has
// been accepted.
func (c *Cluster) Resolved() <-chan struct{} { return c.resolved }

// Run resolves the targets and runs the director (ejections, health
// checks) until ctx is cancelled, then returns nil once both have stopped.
// Every accepted set goes to the director and then to each of retain, in
// order: a data plane's RetainBackends drains the connections of backends
// that left. It blocks; the caller decides whether to run it in a
// goroutine. It returns an error if the resolver cannot go on.
func (c *Cluster) Run(ctx context.Context, retain ...func(addrs []string)) error {
	// Metrics first: a backend is current there before the director can
	// pick it.
	var us []resolver.Updater
	if c.metrics != nil {
		us = append(us, c.metrics)
	}
	us = append(us, c.dir)
	for _, r := range retain {
		us = append(us, resolver.AddrsFunc(r))
	}
	us = append(us, resolver.AddrsFunc(func([]string) {
		c.resolvedOnce.Do(func() { close(c.resolved) })
	}))
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		if err := c.res.Run(gctx, resolver.Tee(us...)); err != nil {
			return fmt.Errorf("cluster %s: resolve backends: %w", c.name, err)
		}
		return nil
	})
	g.Go(func() error { return c.dir.Run(gctx) })
	return g.Wait()
}

// warnTargets logs, at startup, target settings that are accepted but do
// not do what their author likely meant.
func warnTargets(cfg Config) {
	policy := cfg.Director.Policy
	if policy == "" {
		policy = director.RoundRobin
	}
	usesWeights := policy == director.WeightedRoundRobin || policy == director.RingHash
	for _, s := range cfg.Targets {
		t, err := resolver.ParseTarget(s)
		if err != nil || !t.IsStatic() {
			continue
		}
		if t.Weight != 0 && !usesWeights {
			cfg.Logger.Warn("target weight ignored: the policy does not use weights; use weighted_round_robin or ring_hash",
				"cluster", cfg.Name, "target", s, "policy", policy)
		}
		if _, err := netip.ParseAddr(t.Host); err != nil && t.Host != "localhost" {
			// A host name is looked up at each connection; behind it is
			// usually an ordinary (ClusterIP) Service, one virtual
			// address that pins each backend connection to one pod.
			cfg.Logger.Warn("target is a host name, dialed as one backend: if it is a Kubernetes ClusterIP Service, each backend connection is pinned to one pod; "+
				"give a headless service as dns:///NAME:PORT so streamlb balances over its pods",
				"cluster", cfg.Name, "target", s, "instead", "dns:///"+t.Addr())
		}
	}
}
