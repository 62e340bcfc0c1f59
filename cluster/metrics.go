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
//   - Per call, a metered Picker wraps the director: a pick counts the
//     call in flight, the proxy's sending it (proxy.UpstreamPick.Sent)
//     counts it started, and its done counts it finished by status code
//     and observes its duration if it was sent. Each backend's per-call counts are plain
//     atomic integers in one backendMetrics (about five cache lines, the
//     two or three a call touches next to each other), found through a map
//     read without locking, and turned into Prometheus series only at
//     scrape time (callCollector). A client_golang child per series cost
//     about 25 cache lines per call, float compare-and-swap loops for the
//     gauge and the histogram's sum, and with a closure per pick 2.5% of
//     the proxy's CPU per call at 2,000 calls/s against --metrics=false;
//     these about 2%.
//   - Per call too, the data plane's call-end hook (callEnd) counts the
//     bytes relayed, retries and limit rejections. It runs inline where the
//     call ended (proxy.Config.CountCallEnd: a handful of atomic adds, no
//     goroutine hand-off per call), and uses the same backendMetrics.
//   - Per backend connection that could not be opened, the data plane's
//     connect-failure hook (connectFailure, proxy.Config.
//     CountConnectFailure) counts it on the backend, off the calls' path:
//     no call was sent on it, so calls started and finished do not show
//     it.
//   - At scrape time, a Collector reads the director's per-backend state
//     (health, ejection, ejections) and the backend set's size, so none of
//     that costs anything between scrapes.
//
// The per-backend counts of calls started and finished are the calls
// (stream attempts, retries included) the proxy sent each backend: a pick
// it refused or an attempt that never reached the backend counts in
// neither (meteredPicker.PickUpstream).

// metrics is one cluster's instruments. Its methods are safe for
// concurrent use.
type metrics struct {
	cluster string

	noBackend prometheus.Counter
	setChange prometheus.Counter
	resolveEr prometheus.Counter
	lookupOK  prometheus.Counter
	lookupErr prometheus.Counter
	retriedOK prometheus.Counter // retries of calls that ended OK
	retriedNo prometheus.Counter // retries of calls that failed anyway
	limits    map[string]prometheus.Counter

	// backends maps the current set's addresses to their counts, which
	// callCollector exports. Readers load it without locking (Pick must
	// not block); writers copy it under mu and store the copy.
	backends atomic.Pointer[map[string]*backendMetrics]
	mu       sync.Mutex // mu serialises writers of backends and guards current and departed
	current  map[string]bool
	// departed holds the counts of backends that left the set with calls
	// in flight, while those run: a backend back in the set before they
	// end (a DNS or registry flap; the data plane keeps its calls) takes
	// its counts back, so streamlb_calls_in_flight still counts them.
	// UpdateState drops one once its calls ended.
	departed map[string]*backendMetrics
	// detached counts picks of addresses not in the current set (a pick
	// from the director's previous snapshot that races a set change),
	// exported nowhere: counting them must not bring back the series of
	// a backend that left.
	detached *backendMetrics
}

// durationBounds are streamlb_call_duration_seconds' bucket upper bounds,
// in seconds; durationBoundsNs the same in nanoseconds, which a call's
// duration is compared with.
var (
	durationBounds   = [...]float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60}
	durationBoundsNs = func() (ns [len(durationBounds)]int64) {
		for i, b := range durationBounds {
			ns[i] = int64(b * 1e9)
		}
		return ns
	}()
)

// numCodes is the number of gRPC status codes (OK..Unauthenticated).
const numCodes = 17

// codeNames are the codes' label values, as codes.Code.String spells
// them.
var codeNames = func() (n [numCodes]string) {
	for c := range n {
		n[c] = codes.Code(c).String()
	}
	return n
}()

// backendMetrics are one backend's per-call counts. The fields a call
// that ends OK within a few milliseconds touches come first.
type backendMetrics struct {
	started, inflight   atomic.Int64
	reqBytes, respBytes atomic.Uint64
	durSumNs            atomic.Int64
	// durCounts counts calls by duration bucket: durCounts[i] those over
	// durationBounds[i-1] and at most durationBounds[i]; the last, those
	// over every bound (+Inf). Not cumulative: Prometheus' buckets are
	// summed at scrape time.
	durCounts [len(durationBounds) + 1]atomic.Uint64
	finished  [numCodes]atomic.Uint64 // by codes.Code
	// connectFails counts the connections to the backend that could not
	// be opened (connectFailure); no call touches it.
	connectFails atomic.Uint64
}

// observe counts a duration of d nanoseconds.
func (b *backendMetrics) observe(d int64) {
	i := 0
	for i < len(durationBoundsNs) && d > durationBoundsNs[i] {
		i++
	}
	b.durCounts[i].Add(1)
	b.durSumNs.Add(d)
}

