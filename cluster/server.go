package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/streamlb/streamlb/proxy"
)

// Data-plane engines accepted in [ServerConfig.Engine].
const (
	// EngineFrame relays HTTP/2 frames (package proxy's Server).
	EngineFrame = "frame"
	// EngineGRPCProxy is the message-level reference engine on
	// mwitkow/grpc-proxy (package proxy's Reference).
	EngineGRPCProxy = "grpc-proxy"
)

// Engines returns the engine names [NewServer] accepts.
func Engines() []string { return []string{EngineFrame, EngineGRPCProxy} }

// Defaults for ServerConfig fields left zero.
const (
	// DefaultWarmup bounds how long Run waits for the first backend set
	// before it serves clients, so early calls do not fail for want of
	// one. Clients that connect meanwhile wait in the listen backlog.
	DefaultWarmup       = 5 * time.Second
	DefaultDrainTimeout = 15 * time.Second
	// adminDrainGrace bounds the admin server's own shutdown after the
	// data plane has drained.
	adminDrainGrace = time.Second
)

// ServerConfig configures a proxy serving one cluster, or the clusters and
// routes of a configuration file.
type ServerConfig struct {
	// Cluster is the backend pool every stream is sent to. It is ignored
	// when File is set.
	Cluster Config
	// File, if set, holds the clusters and routes (see [File.ServerConfig]):
	// a router picks each stream's cluster, and the clusters and routes
	// are reloaded when the file changes (polled every
	// DefaultPollInterval), on each receive from Reload, and on
	// [Server.Reload].
	File *File
	// Reload, with File, triggers a reload of the file on each receive.
	Reload <-chan os.Signal
	// Hangup, if set, is served while Run runs (the proxy command relays
	// SIGHUP here, with or without a file): each receive reopens the
	// access log's file ([AccessLog.Reopen], for logrotate) and, with
	// File and no Reload, reloads the file as Reload would. With neither,
	// it logs at Info that there is nothing to do.
	Hangup <-chan os.Signal
	// Engine is one of [Engines]; "" means [EngineFrame].
	Engine string
	// Proxy configures the frame engine. Its Picker, DrainTimeout and
	// Logger are set by NewServer; the reference engine uses only its
	// MaxConnections, MaxConcurrentStreams, MaxHeaderListSize,
	// MaxResponseHeaderListSize, PrefaceTimeout and IdleTimeout.
	Proxy proxy.Config
	// MaxMessageSize is the grpc-proxy engine's bound on a message
	// (proxy.ReferenceConfig.MaxMessageSize); the frame engine relays
	// messages of any size without holding them whole.
	MaxMessageSize int
	// DrainTimeout bounds a graceful drain, both when Run's ctx ends and
	// for the connections of a backend that left the set; 0 means
	// DefaultDrainTimeout.
	DrainTimeout time.Duration
	// Warmup bounds the wait for the first backend set; 0 means
	// DefaultWarmup.
	Warmup time.Duration
	// OnDrain, if set, is called once when Run starts draining because
	// its ctx ended (the proxy command restores default signal handling
	// there, so a second signal exits at once).
	OnDrain func()
	// Logger receives the server's logs; nil means slog.Default().
	Logger *slog.Logger
	// Metrics, if set, gets the cluster's Prometheus metrics and is
	// served on the admin endpoint /metrics; nil means no metrics.
	Metrics *prometheus.Registry
	// TLS, if set, terminates TLS on the listener Run serves; nil means
	// cleartext HTTP/2 (h2c). The files are read by NewServer.
	TLS *ServerTLS
	// AccessLog, if set, gets one line per call (see [AccessLog]); the
	// caller closes it after Run returned. Nil means no access log.
	AccessLog *AccessLog
	// Version, if set, describes the binary on the admin status page.
	Version string
	// ReleaseStartupPages makes Run call [ReleaseStartupPages] once the
	// first backend set is in (or the warm-up is over), before it accepts
	// clients: the pages of the binary that only start-up touched leave
	// the process's RSS. The proxy command sets it (--release-startup-pages).
	ReleaseStartupPages bool
	// MutexProfileFraction and BlockProfileRate, when positive, switch the
	// Go runtime's mutex and blocking profiles on for the whole process
	// while Run runs (runtime.SetMutexProfileFraction: one contended
	// unlock in this many is recorded; runtime.SetBlockProfileRate: one
	// blocking event per this many nanoseconds blocked), served on the
	// admin endpoints /debug/pprof/mutex and /debug/pprof/block. Zero
	// leaves a profile off, and its endpoint answers 404 rather than an
	// empty profile. Both cost CPU at every contended lock or blocking
	// event: they are for diagnosis (which lock limits scaling past one
	// CPU), not for steady production. Negative values are an error.
	MutexProfileFraction int
	BlockProfileRate     int
	// MinHeapGoal, when over 4 MiB, keeps the Go collector's heap goal at
	// least this many bytes while Run runs ([KeepMinHeapGoal]): fewer
	// collections while the live heap is small, for at most this much
	// heap. Zero leaves the collector as the runtime sets it; the proxy
	// command sets [DefaultMinHeapGoal] (--gc-min-heap). Process-wide:
	// the first server to run with it rules. Negative is an error.
	MinHeapGoal int64
}

