package cluster

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/resolver"
)

// Prometheus metrics of a cluster, with Prometheus naming: streamlb_ prefix,
// _total for counters, _seconds for durations. Two kinds of source:
//
//   - Per call, a metered Picker wraps the director: Pick counts the call
//     started and in flight, its done counts it finished by status code and
//     observes its duration. The label children of each backend are
//     resolved once, when the backend is first picked, and kept in a map
//     read under a read lock, so a call costs a few atomic adds and no
//     label lookups.
//   - Per call too, the data plane's call-end hook (callEnd) counts the
//     bytes relayed, retries and limit rejections. It runs inline where the
//     call ended (proxy.Config.CountCallEnd: a handful of atomic adds, no
//     goroutine hand-off per call), and uses the same resolved children.
//   - At scrape time, a Collector reads the director's per-backend state
//     (health, ejection, ejections) and the backend set's size, so none of
//     that costs anything between scrapes.
//
// The per-backend counts of calls finished equal the calls the proxy sent
// each backend, retries included: every attempt is its own pick.

// metrics is one cluster's instruments. Its methods are safe for
// concurrent use.
type metrics struct {
	cluster string

	started   *prometheus.CounterVec   // cluster, backend
	finished  *prometheus.CounterVec   // cluster, backend, code
	inflight  *prometheus.GaugeVec     // cluster, backend
	duration  *prometheus.HistogramVec // cluster, backend
	noBackend prometheus.Counter
	setChange prometheus.Counter
	resolveEr prometheus.Counter
	lookupOK  prometheus.Counter
	lookupErr prometheus.Counter
	reqBytes  *prometheus.CounterVec // cluster, backend
	respBytes *prometheus.CounterVec // cluster, backend
	retriedOK prometheus.Counter     // retries of calls that ended OK
	retriedNo prometheus.Counter     // retries of calls that failed anyway
	limits    map[string]prometheus.Counter

	// backends maps the current set's addresses to their resolved label
	// children. Readers load it without locking (Pick must not block);
	// writers copy it under mu and store the copy.
	backends atomic.Pointer[map[string]*backendMetrics]
	mu       sync.Mutex // mu serialises writers of backends and guards current
	current  map[string]bool
	// detached are unregistered instruments for picks of addresses not in
	// the current set (a pick from the director's previous snapshot that
	// races a set change): counting them must not bring back the series of
	// a backend that left.
	detached *backendMetrics
}

// backendMetrics are one backend's resolved label children.
type backendMetrics struct {
	started  prometheus.Counter
	inflight prometheus.Gauge
	duration prometheus.Observer
	finished [17]prometheus.Counter // by codes.Code; 0..16
	reqBytes prometheus.Counter
	respByte prometheus.Counter
}

