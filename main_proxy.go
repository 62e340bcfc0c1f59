package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/sync/errgroup"

	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/resolver"
)

// warmupTimeout bounds how long the proxy waits for the first backend set
// before it accepts clients, so early calls do not fail for want of one.
const warmupTimeout = 5 * time.Second

func proxyCommand() *cli.Command {
	return &cli.Command{
		Name:      "proxy",
		Usage:     "run the proxy in front of gRPC backends",
		UsageText: "streamlb proxy --backend TARGET [--backend TARGET ...] [options]",
		Description: "Accepts cleartext HTTP/2 (h2c) gRPC on --listen and sends every stream to\n" +
			"the backend the --policy picks. A TARGET is HOST:PORT[;weight=N], or a DNS\n" +
			"name re-resolved every --dns-refresh: dns:///NAME:PORT (system resolver),\n" +
			"dns://DNSHOST:DNSPORT/NAME:PORT (that DNS server), dns+srv:///_grpc._tcp.NAME\n" +
			"(SRV records, with their weights). Backends that leave the set are drained.\n" +
			"SIGINT or SIGTERM starts a graceful drain: no new connections, GOAWAY to\n" +
			"clients, in-flight streams get --drain-timeout to finish, then the proxy\n" +
			"exits 0. A second signal exits at once.",
		OnUsageError: onUsageError,
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "listen", Value: ":8080", Usage: "`ADDR` to accept gRPC clients on (host:port; port 0 picks a free one)"},
			// Required, but checked in runProxy: urfave/cli would answer a
			// missing required flag with the whole help text.
			&cli.StringSliceFlag{
				Name:    "backend",
				EnvVars: []string{"STREAMLB_BACKENDS"},
				Usage:   "required: backend `TARGET` (HOST:PORT[;weight=N], dns:///NAME:PORT, dns://DNSHOST:DNSPORT/NAME:PORT, dns+srv:///NAME); repeat the flag or give a comma-separated list in",
			},
			&cli.StringFlag{Name: "engine", Value: engineFrame, Usage: "data plane: frame (relays HTTP/2 frames) or grpc-proxy (message-level reference engine)"},
			&cli.DurationFlag{Name: "drain-timeout", Value: 15 * time.Second, Usage: "how long in-flight streams may run on SIGINT/SIGTERM, and on a backend that left the set, before they are cut"},
			&cli.StringFlag{Name: "admin-listen", Usage: "`ADDR` for the admin HTTP endpoints /healthz, /readyz and /backends (off when empty)"},

			// Discovery.
			&cli.DurationFlag{Name: "dns-refresh", Value: resolver.DefaultRefresh, Usage: "how often DNS targets are resolved again (with ±10% jitter)"},
			&cli.BoolFlag{Name: "dns-respect-ttl", Usage: "re-resolve DNS targets when their records' TTL runs out, bounded to 1s..5m, instead of every --dns-refresh"},

			// Balancing.
			&cli.StringFlag{Name: "policy", Value: director.RoundRobin, Usage: "how a backend is picked for each stream, one of: " + strings.Join(director.Policies(), ", ")},
			&cli.IntFlag{Name: "choice-count", Value: director.DefaultChoiceCount, Usage: fmt.Sprintf("backends least_request and peak_ewma sample per pick (2..%d)", director.MaxChoiceCount)},
			&cli.StringFlag{Name: "hash-header", Usage: "request header whose value ring_hash hashes (required with --policy ring_hash)"},
			&cli.DurationFlag{Name: "slow-start", Usage: "ramp a new backend's share up from 10% over this long (0: off)"},

			// Health.
			&cli.DurationFlag{Name: "health-check-interval", Usage: "check every backend over grpc.health.v1 this often (0: no active checks)"},
			&cli.DurationFlag{Name: "health-check-timeout", Value: director.DefaultHealthCheckTimeout, Usage: "bound on one health check"},
			&cli.StringFlag{Name: "health-check-service", Usage: "service name sent in health checks (empty: the server as a whole)"},
			&cli.IntFlag{Name: "healthy-threshold", Value: director.DefaultHealthyThreshold, Usage: "passing checks in a row that make an unhealthy backend healthy"},
			&cli.IntFlag{Name: "unhealthy-threshold", Value: director.DefaultUnhealthyThreshold, Usage: "failing checks in a row that make a backend unhealthy"},
			&cli.IntFlag{Name: "eject-after", Value: director.DefaultEjectAfter, Usage: "streams in a row ending UNAVAILABLE that eject a backend for a while (negative: never)"},
			&cli.DurationFlag{Name: "base-ejection", Value: director.DefaultBaseEjection, Usage: "how long a first ejection lasts; repeated ejections last longer"},
			&cli.IntFlag{Name: "max-ejection-percent", Value: director.DefaultMaxEjectionPercent, Usage: "largest share of backends ejected at once"},

			// Retries and limits.
			&cli.StringSliceFlag{Name: "retry-on", Usage: "`METHOD` (/pkg.Service/Method, or /pkg.Service/ for all) whose UNAVAILABLE answers are retried on another backend; only idempotent methods (frame engine)"},
			&cli.IntFlag{Name: "max-retries", Value: proxy.DefaultMaxRetries, Usage: "further attempts a call may make, transparent retries included; negative: none (frame engine)"},
			&cli.IntFlag{Name: "retry-buffer", Value: proxy.DefaultRetryBufferSize, Usage: "request bytes kept per call so it can be retried; a larger request is not retried once sent (frame engine)"},
			&cli.Int64Flag{Name: "max-streams", Usage: "calls in flight through the proxy; over it calls fail with RESOURCE_EXHAUSTED (0: no cap; frame engine)"},
			&cli.Int64Flag{Name: "max-streams-per-backend", Usage: "calls in flight to one backend; over it calls fail with RESOURCE_EXHAUSTED (0: no cap; frame engine)"},
			&cli.DurationFlag{Name: "connect-timeout", Value: proxy.DefaultConnectTimeout, Usage: "bound on dialing a backend (frame engine)"},
			&cli.UintFlag{Name: "max-concurrent-streams", Value: proxy.DefaultMaxConcurrentStreams, Usage: "streams one client connection may have open, advertised as SETTINGS_MAX_CONCURRENT_STREAMS (frame engine)"},
		}, logFlags("info")...),
		Action: runProxy,
	}
}