// engine is what both data planes offer.
type engine interface {
	Serve(net.Listener) error
	Shutdown(context.Context) error
	Close() error
	RetainBackends(addrs []string)
}

// Server is a proxy for one cluster: the data plane, the cluster feeding
// it, and the admin endpoints. Create it with [NewServer] and run it with
// [Server.Run].
type Server struct {
	cfg      ServerConfig
	cluster  *Cluster    // nil with a configuration file
	set      *clusterSet // nil without
	engine   engine
	logger   *slog.Logger
	tls      *serverTLS // nil: h2c
	draining atomic.Bool
	// hupReload is the file's reload channel fed by Hangup; nil when
	// there is no file, or Reload is set instead.
	hupReload chan os.Signal
	// listenerLimits count, with a file and metrics, the calls refused at
	// a limit of the listener before they were routed to a cluster
	// (max_streams, max_header_size, a new call over max_conn_buffer):
	// streamlb_limit_rejections_total without a cluster. Read-only.
	listenerLimits map[string]prometheus.Counter
}

// NewServer validates cfg and builds the cluster and the data plane. It
// reads the TLS files, if any, but opens no connection and starts
// nothing.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Engine == "" {
		cfg.Engine = EngineFrame
	}
	if cfg.DrainTimeout < 0 || cfg.Warmup < 0 {
		return nil, errors.New("cluster: drain timeout and warm-up must not be negative")
	}
	if cfg.MutexProfileFraction < 0 || cfg.BlockProfileRate < 0 {
		return nil, errors.New("cluster: mutex profile fraction and block profile rate must not be negative")
	}
	if cfg.MinHeapGoal < 0 {
		return nil, errors.New("cluster: minimum heap goal must not be negative")
	}
	if cfg.DrainTimeout == 0 {
		cfg.DrainTimeout = DefaultDrainTimeout
	}
	if cfg.Warmup == 0 {
		cfg.Warmup = DefaultWarmup
	}
	if cfg.Cluster.Logger == nil {
		cfg.Cluster.Logger = cfg.Logger
	}
	if cfg.Metrics != nil {
		cfg.Cluster.Metrics = cfg.Metrics
	}
	s := &Server{cfg: cfg, logger: cfg.Logger}
	var picker proxy.Picker
	var btls *backendTLS
	pc := cfg.Proxy
	if cfg.File != nil {
		var headers []string // the grpc-proxy engine hands Pick all metadata
		if cfg.Engine == EngineFrame {
			headers = append([]string{}, pickHeaders(cfg.File)...) // not nil: a fixed list
			pc.PickMetadata = headers
		}
		var reg prometheus.Registerer
		if cfg.Metrics != nil {
			reg = cfg.Metrics
		}
		reload := cfg.Reload
		if reload == nil && cfg.Hangup != nil {
			s.hupReload = make(chan os.Signal, 1)
			reload = s.hupReload
		}
		set, err := newClusterSet(cfg.File, cfg.Logger, reg, headers, cfg.Warmup, reload)
		if err != nil {
			return nil, err
		}
		s.set, picker = set, &set.router
		if reg != nil {
			limits := newLimitsVec(prometheus.Labels{"cluster": ""})
			if err := reg.Register(limits); err != nil {
				return nil, fmt.Errorf("cluster: metrics: %w", err)
			}
			s.listenerLimits = limitCounters(limits)
		}
		if cfg.Engine == EngineGRPCProxy {
			// It dials every cluster alike: the file's backend_tls
			// (File.check refuses a cluster's own).
			for _, e := range set.entries {
				btls = e.c.tls
			}
		}
	} else {
		c, err := New(cfg.Cluster)
		if err != nil {
			return nil, err
		}
		s.cluster, picker, btls = c, c.Picker(), c.tls
		if h := cfg.Cluster.Director.HashHeader; h != "" && len(pc.PickMetadata) == 0 {
			// ring_hash reads its key from the stream's metadata.
			pc.PickMetadata = []string{h}
		}
	}
	var err error
	if cfg.TLS != nil {
		if s.tls, err = newServerTLS(*cfg.TLS, cfg.Logger); err != nil {
			return nil, err
		}
	}
	switch cfg.Engine {
	case EngineFrame:
		pc.Picker = picker
		if btls != nil && pc.Dial == nil {
			pc.Dial = btls.dial
		}
		pc.DrainTimeout = cfg.DrainTimeout
		pc.Logger = cfg.Logger
		pc.CountCallEnd, pc.OnCallEnd = s.callEndHooks()
		pc.CountConnectFailure = s.connectFailureHook()
		var fs *proxy.Server
		if fs, err = proxy.New(pc); err == nil {
			s.engine = fs
			if s.set != nil {
				s.set.drainUpstream = fs.DrainUpstream
				s.set.retainUpstream = fs.RetainUpstreamBackends
			}
		}
	case EngineGRPCProxy:
		rc := proxy.ReferenceConfig{Picker: picker, DrainTimeout: cfg.DrainTimeout, Logger: cfg.Logger, NoLoopHeader: pc.NoLoopHeader,
			MaxConnections: pc.MaxConnections, MaxConcurrentStreams: pc.MaxConcurrentStreams, MaxHeaderListSize: pc.MaxHeaderListSize,
			MaxMessageSize: cfg.MaxMessageSize, PrefaceTimeout: pc.PrefaceTimeout, IdleTimeout: pc.IdleTimeout,
			MaxResponseHeaderListSize: pc.MaxResponseHeaderListSize}
		rc.CountCallEnd, rc.OnCallEnd = s.callEndHooks()
		rc.CountConnectFailure = s.connectFailureHook()
		if btls != nil {
			rc.Credentials = btls.credentials()
		}
		var ref *proxy.Reference
		if ref, err = proxy.NewReference(rc); err == nil {
			s.engine = ref
			if s.set != nil {
				s.set.retireBackends = ref.RetireBackends
			}
		}
	default:
		return nil, fmt.Errorf("cluster: unknown engine %q (want %s or %s)", cfg.Engine, EngineFrame, EngineGRPCProxy)
	}
	if err != nil {
		return nil, err
	}
	if fs, ok := s.engine.(*proxy.Server); ok && cfg.Metrics != nil {
		// Client connections belong to the listener, not to a cluster.
		own := ""
		if s.cluster != nil {
			own = s.cluster.Name()
		}
		if err := cfg.Metrics.Register(newConnCollector(fs.Stats, nil, own)); err != nil {
			return nil, fmt.Errorf("cluster: metrics: %w", err)
		}
	}
	return s, nil
}