// newMetrics registers the instruments of cluster name with reg. It fails
// if reg already has them (two clusters of the same name).
func newMetrics(reg prometheus.Registerer, name string, c *Cluster) (*metrics, error) {
	constLabels := prometheus.Labels{"cluster": name}
	m := &metrics{
		cluster: name,
		noBackend: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "streamlb_pick_failures_total", Help: "Calls for which no backend could be picked.", ConstLabels: constLabels,
		}),
		setChange: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "streamlb_backend_set_changes_total", Help: "Backend sets accepted from discovery.", ConstLabels: constLabels,
		}),
		resolveEr: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "streamlb_resolver_errors_total", Help: "Failed lookups of the backend targets (the last set was kept).", ConstLabels: constLabels,
		}),
		current:  make(map[string]bool),
		departed: make(map[string]*backendMetrics),
		detached: &backendMetrics{},
	}
	m.backends.Store(&map[string]*backendMetrics{})
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
	for _, col := range []prometheus.Collector{newCallCollector(m, constLabels), m.noBackend, m.setChange, m.resolveEr,
		retries, limits, lookups, &stateCollector{c: c, constLabels: constLabels}} {
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
		b.reqBytes.Add(uint64(max(ci.RequestBytes, 0)))
		b.respBytes.Add(uint64(max(ci.ResponseBytes, 0)))
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

// connectFailure counts a connection to backend addr that could not be
// opened (proxy.Config.CountConnectFailure): refused, timed out, or its
// TLS or HTTP/2 handshake failed. It runs on the connection's goroutine,
// under no lock of the proxy's; an address not in the current set counts
// nowhere, as its calls do (backend).
func (m *metrics) connectFailure(addr string) {
	m.backend(addr).connectFails.Add(1)
}

// backend returns addr's counts, made on first use.
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
	b := &backendMetrics{}
	next := make(map[string]*backendMetrics, len(cur)+1)
	maps.Copy(next, cur)
	next[addr] = b
	m.backends.Store(&next)
	return b
}

