package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"reflect"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/streamlb/streamlb/internal/fileread"
	"github.com/streamlb/streamlb/proxy"
)

// DefaultPollInterval is how often a server started from a configuration
// file looks at the file for changes.
const DefaultPollInterval = time.Second

// clusterSet runs the clusters of a configuration file behind one router,
// and reloads them: on SIGHUP, when the file changes, or on request.
//
// A reload builds the clusters whose settings changed (or are new) while
// the running ones go on serving, starts them and waits (up to the
// warm-up) for their first backend set, then swaps the route table in one
// atomic store and only then stops the clusters no longer used. Clusters
// whose settings are unchanged are kept as they are: resolver, director,
// health and ejection state, connections. Calls in flight on a stopped
// cluster run to their end: their done funcs only touch the old
// director's atomics, and the connections of its Upstream, unless a
// successor took that over, are retired (drainUpstream): they take no new
// call and close after their last one, with no drain timeout. Only those
// to a backend that then leaves the set of the cluster that replaced it
// (a cluster of the same name, with other dial or retry settings) are
// bounded by it, like any cluster's to a backend that left. A file that
// does not parse or check, or that a reload cannot apply, is rejected
// with a logged error and the running configuration stays.
type clusterSet struct {
	router    router
	logger    *slog.Logger           // component=config
	base      *slog.Logger           // the server's, for the clusters
	metrics   prometheus.Registerer  // nil: metrics off
	limited   *prometheus.CounterVec // nil: metrics off
	headers   []string               // what the data plane hands Pick; nil: all
	warmup    time.Duration
	pollEvery time.Duration
	signals   <-chan os.Signal
	now       func() time.Time
	reqs      chan chan error // Reload requests, served by Run's goroutine
	resolved  chan struct{}   // closed when the first clusters have a set

	boot *File // the file the server started with: restart-only settings

	// Owned by Run's goroutine once Run has started (by NewServer before).
	file *File
	seen []byte // the last contents of the file read
	// changed is the file's new contents as the poll last read them,
	// when they differ from seen: they are applied only once the next
	// look reads them unchanged, so that a file being written in place
	// is not taken half-written (hasChanged tells an empty file from
	// none).
	changed    []byte
	hasChanged bool
	// rejectedAt is when the contents in seen were last tried and
	// refused (zero: they were applied); rejectedErr is why. The poll
	// tries them again every retryRejected while they stay.
	rejectedAt  time.Time
	rejectedErr string
	entries     map[string]*entry

	// mu guards live and each entry's addrs. It is held across the calls
	// to retain and retainUpstream, on purpose: that orders the calls, so
	// the data plane never sees an older set after a newer one; they (the
	// data plane's RetainBackends, RetainUpstreamBackends) call nothing of
	// ours.
	mu     sync.Mutex
	live   map[*entry]bool
	retain func(addrs []string)

	// drainUpstream, if set (the frame engine's DrainUpstream), retires
	// the Upstream of a stopped cluster that no running cluster took over,
	// so that its connections close after their last call;
	// retainUpstream (RetainUpstreamBackends) drains, within the drain
	// timeout, those of a cluster's Upstream, and of its predecessors'
	// (entry.prev), to backends that left its set. Set before Run.
	drainUpstream  func(*proxy.Upstream)
	retainUpstream func(*proxy.Upstream, []string)
	// retireBackends, if set (the grpc-proxy engine's RetireBackends,
	// which pools connections by address alone), takes the connections
	// of a removed cluster's backends that no running cluster lists out
	// of use without a drain timeout, as drainUpstream does the frame
	// engine's: retain would bound them. Set before Run.
	retireBackends func(addrs []string)
}