// callEndHooks are the data plane's call-end hooks: count, the metrics
// counted per call, which only adds to counters and so runs inline
// (proxy.Config.CountCallEnd, ReferenceConfig.CountCallEnd), and log, the
// access log, which writes and so is delivered on the data plane's own
// goroutine (OnCallEnd), with either engine. Each is
// nil when off. With a configuration file, a call is counted in the
// cluster whose current set holds the call's backend.
func (s *Server) callEndHooks() (count, log func(proxy.CallInfo)) {
	al := s.cfg.AccessLog
	if s.set != nil {
		if s.cfg.Metrics != nil {
			count = func(ci proxy.CallInfo) {
				if c := s.set.clusterFor(ci.Upstream, ci.Backend); c != nil {
					if c.metrics != nil {
						c.metrics.callEnd(ci)
					}
					return
				}
				if ci.Upstream == "" && ci.Backend == "" {
					// Refused before it was routed: the listener's.
					if l := s.listenerLimits[ci.Limit]; l != nil {
						l.Inc()
					}
				}
			}
		}
		if al != nil {
			log = func(ci proxy.CallInfo) {
				name := ""
				if c := s.set.clusterFor(ci.Upstream, ci.Backend); c != nil {
					name = c.Name()
				} else {
					// A call routed to a cluster a reload removed
					// since; "" for one refused before it was routed.
					name = ci.Upstream
				}
				al.callEnd(name, ci, s.logger)
			}
		}
		return count, log
	}
	if m := s.cluster.metrics; m != nil {
		count = m.callEnd
	}
	if al != nil {
		name := s.cluster.Name()
		log = func(ci proxy.CallInfo) { al.callEnd(name, ci, s.logger) }
	}
	return count, log
}

