package main

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"os"
	"os/signal"
	"runtime/debug"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/urfave/cli/v2"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/resolver"
)

func proxyCommand() *cli.Command {
	return &cli.Command{
		Name:      "proxy",
		Usage:     "run the proxy in front of gRPC backends",
		UsageText: "streamlb proxy --backend TARGET [--backend TARGET ...] [options]\n   streamlb proxy --config FILE [--log-level L] [--log-format F] [--access-log PATH] [--release-startup-pages=false]",
		Description: "Accepts cleartext HTTP/2 (h2c) gRPC on --listen, or TLS with --tls-cert, and\n" +
			"sends every stream to the backend the --policy picks. A TARGET is\n" +
			"HOST:PORT[;weight=N], or a DNS name re-resolved every --dns-refresh:\n" +
			"dns:///NAME:PORT (system resolver), dns://DNSHOST:DNSPORT/NAME:PORT (that\n" +
			"DNS server), dns+srv:///_grpc._tcp.NAME (SRV records, with their weights).\n" +
			"Backends that leave the set are drained. TLS to backends: --backend-tls-ca.\n" +
			"SIGINT or SIGTERM starts a graceful drain: no new connections, GOAWAY to\n" +
			"clients, in-flight streams get --drain-timeout to finish, then the proxy\n" +
			"exits 0. A second signal exits at once. SIGHUP reopens the --access-log\n" +
			"file (for logrotate) and, with --config, reloads the file; it never stops\n" +
			"the proxy.\n\n" +
			"--config FILE takes everything from a YAML file instead: listeners, named\n" +
			"clusters, routes by gRPC service, method prefix and request headers, rate\n" +
			"limits. Its clusters and routes are reloaded on SIGHUP and when the file\n" +
			"changes. It cannot be mixed with the other flags, except --log-level,\n" +
			"--log-format, --log-buffer, --access-log, --release-startup-pages, --gc-min-heap and the contention\n" +
			"profiles' --mutex-profile-fraction and --block-profile-rate: the file would\n" +
			"silently win, so the mix is an error.",
		OnUsageError: onUsageError,
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "config", Usage: "YAML configuration `FILE` (clusters, routes, rate limits; reloaded on SIGHUP and on change); excludes the other flags but --log-*, --access-log, --release-startup-pages, --gc-min-heap and the contention profiles'"},
			&cli.StringFlag{Name: "listen", Value: ":8080", Usage: "`ADDR` to accept gRPC clients on (host:port; port 0 picks a free one)"},
			// Required, but checked in runProxy: urfave/cli would answer a
			// missing required flag with the whole help text.
			&cli.StringSliceFlag{
				Name:    "backend",
				EnvVars: []string{"STREAMLB_BACKENDS"},
				Usage:   "required: backend `TARGET` (HOST:PORT[;weight=N], dns:///NAME:PORT, dns://DNSHOST:DNSPORT/NAME:PORT, dns+srv:///NAME, etcd://HOST:PORT[,...]/PREFIX, zk://HOST:PORT[,...]/PATH); repeat the flag or give a comma-separated list in",
			},
			&cli.StringFlag{Name: "engine", Value: cluster.EngineFrame, Usage: "data plane: frame (relays HTTP/2 frames) or grpc-proxy (message-level reference engine)"},
			&cli.DurationFlag{Name: "drain-timeout", Value: cluster.DefaultDrainTimeout, Usage: "how long in-flight streams may run on SIGINT/SIGTERM, and on a backend that left the set, before they are cut"},
			&cli.StringFlag{Name: "admin-listen", Usage: "`ADDR` for the admin HTTP endpoints / (live status page), /status.json, /healthz, /readyz, /backends, /metrics and /debug/pprof/ (off when empty)"},
			&cli.StringFlag{Name: "access-log", Usage: "write one line per call to `PATH` (appended, and opened again on SIGHUP; - or stderr for stderr), in --log-format; allowed beside --config"},
			&cli.BoolFlag{Name: "release-startup-pages", Value: true, Usage: "once started, unmap the binary's code and read-only data that start-up touched and drop them from the page cache, so RSS counts what the running proxy uses (Linux; pages touched later are read from the file); allowed beside --config"},
			&cli.BoolFlag{Name: "metrics", Value: true, Usage: "keep Prometheus metrics, served on /metrics of --admin-listen (--metrics=false: none)"},
			&cli.IntFlag{Name: "mutex-profile-fraction", Usage: "record one contended unlock in `N` for /debug/pprof/mutex of --admin-listen (0: off, and that endpoint answers 404; costs CPU: for diagnosis); allowed beside --config"},
			&cli.Int64Flag{Name: "gc-min-heap", Value: cluster.DefaultMinHeapGoal, Usage: "keep the Go collector's heap goal at least `BYTES` while the live heap is small: fewer collections for at most this much heap (4 MiB or less: the runtime's own minimum, 4 MiB; ignored when GOGC is set); allowed beside --config"},
			&cli.IntFlag{Name: "block-profile-rate", Usage: "record a blocking event per `NS` nanoseconds blocked for /debug/pprof/block of --admin-listen (0: off, and that endpoint answers 404; costs CPU: for diagnosis); allowed beside --config"},

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
			&cli.IntFlag{Name: "eject-after", Value: director.DefaultEjectAfter, Usage: "streams in a row ending UNAVAILABLE that eject a backend for a while (0: the default; negative: never)"},
			&cli.DurationFlag{Name: "base-ejection", Value: director.DefaultBaseEjection, Usage: "how long a first ejection lasts; repeated ejections last longer"},
			&cli.IntFlag{Name: "max-ejection-percent", Value: director.DefaultMaxEjectionPercent, Usage: "largest share of backends ejected at once"},

			// Retries and limits.
			&cli.StringSliceFlag{Name: "retry-on", Usage: "`METHOD` (/pkg.Service/Method, or /pkg.Service/ for all) whose UNAVAILABLE answers are retried on another backend; only idempotent methods (frame engine)"},
			&cli.IntFlag{Name: "max-retries", Value: proxy.DefaultMaxRetries, Usage: "further attempts a call may make, transparent retries included (0 or negative: none; frame engine)"},
			&cli.IntFlag{Name: "retry-buffer", Value: proxy.DefaultRetryBufferSize, Usage: "request bytes kept per call so it can be retried; a larger request is not retried once sent (0: the default; negative: no retries; frame engine)"},
			&cli.IntFlag{Name: "response-holdback", Value: proxy.DefaultResponseHoldback, Usage: "largest gRPC response message (bytes, the length in its prefix) held back until complete, so a backend dying mid-message gives the client the whole messages before it and UNAVAILABLE, not a torn message (0: off; frame engine)"},
			&cli.IntFlag{Name: "retry-budget", Value: proxy.DefaultRetryBudget, Usage: "retry throttling (gRFC A6): tokens in the bucket; failed calls take one, UNAVAILABLE answers of --retry-on methods are retried only while over half are left (0: none, no UNAVAILABLE answer is retried; frame engine)"},
			&cli.Float64Flag{Name: "retry-budget-ratio", Value: proxy.DefaultRetryBudgetRatio, Usage: "tokens a successful call gives back to the retry budget (above 0, gRFC A6; frame engine)"},
			&cli.Int64Flag{Name: "max-streams", Usage: "calls in flight through the proxy; over it calls fail with RESOURCE_EXHAUSTED (0: no cap; frame engine)"},
			&cli.Int64Flag{Name: "max-streams-per-backend", Usage: "calls in flight to one backend; over it calls fail with RESOURCE_EXHAUSTED (0: no cap; frame engine)"},
			&cli.DurationFlag{Name: "connect-timeout", Value: proxy.DefaultConnectTimeout, Usage: "bound on dialing a backend (frame engine)"},
			&cli.DurationFlag{Name: "handshake-timeout", Value: proxy.DefaultHandshakeTimeout, Usage: "bound on a backend's HTTP/2 handshake; a call waits at most this (and a quarter of its deadline) for a new connection before going elsewhere (frame engine)"},
			&cli.IntFlag{Name: "max-backend-conns", Value: proxy.DefaultMaxBackendConns, Usage: "connections to one backend address taking new streams (those going away, finishing theirs, are not counted); when all are full a call goes to another backend, else waits for a slot (--max-backend-pending) (negative: no cap; frame engine)"},
			&cli.IntFlag{Name: "max-backend-pending", Value: proxy.DefaultMaxBackendPending, Usage: "calls that may wait for a stream slot on one backend whose connections are all full (--max-backend-conns); past it a call fails with UNAVAILABLE (negative: none wait; frame engine)"},
			&cli.DurationFlag{Name: "backend-pending-timeout", Value: proxy.DefaultBackendPendingTimeout, Usage: "how long a call waits for that slot before it fails with UNAVAILABLE (frame engine)"},
			&cli.DurationFlag{Name: "backend-idle-timeout", Value: proxy.DefaultBackendIdleTimeout, Usage: "close a backend connection gracefully (GOAWAY) after this long without a stream (negative: never; frame engine)"},
			&cli.DurationFlag{Name: "backend-keepalive-time", Value: proxy.DefaultBackendKeepaliveTime, Usage: "PING a backend connection with streams after this long without a frame from it; keep it at or above the backends' keepalive MinTime (negative: no PINGs; frame engine)"},
			&cli.DurationFlag{Name: "backend-keepalive-timeout", Value: proxy.DefaultBackendKeepaliveTimeout, Usage: "close a backend connection, failing its calls with UNAVAILABLE, when nothing arrives this long after a keepalive PING (frame engine)"},
			&cli.IntFlag{Name: "max-connections", Value: proxy.DefaultMaxConnections, Usage: "client connections served at once; more are closed as soon as accepted (negative: no cap; both engines)"},
			&cli.DurationFlag{Name: "idle-timeout", Value: proxy.DefaultIdleTimeout, Usage: "close a client connection gracefully (GOAWAY) after this long without a stream (negative: never; both engines)"},
			&cli.DurationFlag{Name: "request-idle-timeout", Value: proxy.DefaultRequestIdleTimeout, Usage: "end a call DEADLINE_EXCEEDED whose request is not complete after this long with no DATA from the client and no response frame toward it (negative: never; frame engine)"},
			&cli.DurationFlag{Name: "write-timeout", Value: proxy.DefaultWriteTimeout, Usage: "close a client or backend connection that does not read what the proxy writes for this long (negative: no bound; frame engine)"},
			&cli.UintFlag{Name: "max-header-list-size", Value: proxy.DefaultMaxHeaderListSize, Usage: "bytes of a client's request header list (RFC 9113 §6.5.2 size), advertised to clients; over it a call fails RESOURCE_EXHAUSTED (frame engine; grpc-proxy closes the connection)"},
			&cli.UintFlag{Name: "max-response-header-list-size", Value: proxy.DefaultMaxResponseHeaderListSize, Usage: "bytes of a backend's response header or trailer list, advertised to backends; over it a call fails INTERNAL (both engines)"},
			&cli.IntFlag{Name: "backend-stream-window", Value: proxy.DefaultBackendStreamWindow, Usage: "initial flow-control window granted to backends per stream: what a client that does not read can make the proxy hold per stream (frame engine)"},
			&cli.IntFlag{Name: "backend-stream-window-max", Value: proxy.DefaultBackendMaxStreamWindow, Usage: "what a backend stream's window grows to while its client drains the answer, within the connection's buffer budget (frame engine)"},
			&cli.Int64Flag{Name: "max-conn-buffer", Value: proxy.DefaultMaxConnBufferedBytes, Usage: "bytes of buffers one client connection may hold in the proxy, requests, answers, retry copies and header blocks together; past it new calls, and answers whose headers would not fit, fail RESOURCE_EXHAUSTED (negative: no bound; frame engine)"},
			&cli.BoolFlag{Name: "loop-header", Value: true, Usage: "add a streamlb-via request header naming this proxy (to one request in 16, and to every request that carries one already), and refuse a request that comes back with it three times (a forwarding loop); =false for backends known not to be proxies"},
			&cli.IntFlag{Name: "max-message-size", Value: proxy.DefaultReferenceMaxMessageSize, Usage: "largest gRPC message in `BYTES`, either way, for the grpc-proxy engine, which holds each whole; over it a call fails RESOURCE_EXHAUSTED (negative: no bound; the frame engine relays any size)"},
			&cli.UintFlag{Name: "max-concurrent-streams", Value: proxy.DefaultMaxConcurrentStreams, Usage: "streams one client connection may have open, advertised as SETTINGS_MAX_CONCURRENT_STREAMS (both engines)"},

			// TLS.
			&cli.StringFlag{Name: "tls-cert", Usage: "PEM certificate `FILE` (chain, leaf first): terminate TLS on --listen (ALPN h2, TLS 1.2+); reloaded when it changes (needs --tls-key)"},
			&cli.StringFlag{Name: "tls-key", Usage: "PEM private key `FILE` of --tls-cert"},
			&cli.StringFlag{Name: "tls-client-ca", Usage: "PEM CA `FILE`: require client certificates signed by it (mutual TLS); reloaded when it changes"},
			&cli.StringFlag{Name: "backend-tls-ca", Usage: "PEM CA `FILE` backend certificates must chain to: turns TLS to backends on, health checks included"},
			&cli.StringFlag{Name: "backend-tls-server-name", Usage: "`NAME` backend certificates are checked against (default: each backend's address, which must then be an IP SAN)"},
			&cli.StringFlag{Name: "backend-tls-cert", Usage: "PEM client certificate `FILE` presented to backends (mutual TLS; needs --backend-tls-key and --backend-tls-ca)"},
			&cli.StringFlag{Name: "backend-tls-key", Usage: "PEM private key `FILE` of --backend-tls-cert"},
		}, append(registryFlags(), logFlags("info")...)...),
		Action: runProxy,
	}
}