// entry is one running cluster.
type entry struct {
	spec    fileCluster
	tls     *fileBackendTL // its backend TLS, its own or the file's
	retry   Retry          // its retry policy, its own fields or proxy's
	c       *Cluster
	reg     *laterRegisterer // nil: metrics off
	cancel  context.CancelFunc
	stopped chan struct{} // closed when its Run has returned
	addrs   []string      // its current backend set; guarded by clusterSet.mu
	// prev holds the retired Upstreams of the clusters of the same name
	// that e replaced, and that they replaced, newest last (at most
	// maxRetiredGenerations), whose connections may still carry calls:
	// setAddrs bounds those to backends that left e's set. Guarded by
	// clusterSet.mu.
	prev []*proxy.Upstream
}

// maxRetiredGenerations bounds how many retired Upstreams of one cluster
// name follow its set (entry.prev). An older one, pushed out by a further
// reload, has its remaining connections drained within the drain timeout
// at once, as if every backend had left its set: reloads in a loop cannot
// keep connections of a departed backend, or the Upstreams, forever.
const maxRetiredGenerations = 8

// newClusterSet builds the clusters and the route table of f. It starts
// nothing.
func newClusterSet(f *File, logger *slog.Logger, reg prometheus.Registerer, headers []string, warmup time.Duration, signals <-chan os.Signal) (*clusterSet, error) {
	s := &clusterSet{
		logger:    logger.With("component", "config"),
		base:      logger,
		metrics:   reg,
		headers:   headers,
		warmup:    warmup,
		pollEvery: DefaultPollInterval,
		signals:   signals,
		now:       time.Now,
		reqs:      make(chan chan error),
		resolved:  make(chan struct{}),
		boot:      f,
		file:      f,
		seen:      f.raw,
		entries:   map[string]*entry{},
		live:      map[*entry]bool{},
	}
	if reg != nil {
		s.limited = prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "streamlb_route_rate_limited_total", Help: "Calls a route's rate limit failed with RESOURCE_EXHAUSTED.",
		}, []string{"route"})
		if err := reg.Register(s.limited); err != nil {
			return nil, fmt.Errorf("cluster: metrics: %w", err)
		}
	}
	for _, fc := range f.Clusters {
		e, err := s.newEntry(f, fc, nil)
		if err != nil {
			return nil, err
		}
		s.entries[fc.Name] = e
		if e.reg != nil {
			if err := e.reg.commit(); err != nil {
				return nil, fmt.Errorf("cluster %s: metrics: %w", fc.Name, err)
			}
		}
	}
	s.router.table.Store(buildTable(f, s.clusters(s.entries), nil, s.limited, s.now))
	return s, nil
}

// newEntry builds cluster fc of f. old, if not nil, is the running
// cluster of that name: if its backend TLS and retry policy are fc's, the
// new cluster takes over its Upstream, and so its connections.
func (s *clusterSet) newEntry(f *File, fc fileCluster, old *entry) (*entry, error) {
	cfg := f.clusterConfig(fc)
	cfg.Logger = s.base.With("cluster", fc.Name) // its parts name their own component
	e := &entry{spec: fc, tls: f.backendTLSOf(fc), retry: f.retryOf(fc)}
	if old != nil && old.sameUpstream(e) {
		cfg.from = old.c
	}
	if old != nil {
		// Backends known to fail stay out of the picks: a reload of
		// another setting is no reason to send them calls again. An
		// ejection, for failures the dial settings may have caused,
		// only while those stay the same.
		cfg.prev, cfg.prevEjections = old.c, reflect.DeepEqual(e.tls, old.tls)
	}
	if s.metrics != nil {
		e.reg = &laterRegisterer{reg: s.metrics}
		cfg.Metrics = e.reg
	}
	c, err := New(cfg)
	if err != nil {
		return nil, err
	}
	e.c = c
	return e, nil
}

// sameUpstream reports whether e and o dial and retry alike.
func (e *entry) sameUpstream(o *entry) bool {
	return reflect.DeepEqual(e.tls, o.tls) && reflect.DeepEqual(e.retry, o.retry)
}

func (s *clusterSet) clusters(es map[string]*entry) map[string]*Cluster {
	m := make(map[string]*Cluster, len(es))
	for name, e := range es {
		m[name] = e.c
	}
	return m
}