// connectFailureHook is either engine's connect-failure hook
// (proxy.Config.CountConnectFailure, ReferenceConfig.CountConnectFailure):
// the failure is counted on the backend in its cluster's metrics, found as
// a call's is (clusterFor: with a configuration file, the cluster named by
// the connection's Upstream, or, from the grpc-proxy engine, which names
// none, the current cluster that has the backend). Nil when metrics are
// off.
func (s *Server) connectFailureHook() func(upstream, backend string, err error) {
	if s.cfg.Metrics == nil {
		return nil
	}
	if s.set != nil {
		return func(upstream, backend string, _ error) {
			if c := s.set.clusterFor(upstream, backend); c != nil && c.metrics != nil {
				c.metrics.connectFailure(backend)
			}
		}
	}
	m := s.cluster.metrics
	if m == nil {
		return nil
	}
	return func(_, backend string, _ error) { m.connectFailure(backend) }
}

// Cluster returns the server's cluster; nil when it serves a
// configuration file.
func (s *Server) Cluster() *Cluster { return s.cluster }

// Reload re-reads the configuration file and applies it, as SIGHUP does,
// and returns why the file was rejected (the running configuration then
// stays). Only for a server with a File, while Run runs; it blocks until
// the reload is done or ctx ends.
func (s *Server) Reload(ctx context.Context) error {
	if s.set == nil {
		return errors.New("cluster: no configuration file to reload")
	}
	return s.set.Reload(ctx)
}

// ready reports whether some cluster has a usable backend.
func (s *Server) ready() bool {
	if s.set != nil {
		return s.set.Ready()
	}
	return s.cluster.Ready()
}

// Ready reports whether the server should get clients: it is not draining
// and its cluster has a healthy backend. /readyz answers from it.
//
// With a configuration file it is ready while some routed cluster has a
// usable backend (one that new calls can go to: not a cluster the routes
// list with weight 0 only), not every one: the proxy is one endpoint for all its
// routes, and taking it out of its Service because one cluster is down
// would fail the calls of the others too (Envoy's /ready, likewise, does
// not follow upstream health). Probes that need a cluster ask
// [Server.ClustersReady], /readyz?cluster=NAME.
func (s *Server) Ready() (ok bool, reason string) {
	switch {
	case s.draining.Load():
		return false, "draining"
	case !s.ready():
		return false, "no usable backend"
	}
	return true, "ready"
}