func runProxy(c *cli.Context) error {
	if c.NArg() > 0 {
		return usageErr("unexpected argument %q (backends are given with --backend)", c.Args().First())
	}
	// SIGHUP reloads the file and reopens the access log file, with or
	// without --config: logrotate's "postrotate kill -HUP" must not end
	// the process (its default action) and cut the calls in flight. Caught
	// before anything else and until the very end, the log's last flush
	// included (up to 2 s on a slow stderr): a SIGHUP then killed the
	// process and lost its last lines (attack round 5).
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	// Deferred before the rest, so it runs after it: the lines of the
	// drain are out before the command returns.
	logger, lw, err := newLogger(c, c.App.ErrWriter)
	if err != nil {
		return err
	}
	defer lw.Close()
	var cfg cluster.ServerConfig
	listen, adminListen := c.String("listen"), c.String("admin-listen")
	if path := c.String("config"); path != "" {
		if cfg, listen, adminListen, err = fileConfig(c, path, logger); err != nil {
			return err
		}
	} else if cfg, err = proxyConfig(c, logger); err != nil {
		return err
	}
	cfg.Hangup = hup
	// The contention profiles are the process's, not the file's: they go
	// beside --config too.
	cfg.MutexProfileFraction, cfg.BlockProfileRate = c.Int("mutex-profile-fraction"), c.Int("block-profile-rate")
	if cfg.MutexProfileFraction < 0 || cfg.BlockProfileRate < 0 {
		return usageErr("--mutex-profile-fraction and --block-profile-rate must not be negative")
	}
	if cfg.MinHeapGoal = c.Int64("gc-min-heap"); cfg.MinHeapGoal < 0 {
		return usageErr("--gc-min-heap must not be negative")
	}
	if path := c.String("access-log"); path != "" {
		// "-" shares the log's writer: neither waits for stderr.
		al, err := cluster.OpenAccessLog(path, c.String("log-format"), lw)
		if err != nil {
			return usageErr("--access-log: %v", err)
		}
		defer al.Close()
		cfg.AccessLog = al
	}
	ctx, stop := signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
	defer stop()
	// Restore default signal handling once draining: a second signal ends
	// the process without waiting for the drain.
	cfg.OnDrain = stop
	cfg.Version = buildVersion(debug.ReadBuildInfo)
	cfg.ReleaseStartupPages = c.Bool("release-startup-pages")
	srv, err := cluster.NewServer(cfg)
	if te := (*cluster.TargetError)(nil); errors.As(err, &te) {
		return usageErr("--backend: %v", te.Err)
	} else if err != nil {
		return usageErr("%v", err)
	}
	slog.SetDefault(logger)
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return failure(fmt.Errorf("listen: %w", err))
	}
	var admin net.Listener
	if addr := adminListen; addr != "" {
		if admin, err = net.Listen("tcp", addr); err != nil {
			ln.Close()
			return failure(fmt.Errorf("admin listen: %w", err))
		}
	}
	if err := srv.Run(ctx, ln, admin); err != nil {
		return failure(err)
	}
	return nil
}

