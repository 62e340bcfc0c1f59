package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync/atomic"
	"time"
)

// An Upstream is the dial and retry settings of a group of backends: one
// cluster of a configuration file, in Envoy's terms. A Picker that knows
// of several such groups implements UpstreamPicker and names, with every
// pick, the Upstream of the backend it picked; a plain Picker's backends
// all use the Server's own Upstream, built from its Config.
//
// Backend connections are pooled per Upstream and address, so two
// Upstreams never share a connection even to the same address: a
// connection dialed with one's TLS settings is never used for another's
// calls. Create one with NewUpstream; it is immutable afterwards, apart
// from its retry budget, and may be used by several Servers.
type Upstream struct {
	name       string
	dial       func(ctx context.Context, network, addr string) (net.Conn, error)
	retryOn    []string // normalized, see normalizeMethods
	maxRetries int      // 0: none
	budget     *retryBudget
	budgetSize int
	budgetRate float64
	// retired is set by DrainUpstream: a connection opened for up after
	// it (by a call picked just before) drains once its streams are done.
	retired atomic.Bool
}

// UpstreamConfig configures an Upstream. Its fields mean what the Config
// fields of the same names mean, with the same defaults.
type UpstreamConfig struct {
	// Name names the group (the cluster) in logs and in Stats.
	Name string
	// Dial opens backend connections; nil means net.Dialer.DialContext.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// RetryOn, MaxRetries, RetryBudget and RetryBudgetRatio are the
	// group's retry policy (see Config). Config.RetryBufferSize, a bound
	// on the proxy's memory, stays the Server's: when it turns retries
	// off, no Upstream retries.
	RetryOn          []string
	MaxRetries       int
	RetryBudget      int
	RetryBudgetRatio float64
}

// maxRetryBudget bounds RetryBudget and RetryBudgetRatio.
const maxRetryBudget int64 = 1_000_000_000_000

// NewUpstream validates cfg and returns its Upstream. It starts nothing.
func NewUpstream(cfg UpstreamConfig) (*Upstream, error) {
	if cfg.RetryBudgetRatio < 0 {
		return nil, errors.New("proxy: RetryBudgetRatio must not be negative")
	}
	// The budget keeps thousandths of tokens in an int64: beyond these
	// bounds, or for NaN and infinities, whose conversion to an integer
	// is undefined (math.MinInt64 on amd64), retries would be silently
	// off instead.
	if int64(cfg.RetryBudget) > maxRetryBudget || !(cfg.RetryBudgetRatio <= float64(maxRetryBudget)) {
		return nil, fmt.Errorf("proxy: RetryBudget and RetryBudgetRatio must be finite numbers of at most %d", maxRetryBudget)
	}
	switch {
	case cfg.RetryBudget == 0:
		cfg.RetryBudget = DefaultRetryBudget
	case cfg.RetryBudget < 0:
		cfg.RetryBudget = 0 // a bucket of no tokens: allow never says yes
	}
	if cfg.RetryBudgetRatio == 0 {
		cfg.RetryBudgetRatio = DefaultRetryBudgetRatio
	}
	switch {
	case cfg.MaxRetries == 0:
		cfg.MaxRetries = DefaultMaxRetries
	case cfg.MaxRetries < 0:
		cfg.MaxRetries = 0
	}
	retryOn, err := normalizeMethods(cfg.RetryOn)
	if err != nil {
		return nil, err
	}
	if cfg.Dial == nil {
		var d net.Dialer
		cfg.Dial = d.DialContext
	}
	return &Upstream{
		name:       cfg.Name,
		dial:       cfg.Dial,
		retryOn:    retryOn,
		maxRetries: cfg.MaxRetries,
		budget:     newRetryBudget(int64(cfg.RetryBudget), cfg.RetryBudgetRatio),
		budgetSize: cfg.RetryBudget,
		budgetRate: cfg.RetryBudgetRatio,
	}, nil
}

// Name returns the name the Upstream was created with.
func (u *Upstream) Name() string { return u.name }

// retryable reports whether RetryOn names the method, as a full method
// name or a "/package.Service/" prefix.
func (u *Upstream) retryable(method string) bool {
	for _, m := range u.retryOn {
		if m == method || (strings.HasSuffix(m, "/") && strings.HasPrefix(method, m)) {
			return true
		}
	}
	return false
}

// UpstreamPicker is an optional interface of a Picker whose backends
// belong to groups with their own dial and retry settings (the clusters of
// a configuration file). When the Server's Picker implements it, the
// Server calls PickUpstream instead of Pick and PickExcluding, for every
// attempt of a call. call is nil for a call's first attempt (which a rate
// limit admits) and, for a retry, the Upstream of the call's first pick:
// a Picker that chose among several groups for the call (a route's
// weighted clusters) keeps its retries in the group it chose. avoid lists
// the backends not to pick if another will do: for a retry the addresses
// the call already tried, as for RetryPicker, and for every attempt the
// backends that take no stream now (SETTINGS_MAX_CONCURRENT_STREAMS of 0
// on every connection). The answer names, with the backend, its
// Upstream; see UpstreamPick. The call's retry policy is the Upstream of
// its first pick; every attempt dials with the Upstream of its own pick.
// The contract is otherwise Pick's: it must not block or do I/O.
type UpstreamPicker interface {
	PickUpstream(ctx context.Context, fullMethod string, call *Upstream, avoid []string) (UpstreamPick, error)
}

