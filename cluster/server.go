package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
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

// ServerConfig configures a proxy serving one cluster.
type ServerConfig struct {
	// Cluster is the backend pool every stream is sent to.
	Cluster Config
	// Engine is one of [Engines]; "" means [EngineFrame].
	Engine string
	// Proxy configures the frame engine. Its Picker, DrainTimeout and
	// Logger are set by NewServer; the reference engine uses none of it.
	Proxy proxy.Config
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
	cluster  *Cluster
	engine   engine
	logger   *slog.Logger
	tls      *serverTLS // nil: h2c
	draining atomic.Bool
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
	c, err := New(cfg.Cluster)
	if err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, cluster: c, logger: cfg.Logger}
	if cfg.TLS != nil {
		if s.tls, err = newServerTLS(*cfg.TLS, cfg.Logger); err != nil {
			return nil, err
		}
	}
	switch cfg.Engine {
	case EngineFrame:
		pc := cfg.Proxy
		pc.Picker = c.Picker()
		if c.tls != nil && pc.Dial == nil {
			pc.Dial = c.tls.dial
		}
		pc.DrainTimeout = cfg.DrainTimeout
		pc.Logger = cfg.Logger
		pc.OnCallEnd = s.callEndHook()
		if h := cfg.Cluster.Director.HashHeader; h != "" && len(pc.PickMetadata) == 0 {
			// ring_hash reads its key from the stream's metadata.
			pc.PickMetadata = []string{h}
		}
		s.engine, err = proxy.New(pc)
	case EngineGRPCProxy:
		rc := proxy.ReferenceConfig{Picker: c.Picker(), DrainTimeout: cfg.DrainTimeout, Logger: cfg.Logger, OnCallEnd: s.callEndHook()}
		if c.tls != nil {
			rc.Credentials = c.tls.credentials()
		}
		s.engine, err = proxy.NewReference(rc)
	default:
		return nil, fmt.Errorf("cluster: unknown engine %q (want %s or %s)", cfg.Engine, EngineFrame, EngineGRPCProxy)
	}
	if err != nil {
		return nil, err
	}
	if fs, ok := s.engine.(*proxy.Server); ok && cfg.Metrics != nil {
		cfg.Metrics.MustRegister(newConnCollector(fs.Stats, prometheus.Labels{"cluster": c.Name()}))
	}
	return s, nil
}

// callEndHook is the data plane's call-end hook: the access log and the
// metrics counted per call, or nil when neither is on.
func (s *Server) callEndHook() func(proxy.CallInfo) {
	al, m, name := s.cfg.AccessLog, s.cluster.metrics, s.cluster.Name()
	switch {
	case al == nil && m == nil:
		return nil
	case al == nil:
		return m.callEnd
	case m == nil:
		return func(ci proxy.CallInfo) { al.callEnd(name, ci) }
	}
	return func(ci proxy.CallInfo) {
		m.callEnd(ci)
		al.callEnd(name, ci)
	}
}

// Cluster returns the server's cluster.
func (s *Server) Cluster() *Cluster { return s.cluster }

// Ready reports whether the server should get clients: it is not draining
// and its cluster has a healthy backend. /readyz answers from it.
func (s *Server) Ready() (ok bool, reason string) {
	switch {
	case s.draining.Load():
		return false, "draining"
	case !s.cluster.Ready():
		return false, "no usable backend"
	}
	return true, "ready"
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
	g, gctx := errgroup.WithContext(ctx)
	// The cluster outlives the drain: the streams still in flight, and
	// their retries, are picked, health-checked and ejected as before, and
	// backends that leave are still drained, until the data plane is done.
	// The drain goroutine below stops it; a cluster error starts the drain.
	cctx, stopCluster := context.WithCancel(context.Background())
	defer stopCluster()
	g.Go(func() error { return s.cluster.Run(cctx, s.engine.RetainBackends) })

	// The admin endpoints come first, so liveness probes are answered
	// during the warm-up (/readyz says 503 until a backend is usable), and
	// they outlive the drain, so probes see /readyz answer 503 "draining"
	// rather than a refused connection. A failing admin server is logged;
	// it does not take the data plane down.
	drained := make(chan struct{}) // closed when the data plane has drained
	if admin != nil {
		hs := &http.Server{Handler: s.AdminHandler(), ReadHeaderTimeout: 5 * time.Second, ErrorLog: slog.NewLogLogger(s.logger.Handler(), slog.LevelDebug)}
		g.Go(func() error {
			if err := hs.Serve(admin); !errors.Is(err, http.ErrServerClosed) {
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
	case <-s.cluster.Resolved():
	case <-warm.C:
		s.logger.Warn("no backend set yet; accepting clients anyway", "waited", s.cfg.Warmup)
	case <-gctx.Done():
	}
	warm.Stop()

	s.logger.Info("listening", "addr", ln.Addr().String(), "tls", s.tls != nil, "engine", s.cfg.Engine,
		"policy", s.cluster.Director().Policy(), "backends", s.cfg.Cluster.Targets)

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