// proxyConfig turns the proxy command's flags into the wiring's settings,
// rejecting values the packages would not catch with a usage error.
func proxyConfig(c *cli.Context, logger *slog.Logger) (cluster.ServerConfig, error) {
	var zero cluster.ServerConfig
	if p := c.String("policy"); !slices.Contains(director.Policies(), p) {
		return zero, usageErr("unknown --policy %q (want one of %s)", p, strings.Join(director.Policies(), ", "))
	}
	if e := c.String("engine"); !slices.Contains(cluster.Engines(), e) {
		return zero, usageErr("unknown --engine %q (want %s)", e, strings.Join(cluster.Engines(), " or "))
	}
	mcs := c.Uint("max-concurrent-streams")
	if mcs == 0 || mcs > math.MaxUint32 {
		return zero, usageErr("--max-concurrent-streams must be in 1..%d, got %d", uint32(math.MaxUint32), mcs)
	}
	// The header list sizes are SETTINGS values, 32 bits: a larger flag
	// value wrapped, 4294967297 to a limit of 1 byte that failed every
	// call, 4294967296 to 0, the default.
	for _, f := range []string{"max-header-list-size", "max-response-header-list-size"} {
		if v := c.Uint(f); v > math.MaxUint32 {
			return zero, usageErr("--%s must be at most %d, got %d", f, uint32(math.MaxUint32), v)
		}
	}
	maxConns := c.Int("max-connections")
	if maxConns == 0 {
		return zero, usageErr("--max-connections must not be 0 (negative: no cap)")
	}
	if c.Int("max-backend-conns") == 0 {
		return zero, usageErr("--max-backend-conns must not be 0 (negative: no cap)")
	}
	if c.Int("max-backend-pending") == 0 {
		return zero, usageErr("--max-backend-pending must not be 0 (negative: no call waits)")
	}
	if c.Int("retry-budget") < 0 {
		return zero, usageErr("--retry-budget must not be negative (0: no UNAVAILABLE answer is retried), got %d", c.Int("retry-budget"))
	}
	if r := c.Float64("retry-budget-ratio"); r <= 0 {
		// gRFC A6: token_ratio must be greater than 0; 0 silently meant
		// the default.
		return zero, usageErr("--retry-budget-ratio must be positive (gRFC A6), got %v", r)
	}
	for _, f := range []string{"connect-timeout", "handshake-timeout", "backend-keepalive-timeout", "backend-pending-timeout", "dns-refresh"} {
		if c.Duration(f) <= 0 {
			return zero, usageErr("--%s must be positive, got %v", f, c.Duration(f))
		}
	}
	for _, f := range []string{"drain-timeout", "slow-start", "health-check-interval", "health-check-timeout"} {
		if c.Duration(f) < 0 {
			return zero, usageErr("--%s must not be negative, got %v", f, c.Duration(f))
		}
	}
	backends := splitBackends(c.StringSlice("backend"))
	if len(backends) == 0 {
		return zero, usageErr("no backend: give --backend TARGET at least once, or set STREAMLB_BACKENDS")
	}
	serverTLS, backendTLS, err := tlsConfig(c)
	if err != nil {
		return zero, err
	}
	etcdOpts, zkOpts, err := registryOptions(c)
	if err != nil {
		return zero, err
	}
	drain := c.Duration("drain-timeout")
	if drain == 0 {
		drain = time.Nanosecond // 0 means: cut at once
	}
	return cluster.ServerConfig{
		Cluster: cluster.Config{
			Targets:       backends,
			DNSRefresh:    c.Duration("dns-refresh"),
			DNSRespectTTL: c.Bool("dns-respect-ttl"),
			Etcd:          etcdOpts,
			ZK:            zkOpts,
			BackendTLS:    backendTLS,
			Director: director.Config{
				Policy:              c.String("policy"),
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
			},
		},
		Engine: c.String("engine"),
		Proxy: proxy.Config{
			ConnectTimeout:            c.Duration("connect-timeout"),
			HandshakeTimeout:          c.Duration("handshake-timeout"),
			MaxConcurrentStreams:      uint32(mcs),
			MaxConnections:            maxConns,
			IdleTimeout:               nonZero(c.Duration("idle-timeout")),
			RequestIdleTimeout:        nonZero(c.Duration("request-idle-timeout")),
			MaxBackendConns:           c.Int("max-backend-conns"),
			MaxBackendPending:         c.Int("max-backend-pending"),
			BackendPendingTimeout:     c.Duration("backend-pending-timeout"),
			BackendIdleTimeout:        nonZero(c.Duration("backend-idle-timeout")),
			BackendKeepaliveTime:      nonZero(c.Duration("backend-keepalive-time")),
			BackendKeepaliveTimeout:   c.Duration("backend-keepalive-timeout"),
			WriteTimeout:              nonZero(c.Duration("write-timeout")),
			MaxStreams:                c.Int64("max-streams"),
			MaxStreamsPerBackend:      c.Int64("max-streams-per-backend"),
			RetryOn:                   c.StringSlice("retry-on"),
			MaxRetries:                retriesFlag(c.Int("max-retries")),
			NoLoopHeader:              !c.Bool("loop-header"),
			RetryBufferSize:           c.Int("retry-buffer"),
			ResponseHoldback:          holdbackFlag(c),
			RetryBudget:               budgetFlag(c.Int("retry-budget")),
			RetryBudgetRatio:          c.Float64("retry-budget-ratio"),
			MaxHeaderListSize:         uint32(c.Uint("max-header-list-size")),
			MaxResponseHeaderListSize: uint32(c.Uint("max-response-header-list-size")),
			MaxConnBufferedBytes:      c.Int64("max-conn-buffer"),
			BackendStreamWindow:       clampInt32(c.Int("backend-stream-window")),
			BackendMaxStreamWindow:    clampInt32(c.Int("backend-stream-window-max")),
		},
		MaxMessageSize: c.Int("max-message-size"),
		DrainTimeout:   drain,
		TLS:            serverTLS,
		Logger:         logger,
		Metrics:        newRegistry(c.Bool("metrics")),
	}, nil
}