// UpdateState records the current set and forgets the series of backends
// that left it, so a churning deployment does not grow the exposition
// without bound; calls still in flight to them end on children nobody
// exports any more, unless the backend is back in the set before they
// end: then its series come back with them (departed). The cluster hands
// it each set before the director does, so the first pick of a new
// backend finds it current.
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
		} else if b.inflight.Load() > 0 {
			m.departed[addr] = b
		}
	}
	for addr, b := range m.departed {
		switch {
		case b.inflight.Load() <= 0:
			delete(m.departed, addr) // its calls ended: back later, it starts afresh
		case keep[addr]:
			next[addr] = b // back while its calls run
			delete(m.departed, addr)
		}
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

// meter counts one pick's result and wraps its done: a Picker without
// UpstreamPick.Sent (the reference engine asked through Pick) counts
// the call started when picked.
func (p *meteredPicker) meter(addr string, done func(error), err error) (string, func(error), error) {
	if err != nil {
		p.m.noBackend.Inc()
		return addr, done, err
	}
	c := p.call(addr, done)
	c.markSent()
	return addr, c.done, nil
}

// PickUpstream is the frame engine's pick (proxy.UpstreamPicker): Pick,
// or PickExcluding with avoid when it is not empty, whose attempt is
// counted started when the proxy sends it (proxy.UpstreamPick.Sent),
// not when picked: a pick the proxy refuses (at its connection cap, a
// backend taking no stream) or an attempt that never reached the
// backend (it waited for a slot, or its connection could not be opened)
// counts neither started nor finished, as Envoy's upstream_rq_total
// counts requests attached to an upstream connection. The Upstream is
// the Server's own: the proxy's retry policy.
func (p *meteredPicker) PickUpstream(ctx context.Context, fullMethod string, _ *proxy.Upstream, avoid []string) (proxy.UpstreamPick, error) {
	addr, sent, done, err := p.pickSent(ctx, fullMethod, avoid)
	return proxy.UpstreamPick{Addr: addr, Sent: sent, Done: done}, err
}

var _ proxy.UpstreamPicker = (*meteredPicker)(nil)

// pickSent is PickUpstream's pick, also for a router's cluster (dest.pick):
// Pick, or PickExcluding avoiding tried when it is not empty, with the
// attempt's Sent, which counts it started.
func (p *meteredPicker) pickSent(ctx context.Context, fullMethod string, tried []string) (string, func(), func(error), error) {
	var addr string
	var done func(error)
	var err error
	if rp, ok := p.next.(proxy.RetryPicker); ok && len(tried) > 0 {
		addr, done, err = rp.PickExcluding(ctx, fullMethod, tried)
	} else {
		addr, done, err = p.next.Pick(ctx, fullMethod)
	}
	if err != nil {
		p.m.noBackend.Inc()
		return addr, nil, done, err
	}
	c := p.call(addr, done)
	return addr, c.markSent, c.done, nil
}

// call counts a pick of addr in flight and returns its metered call.
func (p *meteredPicker) call(addr string, done func(error)) *meteredCall {
	c := &meteredCall{b: p.m.backend(addr), next: done, start: time.Since(clockBase)}
	c.b.inflight.Add(1)
	return c
}

// meteredCall is one picked attempt's counts. The proxy calls done
// exactly once (proxy.Picker), so it needs no sync.Once. One per pick,
// not pooled: a done called twice by mistake then counts a call twice,
// where a pooled one would end the next call that got it (its
// director's done included).
type meteredCall struct {
	b     *backendMetrics
	next  func(error)
	start time.Duration
	sent  atomic.Bool // markSent ran: the call is counted started
}

// markSent counts the call started, once: it was sent to the backend.
// It runs under the proxy's locks (proxy.UpstreamPick.Sent).
func (c *meteredCall) markSent() {
	if !c.sent.Swap(true) {
		c.b.started.Add(1)
	}
}

// done ends the call: out of flight, and, if it was sent, finished with
// its duration, after it was counted started; then the director's done.
func (c *meteredCall) done(err error) {
	c.b.inflight.Add(-1)
	if c.sent.Load() {
		c.b.observe(int64(time.Since(clockBase) - c.start))
		c.b.finished[finishedCode(err)].Add(1)
	}
	if c.next != nil {
		c.next(err)
	}
}

// clockBase is what a metered call's times are read against: time.Since
// of it reads only the monotonic clock, one clock read where time.Now
// makes two.
var clockBase = time.Now()

// finishedCode is the code a call that ended with err is counted under:
// the code its client got, an index into backendMetrics.finished.
func finishedCode(err error) codes.Code {
	if err == nil {
		return codes.OK
	}
	code := status.Code(err)
	if code == codes.OK {
		code = codes.Unknown
	}
	var cs proxy.ClientStatus
	if errors.As(err, &cs) {
		// The code the client got (a reset), not the failure's.
		code = cs.ClientCode()
	}
	if int(code) >= numCodes {
		code = codes.Unknown
	}
	return code
}

// callCollector exports the per-call counts of the current set's
// backends (metrics.backends) at scrape time.
type callCollector struct {
	m                                                          *metrics
	started, finished, inflight, duration, reqBytes, respBytes *prometheus.Desc
	connectFails                                               *prometheus.Desc
}

func newCallCollector(m *metrics, constLabels prometheus.Labels) *callCollector {
	backend := []string{"backend"}
	return &callCollector{
		m:         m,
		started:   prometheus.NewDesc("streamlb_calls_started_total", "Calls (stream attempts) sent to a backend.", backend, constLabels),
		finished:  prometheus.NewDesc("streamlb_calls_finished_total", "Calls (stream attempts) to a backend that ended, by gRPC status code.", []string{"backend", "code"}, constLabels),
		inflight:  prometheus.NewDesc("streamlb_calls_in_flight", "Calls (stream attempts) to a backend that have not ended.", backend, constLabels),
		duration:  prometheus.NewDesc("streamlb_call_duration_seconds", "Time from picking a backend to the end of the call's stream.", backend, constLabels),
		reqBytes:  prometheus.NewDesc("streamlb_request_bytes_total", "Request DATA payload bytes received from clients, by the backend of the call's final attempt.", backend, constLabels),
		respBytes: prometheus.NewDesc("streamlb_response_bytes_total", "Response DATA payload bytes relayed to clients, by backend.", backend, constLabels),
		connectFails: prometheus.NewDesc("streamlb_backend_connect_failures_total",
			"Connections to the backend that could not be opened: refused, timed out, or their TLS or HTTP/2 handshake failed (frame engine).", backend, constLabels),
	}
}

func (cc *callCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{cc.started, cc.finished, cc.inflight, cc.duration, cc.reqBytes, cc.respBytes, cc.connectFails} {
		ch <- d
	}
}

func (cc *callCollector) Collect(ch chan<- prometheus.Metric) {
	for addr, b := range *cc.m.backends.Load() {
		// The ends first, the starts after: a call is counted started
		// before it can end, so a scrape never shows more calls finished
		// (or timed) than started, however calls go on meanwhile.
		for code := range b.finished {
			ch <- prometheus.MustNewConstMetric(cc.finished, prometheus.CounterValue, float64(b.finished[code].Load()), addr, codeNames[code])
		}
		// The count is the buckets' own total, read once each, so that
		// no bucket exceeds it.
		buckets := make(map[float64]uint64, len(durationBounds))
		var n uint64
		for i, bound := range durationBounds {
			n += b.durCounts[i].Load()
			buckets[bound] = n
		}
		n += b.durCounts[len(durationBounds)].Load()
		ch <- prometheus.MustNewConstHistogram(cc.duration, n, float64(b.durSumNs.Load())/1e9, buckets, addr)
		ch <- prometheus.MustNewConstMetric(cc.inflight, prometheus.GaugeValue, float64(b.inflight.Load()), addr)
		ch <- prometheus.MustNewConstMetric(cc.started, prometheus.CounterValue, float64(b.started.Load()), addr)
		ch <- prometheus.MustNewConstMetric(cc.reqBytes, prometheus.CounterValue, float64(b.reqBytes.Load()), addr)
		ch <- prometheus.MustNewConstMetric(cc.respBytes, prometheus.CounterValue, float64(b.respBytes.Load()), addr)
		ch <- prometheus.MustNewConstMetric(cc.connectFails, prometheus.CounterValue, float64(b.connectFails.Load()), addr)
	}
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