// Run runs the clusters and watches for reloads until ctx is cancelled,
// then stops every cluster and returns nil; or returns the error of a
// cluster whose resolver cannot go on. retain gets the union of all
// running clusters' backend sets whenever one changes.
func (s *clusterSet) Run(ctx context.Context, retain func(addrs []string)) error {
	s.mu.Lock()
	s.retain = retain
	s.mu.Unlock()
	g, gctx := errgroup.WithContext(ctx)
	first := make([]*entry, 0, len(s.entries))
	for _, e := range s.entries {
		s.start(g, gctx, e)
		first = append(first, e)
	}
	g.Go(func() error {
		if s.waitResolved(gctx, first, nil) {
			close(s.resolved)
		}
		return nil
	})
	g.Go(func() error { return s.watch(gctx, g) })
	return g.Wait()
}

// start runs e's cluster in g until ctx ends or e.cancel is called.
func (s *clusterSet) start(g *errgroup.Group, ctx context.Context, e *entry) {
	cctx, cancel := context.WithCancel(ctx)
	e.cancel = cancel
	e.stopped = make(chan struct{})
	g.Go(func() error {
		defer close(e.stopped)
		return e.c.Run(cctx, func(addrs []string) { s.setAddrs(e, addrs) })
	})
}

// setAddrs records e's backend set and hands the union to the data plane.
func (s *clusterSet) setAddrs(e *entry, addrs []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e.addrs = slices.Clone(addrs)
	s.live[e] = true
	s.retainLocked()
	if s.retainUpstream != nil {
		s.retainUpstream(e.c.up, e.addrs)
		for _, up := range e.prev {
			s.retainUpstream(up, e.addrs)
		}
	}
}

// succeed records, once old is stopped and its Upstream retired, that
// next (nil: none) is the cluster that replaced it: the connections of the
// retired Upstream, and of old's own predecessors, to backends not in
// next's set drain within the drain timeout, now if next has a set and on
// each new one. A successor that took over old's Upstream inherits old's
// predecessors only. Past maxRetiredGenerations, the oldest is bounded
// as if its every backend had left.
func (s *clusterSet) succeed(old, next *entry) {
	if next == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	next.prev = slices.Clone(old.prev)
	if next.c.up == old.c.up {
		return
	}
	next.prev = append(next.prev, old.c.up)
	if n := len(next.prev) - maxRetiredGenerations; n > 0 {
		if s.retainUpstream != nil {
			for _, up := range next.prev[:n] {
				s.retainUpstream(up, nil)
			}
		}
		next.prev = slices.Delete(next.prev, 0, n)
	}
	if s.live[next] && s.retainUpstream != nil {
		for _, up := range next.prev {
			s.retainUpstream(up, next.addrs)
		}
	}
}

// retire hands retireBackends the backends of e, a stopped cluster that
// no cluster of its name replaced, that no other running cluster lists:
// their calls in flight run to their end, however long, before drop's
// retain would bound them by the drain timeout.
func (s *clusterSet) retire(e *entry) {
	if s.retireBackends == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.live[e] {
		return
	}
	kept := map[string]bool{}
	for o := range s.live {
		if o != e {
			for _, a := range o.addrs {
				kept[a] = true
			}
		}
	}
	var gone []string
	for _, a := range e.addrs {
		if !kept[a] {
			gone = append(gone, a)
		}
	}
	if len(gone) > 0 {
		s.retireBackends(gone)
	}
}

// drop forgets a stopped cluster's backends: the data plane drains the
// connections of those no other cluster lists.
func (s *clusterSet) drop(e *entry) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.live, e)
	s.retainLocked()
}

// retainLocked hands the union of the live sets to retain. Caller must
// hold mu.
func (s *clusterSet) retainLocked() {
	if s.retain == nil {
		return
	}
	var union []string
	for e := range s.live {
		union = append(union, e.addrs...)
	}
	slices.Sort(union)
	s.retain(slices.Compact(union))
}