// clampInt32 is v within int32's range, for proxy.Config to check: a
// conversion alone wrapped a value past it, -4294867296 to a valid
// 100000.
func clampInt32(v int) int32 {
	return int32(min(max(v, math.MinInt32), math.MaxInt32))
}

// holdbackFlag is --response-holdback for proxy.Config: 0 (the library's
// default, which shrinks to fit --backend-stream-window-max) when the flag
// is not given, -1 (off) for 0.
func holdbackFlag(c *cli.Context) int {
	if !c.IsSet("response-holdback") {
		return 0
	}
	return offIfZero(c.Int("response-holdback"))
}

// fileConfig loads the --config file and returns the server's settings
// and listen addresses. The other proxy flags are refused beside it.
func fileConfig(c *cli.Context, path string, logger *slog.Logger) (cluster.ServerConfig, string, string, error) {
	var zero cluster.ServerConfig
	// The registry passwords' environment variables may be set for the
	// file's password_env to name them.
	fromEnv := map[string]string{"etcd-password": "STREAMLB_ETCD_PASSWORD", "zk-password": "STREAMLB_ZK_PASSWORD"}
	for _, name := range c.FlagNames() {
		if env, ok := fromEnv[name]; ok && c.String(name) == os.Getenv(env) {
			continue
		}
		// --release-startup-pages, the contention profiles and the access
		// log are about the process, not the proxy's configuration, like
		// the log flags.
		if name != "config" && name != "release-startup-pages" && name != "gc-min-heap" && name != "access-log" && !strings.HasPrefix(name, "log-") && !strings.HasSuffix(name, "-profile-fraction") &&
			!strings.HasSuffix(name, "-profile-rate") && c.IsSet(name) {
			return zero, "", "", usageErr("--%s cannot be used with --config: put the setting in %s (only --log-level, --log-format, --log-buffer, --access-log, --release-startup-pages, --gc-min-heap, --mutex-profile-fraction and --block-profile-rate go beside --config)", name, path)
		}
	}
	f, err := cluster.LoadFile(path)
	if err != nil {
		return zero, "", "", usageErr("%v", err)
	}
	cfg := f.ServerConfig()
	cfg.Logger = logger
	cfg.Metrics = newRegistry(f.MetricsOn())
	listen := f.Listen
	if listen == "" {
		listen = ":8080"
	}
	return cfg, listen, f.AdminListen, nil
}