// newMetrics registers the instruments of cluster name with reg. It fails
// if reg already has them (two clusters of the same name).
func newMetrics(reg prometheus.Registerer, name string, c *Cluster) (*metrics, error) {
	constLabels := prometheus.Labels{"cluster": name}
	m := &metrics{
		cluster: name,
		started: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "streamlb_calls_started_total", Help: "Calls (stream attempts) sent to a backend.", ConstLabels: constLabels,
		}, []string{"backend"}),
		finished: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "streamlb_calls_finished_total", Help: "Calls (stream attempts) to a backend that ended, by gRPC status code.", ConstLabels: constLabels,
		}, []string{"backend", "code"}),
		inflight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "streamlb_calls_in_flight", Help: "Calls (stream attempts) to a backend that have not ended.", ConstLabels: constLabels,
		}, []string{"backend"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "streamlb_call_duration_seconds", Help: "Time from picking a backend to the end of the call's stream.", ConstLabels: constLabels,
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60},
		}, []string{"backend"}),
		noBackend: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "streamlb_pick_failures_total", Help: "Calls for which no backend could be picked.", ConstLabels: constLabels,
		}),
		setChange: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "streamlb_backend_set_changes_total", Help: "Backend sets accepted from discovery.", ConstLabels: constLabels,
		}),
		resolveEr: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "streamlb_resolver_errors_total", Help: "Failed lookups of the backend targets (the last set was kept).", ConstLabels: constLabels,
		}),
		reqBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "streamlb_request_bytes_total", Help: "Request DATA payload bytes received from clients, by the backend of the call's final attempt.", ConstLabels: constLabels,
		}, []string{"backend"}),
		respBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "streamlb_response_bytes_total", Help: "Response DATA payload bytes relayed to clients, by backend.", ConstLabels: constLabels,
		}, []string{"backend"}),
		current: make(map[string]bool),
	}
	m.backends.Store(&map[string]*backendMetrics{})
	m.detached = &backendMetrics{
		started:  prometheus.NewCounter(prometheus.CounterOpts{Name: "detached"}),
		inflight: prometheus.NewGauge(prometheus.GaugeOpts{Name: "detached"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "detached"}),
		reqBytes: prometheus.NewCounter(prometheus.CounterOpts{Name: "detached"}),
		respByte: prometheus.NewCounter(prometheus.CounterOpts{Name: "detached"}),
	}
	for code := range m.detached.finished {
		m.detached.finished[code] = m.detached.started
	}
	lookups := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "streamlb_dns_lookups_total", Help: "DNS lookups of the backend targets, by result (ok, error).", ConstLabels: constLabels,
	}, []string{"result"})
	m.lookupOK, m.lookupErr = lookups.WithLabelValues("ok"), lookups.WithLabelValues("error")
	retries := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "streamlb_retries_total", Help: "Further attempts calls made (on another backend while there is one), by the call's outcome (ok: it then succeeded).", ConstLabels: constLabels,
	}, []string{"outcome"})
	m.retriedOK, m.retriedNo = retries.WithLabelValues("ok"), retries.WithLabelValues("failed")
	limits := newLimitsVec(constLabels)
	m.limits = limitCounters(limits)
	for _, col := range []prometheus.Collector{m.started, m.finished, m.inflight, m.duration, m.noBackend, m.setChange, m.resolveEr,
		m.reqBytes, m.respBytes, retries, limits, lookups, &stateCollector{c: c, constLabels: constLabels}} {
		if err := reg.Register(col); err != nil {
			return nil, fmt.Errorf("cluster %s: metrics: %w", name, err)
		}
	}
	return m, nil
}

// newLimitsVec is streamlb_limit_rejections_total with constLabels: a
// cluster's, or, with a configuration file, the listener's (cluster ""),
// for the calls refused before they were routed.
func newLimitsVec(constLabels prometheus.Labels) *prometheus.CounterVec {
	return prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "streamlb_limit_rejections_total", Help: "Calls the proxy refused at one of its limits, by the limit reached (RESOURCE_EXHAUSTED; UNAVAILABLE for max_backend_conns).", ConstLabels: constLabels,
	}, []string{"limit"})
}

// limitCounters resolves the children of limits, one per limit name of
// the data plane. The map is read-only once returned.
func limitCounters(limits *prometheus.CounterVec) map[string]prometheus.Counter {
	m := make(map[string]prometheus.Counter)
	for _, l := range []string{proxy.LimitMaxStreams, proxy.LimitMaxStreamsPerBackend, proxy.LimitMaxHeaderSize, proxy.LimitMaxConnBuffer, proxy.LimitMaxBackendConns} {
		m[l] = limits.WithLabelValues(l)
	}
	return m
}

// callEnd counts what the data plane reports about a call that ended.
// The map of limits is read-only after newMetrics.
func (m *metrics) callEnd(ci proxy.CallInfo) {
	if ci.Backend != "" {
		b := m.backend(ci.Backend)
		b.reqBytes.Add(float64(ci.RequestBytes))
		b.respByte.Add(float64(ci.ResponseBytes))
	}
	if ci.Attempts > 1 {
		if ci.Code == codes.OK {
			m.retriedOK.Add(float64(ci.Attempts - 1))
		} else {
			m.retriedNo.Add(float64(ci.Attempts - 1))
		}
	}
	if ci.Limit != "" {
		if c := m.limits[ci.Limit]; c != nil {
			c.Inc()
		}
	}
}