// waitResolved waits until every cluster of es has its first backend set,
// or ctx ends, or timeout fires (nil: never); it reports whether all had.
func (s *clusterSet) waitResolved(ctx context.Context, es []*entry, timeout <-chan time.Time) bool {
	for _, e := range es {
		select {
		case <-e.c.Resolved():
		case <-timeout:
			return false
		case <-ctx.Done():
			return false
		}
	}
	return true
}

// watch serves reloads until ctx ends: SIGHUP, a changed file (polled),
// and Reload requests.
func (s *clusterSet) watch(ctx context.Context, g *errgroup.Group) error {
	var tick <-chan time.Time
	if s.file.Path != "" && s.pollEvery > 0 {
		t := time.NewTicker(s.pollEvery)
		defer t.Stop()
		tick = t.C
	}
	var readErr string // the last read error logged, not to repeat it
	for {
		var why string
		var reply chan error
		select {
		case <-ctx.Done():
			return nil
		case <-tick:
			why = "file changed"
		case <-s.signals:
			why = "SIGHUP"
		case reply = <-s.reqs:
			why = "requested"
		}
		data, err := fileread.Regular(s.file.Path)
		if err != nil {
			if reply != nil {
				reply <- fmt.Errorf("config: %w", err)
			} else if err.Error() != readErr {
				s.logger.Error("configuration file unreadable; the running configuration stays", "err", err)
			}
			readErr = err.Error()
			continue
		}
		readErr = ""
		if reply == nil && why == "file changed" {
			if bytes.Equal(data, s.seen) {
				s.changed, s.hasChanged = nil, false
				if !s.rejectedAt.IsZero() && s.now().Sub(s.rejectedAt) >= retryRejected {
					s.retry(ctx, g, data)
				}
				continue
			}
			if !s.hasChanged || !bytes.Equal(data, s.changed) {
				// Changed since the last look: a writer may still be
				// at it (an editor saving in place, a slow copy), and a
				// truncated file can parse (fewer routes). Wait for a
				// look that finds it as it was.
				s.changed, s.hasChanged = data, true
				continue
			}
		}
		s.changed, s.hasChanged = nil, false
		s.seen = data
		err = s.reload(ctx, g, data, why)
		s.rejectedAt, s.rejectedErr = time.Time{}, ""
		if err != nil {
			s.rejectedAt, s.rejectedErr = s.now(), err.Error()
		}
		if reply != nil {
			reply <- err
		}
	}
}

// retryRejected is how often the poll tries again a file it refused while
// the file stays the same: a reload can fail on something outside the
// file that is put right without touching it, such as a TLS file it names
// that is not there yet (a Kubernetes Secret updated after the ConfigMap
// that names it).
const retryRejected = 10 * time.Second

// retry tries the refused contents data again, logging the outcome only
// if it is not the same refusal as before.
func (s *clusterSet) retry(ctx context.Context, g *errgroup.Group, data []byte) {
	nf, err := loadData(s.file.Path, data)
	if err == nil {
		err = s.apply(ctx, g, nf)
	}
	if err == nil {
		s.rejectedAt, s.rejectedErr = time.Time{}, ""
		return
	}
	s.rejectedAt = s.now()
	if err.Error() != s.rejectedErr {
		s.rejectedErr = err.Error()
		s.logger.Error("configuration rejected; the running configuration stays", "reason", "retry of the refused file", "err", err)
	}
}

// reload parses data and applies it, logging the outcome.
func (s *clusterSet) reload(ctx context.Context, g *errgroup.Group, data []byte, why string) error {
	nf, err := loadData(s.file.Path, data)
	if err == nil {
		err = s.apply(ctx, g, nf)
	}
	if err != nil {
		s.logger.Error("configuration rejected; the running configuration stays", "reason", why, "err", err)
		return err
	}
	return nil
}