// tlsConfig reads the TLS flags; nil means that side is cleartext. The
// files themselves are read by cluster.NewServer.
func tlsConfig(c *cli.Context) (*cluster.ServerTLS, *cluster.BackendTLS, error) {
	var st *cluster.ServerTLS
	cert, key, ca := c.String("tls-cert"), c.String("tls-key"), c.String("tls-client-ca")
	switch {
	case (cert == "") != (key == ""):
		return nil, nil, usageErr("--tls-cert and --tls-key go together")
	case cert == "" && ca != "":
		return nil, nil, usageErr("--tls-client-ca needs --tls-cert and --tls-key")
	case cert != "":
		st = &cluster.ServerTLS{CertFile: cert, KeyFile: key, ClientCAFile: ca}
	}
	var bt *cluster.BackendTLS
	bca, name := c.String("backend-tls-ca"), c.String("backend-tls-server-name")
	bcert, bkey := c.String("backend-tls-cert"), c.String("backend-tls-key")
	switch {
	case (bcert == "") != (bkey == ""):
		return nil, nil, usageErr("--backend-tls-cert and --backend-tls-key go together")
	case bca == "" && (name != "" || bcert != ""):
		return nil, nil, usageErr("--backend-tls-server-name and --backend-tls-cert need --backend-tls-ca, which turns TLS to backends on")
	case bca != "":
		bt = &cluster.BackendTLS{CAFile: bca, ServerName: name, CertFile: bcert, KeyFile: bkey}
	}
	return st, bt, nil
}