// backend returns addr's label children, resolving them on first use.
func (m *metrics) backend(addr string) *backendMetrics {
	if b := (*m.backends.Load())[addr]; b != nil {
		return b
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	cur := *m.backends.Load()
	if b := cur[addr]; b != nil {
		return b
	}
	if !m.current[addr] {
		return m.detached
	}
	b := &backendMetrics{
		started:  m.started.WithLabelValues(addr),
		inflight: m.inflight.WithLabelValues(addr),
		duration: m.duration.WithLabelValues(addr),
		reqBytes: m.reqBytes.WithLabelValues(addr),
		respByte: m.respBytes.WithLabelValues(addr),
	}
	for code := range b.finished {
		b.finished[code] = m.finished.WithLabelValues(addr, codes.Code(code).String())
	}
	next := make(map[string]*backendMetrics, len(cur)+1)
	maps.Copy(next, cur)
	next[addr] = b
	m.backends.Store(&next)
	return b
}

// UpdateState records the current set and forgets the series of backends
// that left it, so a churning deployment does not grow the exposition
// without bound; calls still in flight to them end on children nobody
// exports any more. The cluster hands it each set before the director
// does, so the first pick of a new backend finds it current.
func (m *metrics) UpdateState(s resolver.State) error {
	m.setChange.Inc()
	keep := make(map[string]bool, len(s.Addresses))
	for _, a := range s.Addresses {
		keep[a.Addr] = true
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.current = keep
	cur := *m.backends.Load()
	next := make(map[string]*backendMetrics, len(cur))
	for addr, b := range cur {
		if keep[addr] {
			next[addr] = b
			continue
		}
		m.started.DeleteLabelValues(addr)
		m.inflight.DeleteLabelValues(addr)
		m.duration.DeleteLabelValues(addr)
		m.reqBytes.DeleteLabelValues(addr)
		m.respBytes.DeleteLabelValues(addr)
		m.finished.DeletePartialMatch(prometheus.Labels{"backend": addr})
	}
	m.backends.Store(&next)
	return nil
}

// lookup counts one DNS lookup.
func (m *metrics) lookup(err error) {
	if err != nil {
		m.lookupErr.Inc()
		return
	}
	m.lookupOK.Inc()
}

// ReportError counts a failed lookup.
func (m *metrics) ReportError(error) { m.resolveEr.Inc() }

// meteredPicker counts every pick of next in m.
type meteredPicker struct {
	next proxy.Picker
	m    *metrics
}

func (p *meteredPicker) Pick(ctx context.Context, fullMethod string) (string, func(error), error) {
	addr, done, err := p.next.Pick(ctx, fullMethod)
	return p.meter(addr, done, err)
}

// PickExcluding forwards a retry's pick, with the backends it already
// tried, to next if next is a proxy.RetryPicker (the director is), so that
// metering does not cost retries their exclusion; otherwise it is Pick.
func (p *meteredPicker) PickExcluding(ctx context.Context, fullMethod string, tried []string) (string, func(error), error) {
	if rp, ok := p.next.(proxy.RetryPicker); ok {
		return p.meter(rp.PickExcluding(ctx, fullMethod, tried))
	}
	return p.Pick(ctx, fullMethod)
}

var _ proxy.RetryPicker = (*meteredPicker)(nil)

// meter counts one pick's result and wraps its done.
func (p *meteredPicker) meter(addr string, done func(error), err error) (string, func(error), error) {
	if err != nil {
		p.m.noBackend.Inc()
		return addr, done, err
	}
	b := p.m.backend(addr)
	b.started.Inc()
	b.inflight.Inc()
	start := time.Now()
	// The proxy calls done exactly once (proxy.Picker), so it needs no
	// sync.Once: one allocation per call instead of two.
	return addr, func(err error) {
		b.inflight.Dec()
		b.duration.Observe(time.Since(start).Seconds())
		code := status.Code(err)
		if err != nil && code == codes.OK {
			code = codes.Unknown
		}
		var cs proxy.ClientStatus
		if errors.As(err, &cs) {
			// The code the client got (a reset), not the failure's.
			code = cs.ClientCode()
		}
		if int(code) < len(b.finished) {
			b.finished[code].Inc()
		} else {
			b.finished[codes.Unknown].Inc()
		}
		if done != nil {
			done(err)
		}
	}, nil
}

// stateCollector reports the director's per-backend state at scrape time.
type stateCollector struct {
	c           *Cluster
	constLabels prometheus.Labels
}

var (
	descBackends = func(l prometheus.Labels) *prometheus.Desc {
		return prometheus.NewDesc("streamlb_backends", "Backends in the cluster's current set.", nil, l)
	}
	descHealthy = func(l prometheus.Labels) *prometheus.Desc {
		return prometheus.NewDesc("streamlb_backend_healthy", "1 if the backend passes its active health checks (or none run), else 0.", []string{"backend"}, l)
	}
	descEjected = func(l prometheus.Labels) *prometheus.Desc {
		return prometheus.NewDesc("streamlb_backend_ejected", "1 while outlier detection keeps the backend from being picked.", []string{"backend"}, l)
	}
	descEjections = func(l prometheus.Labels) *prometheus.Desc {
		return prometheus.NewDesc("streamlb_backend_ejections_total", "Ejections of the backend since it joined the set.", []string{"backend"}, l)
	}
	descReady = func(l prometheus.Labels) *prometheus.Desc {
		return prometheus.NewDesc("streamlb_cluster_ready", "1 if a pick would go to a healthy, unejected backend.", nil, l)
	}
)

func (sc *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []func(prometheus.Labels) *prometheus.Desc{descBackends, descHealthy, descEjected, descEjections, descReady} {
		ch <- d(sc.constLabels)
	}
}

func (sc *stateCollector) Collect(ch chan<- prometheus.Metric) {
	bs := sc.c.Backends()
	ch <- prometheus.MustNewConstMetric(descBackends(sc.constLabels), prometheus.GaugeValue, float64(len(bs)))
	ch <- prometheus.MustNewConstMetric(descReady(sc.constLabels), prometheus.GaugeValue, boolFloat(sc.c.Ready()))
	for _, b := range bs {
		ch <- prometheus.MustNewConstMetric(descHealthy(sc.constLabels), prometheus.GaugeValue, boolFloat(b.Healthy), b.Addr)
		ch <- prometheus.MustNewConstMetric(descEjected(sc.constLabels), prometheus.GaugeValue, boolFloat(b.Ejected), b.Addr)
		ch <- prometheus.MustNewConstMetric(descEjections(sc.constLabels), prometheus.CounterValue, float64(b.Ejections), b.Addr)
	}
}

func boolFloat(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// connCollector reports the frame engine's connection counts at scrape
// time.
// Backend connections carry the label of the cluster they were opened
// for (the data plane pools them per cluster); ownCluster names the
// cluster of the connections opened with the server's own settings.
type connCollector struct {
	stats       func() proxy.Stats
	constLabels prometheus.Labels
	ownCluster  string
	descs       [6]*prometheus.Desc
}

func newConnCollector(stats func() proxy.Stats, constLabels prometheus.Labels, ownCluster string) *connCollector {
	return &connCollector{stats: stats, constLabels: constLabels, ownCluster: ownCluster, descs: [6]*prometheus.Desc{
		prometheus.NewDesc("streamlb_client_connections", "Client connections open.", nil, constLabels),
		prometheus.NewDesc("streamlb_client_connections_accepted_total", "Client connections accepted and served.", nil, constLabels),
		prometheus.NewDesc("streamlb_client_connections_refused_total", "Client connections closed as soon as accepted, over --max-connections.", nil, constLabels),
		prometheus.NewDesc("streamlb_backend_connections", "Backend connections open or being opened, by the cluster they were opened for.", []string{"cluster"}, constLabels),
		prometheus.NewDesc("streamlb_client_connections_parked", "Client connections idle without a reader goroutine (Linux), among those open.", nil, constLabels),
		prometheus.NewDesc("streamlb_calls_waiting", "Calls waiting for a stream slot on a backend whose connections are all full (--max-backend-conns, --max-backend-pending), by the cluster of those connections.", []string{"cluster"}, constLabels),
	}}
}

func (cc *connCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range cc.descs {
		ch <- d
	}
}

func (cc *connCollector) Collect(ch chan<- prometheus.Metric) {
	st := cc.stats()
	ch <- prometheus.MustNewConstMetric(cc.descs[0], prometheus.GaugeValue, float64(st.ClientConns))
	ch <- prometheus.MustNewConstMetric(cc.descs[1], prometheus.CounterValue, float64(st.ClientConnsAccepted))
	ch <- prometheus.MustNewConstMetric(cc.descs[2], prometheus.CounterValue, float64(st.ClientConnsRefused))
	ch <- prometheus.MustNewConstMetric(cc.descs[4], prometheus.GaugeValue, float64(st.ClientConnsParked))
	for name, n := range st.BackendConnsByUpstream {
		if name == "" {
			name = cc.ownCluster
		}
		ch <- prometheus.MustNewConstMetric(cc.descs[3], prometheus.GaugeValue, float64(n), name)
	}
	for name, n := range st.CallsWaitingByUpstream {
		if name == "" {
			name = cc.ownCluster
		}
		ch <- prometheus.MustNewConstMetric(cc.descs[5], prometheus.GaugeValue, float64(n), name)
	}
}