// engine is what both data planes offer.
type engine interface {
	Serve(net.Listener) error
	Shutdown(context.Context) error
	Close() error
	RetainBackends(addrs []string)
}

func runProxy(c *cli.Context) error {
	if c.NArg() > 0 {
		return usageErr("unexpected argument %q (backends are given with --backend)", c.Args().First())
	}
	logger, err := newLogger(c, c.App.ErrWriter)
	if err != nil {
		return err
	}
	policy := c.String("policy")
	if !slices.Contains(director.Policies(), policy) {
		return usageErr("unknown --policy %q (want one of %s)", policy, strings.Join(director.Policies(), ", "))
	}
	engineName := c.String("engine")
	if !slices.Contains(engines, engineName) {
		return usageErr("unknown --engine %q (want %s)", engineName, strings.Join(engines, " or "))
	}
	mcs := c.Uint("max-concurrent-streams")
	if mcs == 0 || mcs > math.MaxUint32 {
		return usageErr("--max-concurrent-streams must be in 1..%d, got %d", uint32(math.MaxUint32), mcs)
	}
	for _, f := range []string{"connect-timeout", "dns-refresh"} {
		if c.Duration(f) <= 0 {
			return usageErr("--%s must be positive, got %v", f, c.Duration(f))
		}
	}
	for _, f := range []string{"drain-timeout", "slow-start", "health-check-interval", "health-check-timeout"} {
		if c.Duration(f) < 0 {
			return usageErr("--%s must not be negative, got %v", f, c.Duration(f))
		}
	}
	drain := c.Duration("drain-timeout")
	backends := splitBackends(c.StringSlice("backend"))
	if len(backends) == 0 {
		return usageErr("no backend: give --backend TARGET at least once, or set STREAMLB_BACKENDS")
	}
	res, err := resolver.New(backends, resolver.DNSOptions{
		Refresh:    c.Duration("dns-refresh"),
		RespectTTL: c.Bool("dns-respect-ttl"),
		Logger:     logger,
	})
	if err != nil {
		return usageErr("--backend: %v", err)
	}
	d, err := director.New(director.Config{
		Policy:              policy,
		ChoiceCount:         c.Int("choice-count"),
		HashHeader:          c.String("hash-header"),
		SlowStart:           c.Duration("slow-start"),
		HealthCheckInterval: c.Duration("health-check-interval"),
		HealthCheckTimeout:  c.Duration("health-check-timeout"),
		HealthCheckService:  c.String("health-check-service"),
		HealthyThreshold:    c.Int("healthy-threshold"),
		UnhealthyThreshold:  c.Int("unhealthy-threshold"),
		EjectAfter:          c.Int("eject-after"),
		BaseEjection:        c.Duration("base-ejection"),
		MaxEjectionPercent:  c.Int("max-ejection-percent"),
		ResolveNow:          resolveNow(res),
		Logger:              logger,
	})
	if err != nil {
		return usageErr("%v", err)
	}
	var pickMD []string
	if h := c.String("hash-header"); h != "" {
		pickMD = []string{h}
	}
	var srv engine
	switch engineName {
	case engineFrame:
		srv, err = proxy.New(proxy.Config{
			Picker:               d,
			ConnectTimeout:       c.Duration("connect-timeout"),
			MaxConcurrentStreams: uint32(mcs),
			DrainTimeout:         drain,
			MaxStreams:           c.Int64("max-streams"),
			MaxStreamsPerBackend: c.Int64("max-streams-per-backend"),
			RetryOn:              c.StringSlice("retry-on"),
			MaxRetries:           c.Int("max-retries"),
			RetryBufferSize:      c.Int("retry-buffer"),
			PickMetadata:         pickMD,
			Logger:               logger,
		})
	case engineGRPC:
		srv, err = proxy.NewReference(proxy.ReferenceConfig{Picker: d, DrainTimeout: drain, Logger: logger})
	}
	if err != nil {
		return usageErr("%v", err)
	}
	slog.SetDefault(logger)

	ctx, stop := signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
	defer stop()
	g, gctx := errgroup.WithContext(ctx)
	first := make(chan struct{})
	var once sync.Once
	up := resolver.Tee(d, resolver.AddrsFunc(srv.RetainBackends), resolver.AddrsFunc(func([]string) {
		once.Do(func() { close(first) })
	}))
	g.Go(func() error {
		if err := res.Run(gctx, up); err != nil {
			return fmt.Errorf("resolve backends: %w", err)
		}
		return nil
	})
	g.Go(func() error { return d.Run(gctx) })

	// Wait for the first backend set, briefly, so early calls find one.
	warm := time.NewTimer(warmupTimeout)
	select {
	case <-first:
	case <-warm.C:
		logger.Warn("no backend set yet; accepting clients anyway", "waited", warmupTimeout)
	case <-gctx.Done():
	}
	warm.Stop()

	ln, err := net.Listen("tcp", c.String("listen"))
	if err != nil {
		stop()
		g.Wait()
		return failure(fmt.Errorf("listen: %w", err))
	}
	var draining atomic.Bool
	drained := make(chan struct{}) // closed when the data plane has drained
	if addr := c.String("admin-listen"); addr != "" {
		aln, err := net.Listen("tcp", addr)
		if err != nil {
			ln.Close()
			stop()
			g.Wait()
			return failure(fmt.Errorf("admin listen: %w", err))
		}
		admin := &http.Server{Handler: adminHandler(d, &draining), ReadHeaderTimeout: 5 * time.Second}
		g.Go(func() error {
			if err := admin.Serve(aln); !errors.Is(err, http.ErrServerClosed) {
				return fmt.Errorf("admin: %w", err)
			}
			return nil
		})
		g.Go(func() error {
			// The admin endpoints outlive the drain, so probes see /readyz
			// answer 503 "draining" rather than a refused connection.
			<-drained
			sctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			if err := admin.Shutdown(sctx); err != nil {
				admin.Close()
				logger.Warn("admin shutdown", "err", err)
			}
			return nil
		})
		logger.Info("admin listening", "addr", aln.Addr().String())
	}
	logger.Info("listening", "addr", ln.Addr().String(), "engine", engineName, "policy", policy, "backends", backends)

	g.Go(func() error {
		if err := srv.Serve(ln); !errors.Is(err, proxy.ErrServerClosed) {
			return fmt.Errorf("serve: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		<-gctx.Done()
		defer close(drained)
		draining.Store(true)
		if ctx.Err() != nil {
			// Restore default signal handling: a second signal ends the
			// process without waiting for the drain.
			stop()
			logger.Info("draining", "drain_timeout", drain)
		}
		start := time.Now()
		sctx, cancel := context.WithTimeout(context.Background(), drain)
		defer cancel()
		switch err := srv.Shutdown(sctx); {
		case errors.Is(err, context.DeadlineExceeded):
			logger.Warn("drain timed out; streams still in flight were cut", "drain_timeout", drain)
		case err != nil:
			logger.Warn("shutdown", "err", err)
		default:
			logger.Info("drained", "duration", time.Since(start))
		}
		return nil
	})
	if err := g.Wait(); err != nil {
		return failure(err)
	}
	return nil
}

// resolveNow returns the resolver's early re-resolution trigger, if it has
// one.
func resolveNow(r resolver.Resolver) func() {
	if rn, ok := r.(interface{ ResolveNow() }); ok {
		return rn.ResolveNow
	}
	return nil
}

// adminHandler serves /healthz (the process is alive), /readyz (it has a
// pickable backend and is not draining: 503 otherwise, so an orchestrator
// stops sending it clients) and /backends (the director's per-backend
// state as JSON).
func adminHandler(d *director.Director, draining *atomic.Bool) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if draining.Load() {
			http.Error(w, "draining", http.StatusServiceUnavailable)
			return
		}
		// Ready while any backend can be picked; with every backend failing
		// its health checks the director still picks among them (panic
		// mode), and taking the whole fleet of proxies out would not help.
		for _, b := range d.Backends() {
			if !b.Ejected {
				fmt.Fprintln(w, "ready")
				return
			}
		}
		http.Error(w, "no usable backend", http.StatusServiceUnavailable)
	})
	mux.HandleFunc("GET /backends", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(d.Backends())
	})
	return mux
}

// splitBackends flattens --backend values, which may themselves be
// comma-separated lists (as $STREAMLB_BACKENDS is), dropping empty entries.
func splitBackends(values []string) []string {
	var out []string
	for _, v := range values {
		for _, b := range strings.Split(v, ",") {
			if b = strings.TrimSpace(b); b != "" {
				out = append(out, b)
			}
		}
	}
	return out
}