// newRegistry returns a Prometheus registry with the Go runtime's and the
// process's collectors, or nil if metrics are off.
func newRegistry(on bool) *prometheus.Registry {
	if !on {
		return nil
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// offIfZero maps a size flag's 0 ("off") to the proxy.Config convention
// for off, a negative value (zero there selects the default).
func offIfZero(n int) int {
	if n == 0 {
		return -1
	}
	return n
}

// nonZero maps a duration flag's 0 to "off" (negative) for proxy.Config,
// where zero selects the default.
func nonZero(d time.Duration) time.Duration {
	if d == 0 {
		return -1
	}
	return d
}

// splitBackends flattens --backend values, which may themselves be
// comma-separated lists (as $STREAMLB_BACKENDS is), dropping empty entries.
// The commas of an etcd or zk target's endpoint list
// ("etcd://h1:2379,h2:2379/PREFIX") do not split it: a piece is joined
// back to the previous one while that is a scheme target whose authority
// has not ended with '/' yet.
func splitBackends(values []string) []string {
	var out []string
	for _, v := range values {
		open := false // out's last entry is "scheme://authority" without '/'
		for _, b := range strings.Split(v, ",") {
			b = strings.TrimSpace(b)
			if open {
				out[len(out)-1] += "," + b
			} else if b != "" {
				out = append(out, b)
			} else {
				continue
			}
			last := out[len(out)-1]
			_, rest, ok := strings.Cut(last, "://")
			open = ok && !strings.Contains(rest, "/")
		}
	}
	return out
}

// registryFlags are the settings of etcd:// and zk:// registries: the
// proxy follows its targets with them, and the testserver registers with
// them (--register).
func registryFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "etcd-ca", Usage: "PEM CA `FILE` etcd's server certificate must chain to: turns TLS to etcd on"},
		&cli.StringFlag{Name: "etcd-cert", Usage: "PEM client certificate `FILE` presented to etcd, for --client-cert-auth (needs --etcd-key)"},
		&cli.StringFlag{Name: "etcd-key", Usage: "PEM private key `FILE` of --etcd-cert"},
		&cli.StringFlag{Name: "etcd-username", Usage: "etcd user `NAME` (etcd auth; needs the password)"},
		&cli.StringFlag{Name: "etcd-password", EnvVars: []string{"STREAMLB_ETCD_PASSWORD"}, Usage: "etcd password (prefer the environment variable, which ps does not show)"},
		&cli.StringFlag{Name: "zk-username", Usage: "ZooKeeper digest user `NAME`: the session adds \"digest NAME:PASSWORD\", for nodes with a digest ACL (needs the password)"},
		&cli.StringFlag{Name: "zk-password", EnvVars: []string{"STREAMLB_ZK_PASSWORD"}, Usage: "ZooKeeper digest password (prefer the environment variable, which ps does not show)"},
		&cli.StringFlag{Name: "zk-ca", Usage: "PEM CA `FILE` ZooKeeper's server certificate must chain to: turns TLS to ZooKeeper on (its secureClientPort)"},
		&cli.StringFlag{Name: "zk-cert", Usage: "PEM client certificate `FILE` presented to ZooKeeper, for ssl.clientAuth=need (needs --zk-key)"},
		&cli.StringFlag{Name: "zk-key", Usage: "PEM private key `FILE` of --zk-cert"},
	}
}