// UpstreamPick is an UpstreamPicker's answer for one attempt of a call.
type UpstreamPick struct {
	// Addr is the backend picked.
	Addr string
	// Upstream is the group Addr was picked from; nil means the Server's
	// own. With an error it may still name the group that had no backend
	// to give, which the call's CallInfo then names.
	Upstream *Upstream
	// Done, if not nil, is called once when the attempt ends, as Pick's
	// done.
	Done func(error)
	// Sent, if not nil, is called at most once, before Done, when the
	// attempt is sent to the backend: its stream is opened on a
	// connection to Addr, its HEADERS the next frame written for it. An
	// attempt never sent does not see it, and its Done is called alone: a
	// pick the proxy refused (at MaxStreamsPerBackend, at MaxBackendConns
	// with no room to wait, or for a backend that takes no stream), a call
	// that waited for a slot or for the connection's handshake and ended
	// or went elsewhere first, a connection that could not be opened.
	// Metrics count calls sent to a backend with it, as Envoy's
	// upstream_rq_total counts requests attached to an upstream
	// connection. It runs under the proxy's locks: it must return
	// quickly, never block and never call back into the Server, as
	// Config.CountCallEnd.
	Sent func()
	// Timeout, if positive, bounds the whole call, retries included, from
	// its first pick (read from that pick only): a route's timeout, as
	// Envoy's route timeout, gRPC-aware as its max_grpc_timeout. The
	// call's deadline is the earlier of the client's (grpc-timeout) and
	// this one; every attempt's backend is sent a grpc-timeout of what is
	// left of it. When this one passes first, the client gets
	// DEADLINE_EXCEEDED saying it was the route's timeout, and the
	// backend stream is cancelled, as for the client's own deadline.
	Timeout time.Duration
}

// DrainUpstream retires up and drains the backend connections opened for
// it: they take no new streams, the streams they carry run to their end,
// however long, and each closes once its last stream is done (an idle one
// at once). A Picker calls it for an Upstream it no longer names (a
// cluster removed, or whose dial or retry settings were reloaded), so that
// its connections do not linger; connections opened for up afterwards, by
// calls picked before the Picker stopped naming it, drain the same way.
// This is Envoy's drain of a cluster a CDS update removed or replaced.
//
// Config.DrainTimeout does not bound these calls: what ends the cluster
// is a configuration change, not the backend's departure, and a reload
// must not cut every long call through the proxy. Server.Shutdown and
// Close still end them, and RetainBackends does not touch a retired
// Upstream's connections, while RetainUpstreamBackends(up, ...) does bound
// those to backends that left its set, as for any Upstream. Safe for
// concurrent use; it does not block on the drain.
func (s *Server) DrainUpstream(up *Upstream) {
	if up == nil || up == s.up {
		return
	}
	// Its calls waiting for a slot go where the Picker sends them now,
	// rather than wait for the slots of the calls it carries to the end.
	var moved []*attempt
	defer func() { s.pool.moveWaiting(moved, errUpstreamRetired) }() // after pool.mu is released
	s.pool.mu.Lock()
	up.retired.Store(true)
	defer s.pool.mu.Unlock()
	for k, cs := range s.pool.conns {
		if k.up != up {
			continue
		}
		for _, b := range cs {
			b.drain(0, 0)
			moved = b.takeWaiting(moved)
		}
	}
}

// RetainUpstreamBackends is RetainBackends for the connections opened for
// up alone: those to a backend not in addrs drain, within
// Config.DrainTimeout, while other Upstreams' connections to the same
// address are left alone. up may be retired (DrainUpstream): the
// connections it still has to a backend that left addrs are then bounded. A Picker over several
// Upstreams calls it with each group's set, since an address can leave one
// group and stay in another (RetainBackends, given the union of the sets,
// would then keep the first group's connection idle for good). Safe for
// concurrent use; it does not block on the drain.
func (s *Server) RetainUpstreamBackends(up *Upstream, addrs []string) {
	if up == nil {
		return
	}
	var moved []*attempt
	defer func() { s.pool.moveWaiting(moved, errLeftSet) }() // after pool.mu is released
	s.pool.mu.Lock()
	defer s.pool.mu.Unlock()
	for k, cs := range s.pool.conns {
		if k.up != up {
			continue
		}
		if slices.Contains(addrs, k.addr) {
			for _, b := range cs {
				b.rejoined(leftUpstream) // back in the set: see backendConn.rejoined
			}
			continue
		}
		for _, b := range cs {
			b.drain(s.cfg.DrainTimeout, leftUpstream)
			moved = b.takeWaiting(moved)
		}
	}
}