// apply makes nf the running configuration; see clusterSet. It runs on
// Run's goroutine.
func (s *clusterSet) apply(ctx context.Context, g *errgroup.Group, nf *File) error {
	if s.headers != nil {
		for _, h := range pickHeaders(nf) {
			if !slices.Contains(s.headers, h) {
				return fmt.Errorf("config: header %q is matched, but the data plane started handing Pick only %q: restart the proxy to route on it", h, s.headers)
			}
		}
	}
	if s.boot.Engine == EngineGRPCProxy {
		// That engine dials every cluster with the backend TLS it was
		// built with (NewServer): a cluster given other settings would
		// be health-checked with them while its calls dial with the old.
		for _, fc := range nf.Clusters {
			if !reflect.DeepEqual(nf.backendTLSOf(fc), s.boot.BackendTLS) {
				return fmt.Errorf("config: cluster %s: backend_tls differs from the one the %s engine started with, which it dials every cluster with: restart the proxy to change it", fc.Name, EngineGRPCProxy)
			}
		}
	}
	next := make(map[string]*entry, len(nf.Clusters))
	var fresh, kept []*entry
	var freshNames, keptNames, goneNames []string
	for _, fc := range nf.Clusters {
		old := s.entries[fc.Name]
		if old != nil && reflect.DeepEqual(old.spec, fc) && old.sameUpstream(&entry{tls: nf.backendTLSOf(fc), retry: nf.retryOf(fc)}) {
			next[fc.Name] = old
			kept = append(kept, old)
			keptNames = append(keptNames, fc.Name)
			continue
		}
		e, err := s.newEntry(nf, fc, old)
		if err != nil {
			return err // nothing was started
		}
		next[fc.Name] = e
		fresh = append(fresh, e)
		freshNames = append(freshNames, fc.Name)
	}
	var gone []*entry
	for name, e := range s.entries {
		if next[name] != e {
			gone = append(gone, e)
			goneNames = append(goneNames, name)
		}
	}
	table := buildTable(nf, s.clusters(next), s.router.table.Load(), s.limited, s.now)

	// New clusters first get their backends, so the swap sends no call to
	// a cluster with none.
	for _, e := range fresh {
		s.start(g, ctx, e)
	}
	warm := time.NewTimer(s.warmup)
	if !s.waitResolved(ctx, fresh, warm.C) && ctx.Err() == nil {
		s.logger.Warn("new clusters have no backend set yet; switching anyway", "waited", s.warmup)
	}
	warm.Stop()
	for _, e := range gone {
		if e.reg != nil {
			e.reg.withdraw()
		}
	}
	for _, e := range fresh {
		if e.reg != nil {
			if err := e.reg.commit(); err != nil {
				s.logger.Warn("cluster metrics not registered", "cluster", e.c.Name(), "err", err)
			}
		}
	}
	oldTable := s.router.table.Swap(table)
	s.dropLimitedCounters(oldTable, table)
	if changed := s.file.restartOnly(nf); len(changed) > 0 {
		s.logger.Warn("settings changed that take effect only after a restart", "settings", changed)
	}
	s.entries, s.file = next, nf
	inUse := map[*proxy.Upstream]bool{}
	for _, e := range next {
		inUse[e.c.up] = true
	}
	for _, e := range gone {
		e.cancel()
		<-e.stopped
		if s.drainUpstream != nil && !inUse[e.c.up] {
			// Its calls in flight run to their end on the old settings,
			// however long (no drain timeout: a reload must not cut
			// them); new calls dial with the new ones. Retired before
			// drop, whose retain would otherwise bound the connections
			// to backends no other cluster lists.
			s.drainUpstream(e.c.up)
		}
		if next[e.c.name] == nil {
			s.retire(e)
		}
		s.drop(e)
		s.succeed(e, next[e.c.name])
	}
	s.logger.Info("configuration reloaded", "routes", len(table.routes),
		"clusters_started", freshNames, "clusters_kept", keptNames, "clusters_stopped", goneNames)
	return nil
}