// registryOptions reads registryFlags, checking that the settings that go
// together were given together.
func registryOptions(c *cli.Context) (resolver.EtcdOptions, resolver.ZKOptions, error) {
	e := resolver.EtcdOptions{
		CAFile: c.String("etcd-ca"), CertFile: c.String("etcd-cert"), KeyFile: c.String("etcd-key"),
		Username: c.String("etcd-username"), Password: c.String("etcd-password"),
	}
	z := resolver.ZKOptions{
		Username: c.String("zk-username"), Password: c.String("zk-password"),
		CAFile: c.String("zk-ca"), CertFile: c.String("zk-cert"), KeyFile: c.String("zk-key"),
	}
	switch {
	case (e.CertFile == "") != (e.KeyFile == ""):
		return e, z, usageErr("--etcd-cert and --etcd-key go together")
	case (z.CertFile == "") != (z.KeyFile == ""):
		return e, z, usageErr("--zk-cert and --zk-key go together")
	case e.Username != "" && e.Password == "":
		return e, z, usageErr("--etcd-username needs a password: set STREAMLB_ETCD_PASSWORD (or --etcd-password)")
	case e.Username == "" && e.Password != "":
		return e, z, usageErr("an etcd password needs --etcd-username")
	case z.Username != "" && z.Password == "":
		return e, z, usageErr("--zk-username needs a password: set STREAMLB_ZK_PASSWORD (or --zk-password)")
	case z.Username == "" && z.Password != "":
		return e, z, usageErr("a ZooKeeper password needs --zk-username")
	case strings.Contains(z.Username, ":"):
		return e, z, usageErr("--zk-username must not contain ':'")
	}
	return e, z, nil
}

// budgetFlag is proxy.Config's RetryBudget for --retry-budget: 0 means a
// bucket of no tokens (no UNAVAILABLE answer is retried), where
// proxy.Config's own 0 is its default (10 tokens). The flag's default is
// that 10, given as such.
func budgetFlag(n int) int {
	if n == 0 {
		return -1
	}
	return n
}

// retriesFlag is proxy.Config's MaxRetries for --max-retries: 0 means no
// retries, as Envoy's num_retries: 0 does, where proxy.Config's own 0 is
// its default (2).
func retriesFlag(n int) int {
	if n == 0 {
		return -1
	}
	return n
}