// ClustersReady reports whether each named cluster, as the current route
// table uses it, has a usable backend and the server is not draining;
// known is false (and reason says which) if a name is no routed
// cluster's. A server of one cluster knows it by its name.
func (s *Server) ClustersReady(names ...string) (ok, known bool, reason string) {
	for _, name := range names {
		var c *Cluster
		for _, rc := range s.Clusters() {
			if rc.Name() == name {
				c = rc
			}
		}
		switch {
		case c == nil:
			return false, false, fmt.Sprintf("cluster %q: no route uses it", name)
		case s.draining.Load():
			return false, true, "draining"
		case !c.Ready():
			return false, true, fmt.Sprintf("cluster %s: no usable backend", name)
		}
	}
	return true, true, "ready"
}

// Run serves clients on ln and, if admin is not nil, the admin endpoints
// (see [Server.AdminHandler]) on admin, until ctx is cancelled; then it
// drains: GOAWAY to clients, in-flight streams get DrainTimeout to finish.
// It takes over both listeners and closes them; with TLS configured it
// terminates TLS on ln. Before serving it waits
// up to Warmup for the first backend set. The admin endpoints outlive the
// drain, so probes see /readyz answer 503 "draining" rather than a refused
// connection. Run blocks, returns nil after a drain (timed out or not) and
// an error if serving or resolving failed; everything it started has
// stopped when it returns.
func (s *Server) Run(ctx context.Context, ln, admin net.Listener) error {
	if s.tls != nil {
		ln = &tlsListener{Listener: ln, cfg: s.tls.config()}
	}
	// The runtime's rates are process-wide: set while Run runs, off again
	// when it returns.
	if r := s.cfg.MutexProfileFraction; r > 0 {
		runtime.SetMutexProfileFraction(r)
		defer runtime.SetMutexProfileFraction(0)
	}
	if r := s.cfg.BlockProfileRate; r > 0 {
		runtime.SetBlockProfileRate(r)
		defer runtime.SetBlockProfileRate(0)
	}
	if n := s.cfg.MinHeapGoal; n > 0 {
		defer KeepMinHeapGoal(n)()
	}
	g, gctx := errgroup.WithContext(ctx)
	// The cluster outlives the drain: the streams still in flight, and
	// their retries, are picked, health-checked and ejected as before, and
	// backends that leave are still drained, until the data plane is done.
	// The drain goroutine below stops it; a cluster error starts the drain.
	cctx, stopCluster := context.WithCancel(context.Background())
	defer stopCluster()
	resolved := s.runClusters(g, cctx)
	if s.cfg.Hangup != nil {
		// Served through the drain too: a log rotated meanwhile is
		// reopened, and a SIGHUP never falls to its default action.
		g.Go(func() error { s.hangupLoop(cctx); return nil })
	}

	// The admin endpoints come first, so liveness probes are answered
	// during the warm-up (/readyz says 503 until a backend is usable), and
	// they outlive the drain, so probes see /readyz answer 503 "draining"
	// rather than a refused connection. A failing admin server is logged;
	// it does not take the data plane down.
	drained := make(chan struct{}) // closed when the data plane has drained
	if admin != nil {
		// WriteTimeout bounds what a client that never reads can make
		// the admin endpoints hold: /debug/pprof/trace?seconds=600 grew
		// the proxy's RSS by 0.4 MB/s (attack round 3). It leaves room
		// for pprof's default 30 s profile; pprof refuses a longer one.
		// The connection cap, the header limit and the bound on bodies
		// keep its clients off the file descriptors and the memory the
		// data plane needs (adminconns.go).
		capped := newAdminConns(admin, adminMaxConns)
		hs := &http.Server{Handler: boundBody(s.AdminHandler()), ReadHeaderTimeout: adminReadTimeout, WriteTimeout: adminWriteTimeout,
			IdleTimeout: 2 * time.Minute, MaxHeaderBytes: adminMaxHeaderBytes, ConnState: capped.ConnState,
			ErrorLog: slog.NewLogLogger(s.logger.Handler(), slog.LevelDebug)}
		g.Go(func() error {
			if err := hs.Serve(capped); !errors.Is(err, http.ErrServerClosed) {
				s.logger.Error("admin endpoints stopped", "err", err)
			}
			return nil
		})
		g.Go(func() error {
			<-drained
			sctx, cancel := context.WithTimeout(context.Background(), adminDrainGrace)
			defer cancel()
			if err := hs.Shutdown(sctx); err != nil {
				hs.Close()
			}
			return nil
		})
		s.logger.Info("admin listening", "addr", admin.Addr().String())
	}

	warm := time.NewTimer(s.cfg.Warmup)
	select {
	case <-resolved:
	case <-warm.C:
		s.logger.Warn("no backend set yet; accepting clients anyway", "waited", s.cfg.Warmup)
	case <-gctx.Done():
	}
	warm.Stop()

	if s.cfg.ReleaseStartupPages {
		// Start-up is over: flags, wiring, package initialisation, the
		// first resolution. What the proxy runs from here maps its pages
		// again.
		if n, err := ReleaseStartupPages(); err != nil {
			s.logger.Warn("could not release start-up pages", "err", err)
		} else {
			s.logger.Debug("released start-up pages", "mapped_bytes", n)
		}
	}

	if s.set != nil {
		s.logger.Info("listening", "addr", ln.Addr().String(), "tls", s.tls != nil, "engine", s.cfg.Engine,
			"config", s.cfg.File.Path, "clusters", len(s.cfg.File.Clusters), "routes", len(s.cfg.File.Routes))
	} else {
		s.logger.Info("listening", "addr", ln.Addr().String(), "tls", s.tls != nil, "engine", s.cfg.Engine,
			"policy", s.cluster.Director().Policy(), "backends", s.cfg.Cluster.Targets)
	}

	g.Go(func() error {
		if err := s.engine.Serve(ln); !errors.Is(err, proxy.ErrServerClosed) {
			return fmt.Errorf("serve: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		<-gctx.Done()
		defer close(drained)
		s.draining.Store(true)
		if ctx.Err() != nil {
			if s.cfg.OnDrain != nil {
				s.cfg.OnDrain()
			}
			s.logger.Info("draining", "drain_timeout", s.cfg.DrainTimeout)
		}
		start := time.Now()
		sctx, cancel := context.WithTimeout(context.Background(), s.cfg.DrainTimeout)
		defer cancel()
		switch err := s.engine.Shutdown(sctx); {
		case errors.Is(err, context.DeadlineExceeded):
			s.logger.Warn("drain timed out; streams still in flight were cut", "drain_timeout", s.cfg.DrainTimeout)
		case err != nil:
			s.logger.Warn("shutdown", "err", err)
		default:
			s.logger.Info("drained", "duration", time.Since(start))
		}
		stopCluster()
		return nil
	})
	return g.Wait()
}

// hangupLoop serves ServerConfig.Hangup until ctx ends: each signal
// reopens the access log's file and asks the file's clusters to reload.
func (s *Server) hangupLoop(ctx context.Context) {
	for {
		var sig os.Signal
		select {
		case <-ctx.Done():
			return
		case sig = <-s.cfg.Hangup:
		}
		did := false
		if al := s.cfg.AccessLog; al.Path() != "" {
			did = true
			if err := al.Reopen(); err != nil {
				s.logger.Error("access log not reopened; lines still go to the file it had open", "signal", sig.String(), "path", al.Path(), "err", err)
			} else {
				s.logger.Info("access log reopened", "signal", sig.String(), "path", al.Path())
			}
		}
		if s.hupReload != nil {
			did = true
			select {
			case s.hupReload <- sig: // a reload pending already covers this one
			default:
			}
		}
		if !did {
			s.logger.Info("nothing to reload: no configuration file and no access log file", "signal", sig.String())
		}
	}
}

// runClusters runs the cluster, or the file's clusters, in g, and returns
// a channel closed once they have their first backend set.
func (s *Server) runClusters(g *errgroup.Group, ctx context.Context) <-chan struct{} {
	if s.set != nil {
		g.Go(func() error { return s.set.Run(ctx, s.engine.RetainBackends) })
		return s.set.resolved
	}
	g.Go(func() error { return s.cluster.Run(ctx, s.engine.RetainBackends) })
	return s.cluster.Resolved()
}