// dropLimitedCounters removes the streamlb_route_rate_limited_total
// series of the rate-limited routes of old that next does not limit (a
// route removed, renamed or without its limit now), as a removed
// cluster's metrics are withdrawn: route names a generator changes at
// each reload must not pile up series for the process's life.
func (s *clusterSet) dropLimitedCounters(old, next *routeTable) {
	if s.limited == nil || old == nil {
		return
	}
	keep := map[string]bool{}
	for _, r := range next.routes {
		if r.limit != nil {
			keep[r.name] = true
		}
	}
	for _, r := range old.routes {
		if r.limit != nil && !keep[r.name] {
			s.limited.DeleteLabelValues(r.name)
		}
	}
}

// Reload re-reads the file and applies it; it returns the reason a file
// was rejected. It waits for Run's goroutine, which does the work, so it
// must not be called when Run is not running (it then waits for ctx).
func (s *clusterSet) Reload(ctx context.Context) error {
	reply := make(chan error, 1)
	select {
	case s.reqs <- reply:
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-reply:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// current returns the clusters the route table uses, in route order,
// each once. The slice is the table's: callers must not modify it.
func (s *clusterSet) current() []*Cluster {
	return s.router.table.Load().clusters
}

// clusterFor returns the routed cluster named name (the frame engine
// names the cluster whose Upstream dialed the call's backend), or else
// the routed cluster whose current backend set holds addr; nil if none
// (no backend, or a cluster no route uses any more). It is called once per
// call by the data plane's call-end hook; it does not block on the set's
// mutex.
func (s *clusterSet) clusterFor(name, addr string) *Cluster {
	if name != "" {
		// Also for a call that reached no backend: the pool refused it
		// at a cap, or its cluster had none to pick.
		return s.router.table.Load().byName[name]
	}
	if addr == "" {
		return nil
	}
	for _, c := range s.current() {
		if c.metrics != nil {
			if (*c.metrics.backends.Load())[addr] != nil {
				return c
			}
			continue
		}
		for _, b := range c.Backends() {
			if b.Addr == addr {
				return c
			}
		}
	}
	return nil
}

// Ready reports whether some routed cluster that new calls can go to (not
// one a route lists with weight 0 only) has a usable backend.
func (s *clusterSet) Ready() bool {
	for _, c := range s.router.table.Load().drawn {
		if c.Ready() {
			return true
		}
	}
	return false
}

// laterRegisterer collects a cluster's collectors so that they are
// registered only once the cluster is in use, and withdrawn when it
// leaves: a replaced cluster and its successor have the same name, so the
// same label values.
type laterRegisterer struct {
	reg prometheus.Registerer
	cs  []prometheus.Collector // only New and the owner of the set touch it
}

func (l *laterRegisterer) Register(c prometheus.Collector) error {
	l.cs = append(l.cs, c)
	return nil
}

func (l *laterRegisterer) MustRegister(cs ...prometheus.Collector) { l.cs = append(l.cs, cs...) }

func (l *laterRegisterer) Unregister(c prometheus.Collector) bool {
	i := slices.Index(l.cs, c)
	if i < 0 {
		return false
	}
	l.cs = slices.Delete(l.cs, i, i+1)
	return l.reg.Unregister(c)
}

func (l *laterRegisterer) commit() error {
	var errs []error
	for _, c := range l.cs {
		errs = append(errs, l.reg.Register(c))
	}
	return errors.Join(errs...)
}

func (l *laterRegisterer) withdraw() {
	for _, c := range l.cs {
		l.reg.Unregister(c)
	}
}

// Clusters returns the clusters the server sends calls to: its one
// cluster, or those the current route table of its configuration file
// uses, in route order.
func (s *Server) Clusters() []*Cluster {
	if s.set != nil {
		return slices.Clone(s.set.current())
	}
	return []*Cluster{s.cluster}
}
