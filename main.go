// Command streamlb is a gRPC-aware L7 proxy that picks a backend for every
// stream, not every connection.
//
// It wires the packages together and does nothing else: proxy is the data
// plane, director picks backends, resolver turns --backend targets into a
// backend set, testserver provides backends to try it on and loadtest drives
// the demo. Every command runs under one context that SIGINT or SIGTERM
// cancels, waits for everything it started, and maps the result to an exit
// code: 0 on success or after a drain, 1 on a runtime failure, 2 on a usage
// error.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/sync/errgroup"

	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/loadtest"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/resolver"
	"github.com/streamlb/streamlb/testserver"
)

// Engine names accepted by --engine.
const (
	engineFrame = "frame"
	engineGRPC  = "grpc-proxy"
)

var engines = []string{engineFrame, engineGRPC}

// Exit codes.
const (
	exitFailure = 1 // a runtime failure: listen, serve, resolve
	exitUsage   = 2 // bad flags or flag values
)

// testserverDrainTimeout bounds the testserver command's graceful stop.
const testserverDrainTimeout = 5 * time.Second

func main() {
	err := newApp().Run(os.Args)
	if err == nil {
		return
	}
	fmt.Fprintf(os.Stderr, "streamlb: %v\n", err)
	os.Exit(exitCode(err))
}

// exitCode maps an error returned by the app to the process exit code.
// Actions wrap their own errors with cli.Exit; anything else comes from flag
// parsing in urfave/cli and is a usage error.
func exitCode(err error) int {
	if err == nil {
		return 0
	}
	var ec cli.ExitCoder
	if errors.As(err, &ec) {
		return ec.ExitCode()
	}
	return exitUsage
}

// usageErr reports a bad flag value with exit code 2.
func usageErr(format string, args ...any) error {
	return cli.Exit(fmt.Sprintf(format, args...), exitUsage)
}

// failure reports a runtime failure with exit code 1.
func failure(err error) error {
	return cli.Exit(err.Error(), exitFailure)
}

// onUsageError replaces urfave/cli's dump of the whole help text with one
// line pointing at --help.
func onUsageError(c *cli.Context, err error, _ bool) error {
	name := c.App.Name
	if c.Command != nil && c.Command.Name != "" {
		name += " " + c.Command.Name
	}
	return usageErr("%v (see '%s --help')", err, name)
}

// newApp builds the command line. It does no I/O until Run.
func newApp() *cli.App {
	return &cli.App{
		Name:  "streamlb",
		Usage: "a gRPC-aware L7 proxy that balances every stream",
		Description: "gRPC multiplexes many calls over one HTTP/2 connection, so a connection-level\n" +
			"(L4) balancer pins all of a client's calls to one backend. streamlb terminates\n" +
			"HTTP/2, picks a backend for every stream and relays its frames as they are.",
		Commands:     []*cli.Command{proxyCommand(), testserverCommand(), demoCommand(), loadtestCommand()},
		OnUsageError: onUsageError,
		Action: func(c *cli.Context) error {
			if c.NArg() > 0 {
				return usageErr("unknown command %q (see 'streamlb --help')", c.Args().First())
			}
			return cli.ShowAppHelp(c)
		},
		// main prints the error and picks the exit code; the default handler
		// would call os.Exit from inside Run, which tests cannot survive.
		ExitErrHandler: func(*cli.Context, error) {},
	}
}

// logFlags are shared by every command.
func logFlags(defaultLevel string) []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{
			Name:  "log-level",
			Value: defaultLevel,
			Usage: "lowest level logged to stderr: debug, info, warn or error",
		},
		&cli.StringFlag{
			Name:  "log-format",
			Value: "text",
			Usage: "log line format on stderr: text (key=value) or json",
		},
	}
}

// newLogger builds the logger the flags ask for, writing to w.
func newLogger(c *cli.Context, w io.Writer) (*slog.Logger, error) {
	var level slog.Level
	name := strings.ToLower(c.String("log-level"))
	if !slices.Contains([]string{"debug", "info", "warn", "error"}, name) {
		return nil, usageErr("unknown --log-level %q (want debug, info, warn or error)", c.String("log-level"))
	}
	if err := level.UnmarshalText([]byte(name)); err != nil {
		return nil, usageErr("--log-level: %v", err)
	}
	opts := &slog.HandlerOptions{Level: level}
	switch c.String("log-format") {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	default:
		return nil, usageErr("unknown --log-format %q (want text or json)", c.String("log-format"))
	}
}

func proxyCommand() *cli.Command {
	return &cli.Command{
		Name:      "proxy",
		Usage:     "run the proxy in front of a fixed set of backends",
		UsageText: "streamlb proxy --backend HOST:PORT [--backend HOST:PORT ...] [options]",
		Description: "Accepts cleartext HTTP/2 (h2c) gRPC on --listen and sends every stream to\n" +
			"the backend the --policy picks. SIGINT or SIGTERM starts a graceful drain:\n" +
			"no new connections, GOAWAY to clients, in-flight streams get --drain-timeout\n" +
			"to finish, then the proxy exits 0. A second signal exits at once.",
		OnUsageError: onUsageError,
		Flags: append([]cli.Flag{
			&cli.StringFlag{
				Name:  "listen",
				Value: ":8080",
				Usage: "`ADDR` to accept gRPC clients on (host:port; port 0 picks a free one)",
			},
			// Required, but checked in runProxy: urfave/cli would answer a
			// missing required flag with the whole help text.
			&cli.StringSliceFlag{
				Name:    "backend",
				EnvVars: []string{"STREAMLB_BACKENDS"},
				Usage: "required: backend `HOST:PORT` to balance over, optionally with ;weight=N; repeat the flag " +
					"or give a comma-separated list in",
			},
			&cli.StringFlag{
				Name:  "policy",
				Value: director.RoundRobin,
				Usage: "how a backend is picked for each stream, one of: " + strings.Join(director.Policies(), ", "),
			},
			&cli.IntFlag{
				Name:  "choice-count",
				Value: director.DefaultChoiceCount,
				Usage: fmt.Sprintf("backends least_request samples per pick, taking the one with fewest streams in flight (2..%d)", director.MaxChoiceCount),
			},
			&cli.StringFlag{
				Name:  "engine",
				Value: engineFrame,
				Usage: "data plane: frame (relays HTTP/2 frames) or grpc-proxy (message-level reference engine)",
			},
			&cli.DurationFlag{
				Name:  "drain-timeout",
				Value: 15 * time.Second,
				Usage: "on SIGINT/SIGTERM, how long in-flight streams may run before they are cut",
			},
			&cli.DurationFlag{
				Name:  "connect-timeout",
				Value: proxy.DefaultConnectTimeout,
				Usage: "bound on dialing a backend; a call whose backend cannot be reached in time fails with UNAVAILABLE (frame engine)",
			},
			&cli.UintFlag{
				Name:  "max-concurrent-streams",
				Value: proxy.DefaultMaxConcurrentStreams,
				Usage: "streams one client connection may have open, advertised as SETTINGS_MAX_CONCURRENT_STREAMS (frame engine)",
			},
		}, logFlags("info")...),
		Action: runProxy,
	}
}

// engine is what both data planes offer.
type engine interface {
	Serve(net.Listener) error
	Shutdown(context.Context) error
	Close() error
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
	if c.Duration("connect-timeout") <= 0 {
		return usageErr("--connect-timeout must be positive, got %v", c.Duration("connect-timeout"))
	}
	drain := c.Duration("drain-timeout")
	if drain < 0 {
		return usageErr("--drain-timeout must not be negative, got %v", drain)
	}
	backends := splitBackends(c.StringSlice("backend"))
	if len(backends) == 0 {
		return usageErr("no backend: give --backend HOST:PORT at least once, or set STREAMLB_BACKENDS")
	}

	d, err := director.New(director.Config{
		Policy:      policy,
		ChoiceCount: c.Int("choice-count"),
		Logger:      logger,
	})
	if err != nil {
		return usageErr("%v", err)
	}
	res, err := resolver.NewStatic(backends)
	if err != nil {
		return usageErr("--backend: %v", err)
	}
	var srv engine
	switch engineName {
	case engineFrame:
		srv, err = proxy.New(proxy.Config{
			Picker:               d,
			ConnectTimeout:       c.Duration("connect-timeout"),
			MaxConcurrentStreams: uint32(mcs),
			Logger:               logger,
		})
	case engineGRPC:
		srv, err = proxy.NewReference(proxy.ReferenceConfig{Picker: d, Logger: logger})
	}
	if err != nil {
		return usageErr("%v", err)
	}

	ctx, stop := signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
	defer stop()

	ln, err := net.Listen("tcp", c.String("listen"))
	if err != nil {
		return failure(fmt.Errorf("listen: %w", err))
	}
	// Give the director its set before the first client is accepted, so no
	// early call fails for want of a backend. Run pushes the same set again,
	// which the director takes as no change.
	if err := d.UpdateState(res.State()); err != nil {
		ln.Close()
		return usageErr("--backend: %v", err)
	}
	slog.SetDefault(logger)
	logger.Info("listening", "addr", ln.Addr().String(), "engine", engineName,
		"policy", policy, "backends", backends)

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		if err := res.Run(gctx, d); err != nil {
			return fmt.Errorf("resolve backends: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		if err := srv.Serve(ln); !errors.Is(err, proxy.ErrServerClosed) {
			return fmt.Errorf("serve: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		<-gctx.Done()
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

func testserverCommand() *cli.Command {
	return &cli.Command{
		Name:      "testserver",
		Usage:     "run one gRPC test backend (grpc.testing.TestService, health, reflection)",
		UsageText: "streamlb testserver --name NAME [options]",
		Description: "Serves grpc.testing.TestService, grpc.health.v1 and server reflection, and\n" +
			"names itself in the x-backend response header of every TestService call, so\n" +
			"calls made through the proxy can be attributed. Stops gracefully on SIGINT\n" +
			"or SIGTERM.",
		OnUsageError: onUsageError,
		Flags: append([]cli.Flag{
			&cli.StringFlag{
				Name:  "listen",
				Value: ":9090",
				Usage: "`ADDR` to serve gRPC on (host:port; port 0 picks a free one)",
			},
			// Required, but checked in runTestserver (see --backend).
			&cli.StringFlag{
				Name:  "name",
				Usage: "required: backend `NAME` reported in the x-backend header and in logs",
			},
			&cli.DurationFlag{
				Name:  "latency",
				Usage: "delay added to every TestService call",
			},
			&cli.Float64Flag{
				Name:  "error-rate",
				Usage: "fraction of TestService calls, 0..1, that fail with UNAVAILABLE",
			},
		}, logFlags("info")...),
		Action: runTestserver,
	}
}

func runTestserver(c *cli.Context) error {
	if c.NArg() > 0 {
		return usageErr("unexpected argument %q", c.Args().First())
	}
	if c.String("name") == "" {
		return usageErr("no name: give --name NAME")
	}
	logger, err := newLogger(c, c.App.ErrWriter)
	if err != nil {
		return err
	}
	ts, err := testserver.New(testserver.Config{
		Name:      c.String("name"),
		Latency:   c.Duration("latency"),
		ErrorRate: c.Float64("error-rate"),
		Logger:    logger,
	})
	if err != nil {
		return usageErr("%v", err)
	}
	slog.SetDefault(logger)

	ctx, stop := signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
	defer stop()

	ln, err := net.Listen("tcp", c.String("listen"))
	if err != nil {
		return failure(fmt.Errorf("listen: %w", err))
	}
	logger.Info("listening", "addr", ln.Addr().String(), "name", c.String("name"))

	serveErr := make(chan error, 1)
	go func() { serveErr <- ts.Serve(ln) }()
	select {
	case err := <-serveErr:
		if err != nil {
			return failure(fmt.Errorf("serve: %w", err))
		}
		return nil
	case <-ctx.Done():
	}
	stop()
	logger.Info("stopping", "drain_timeout", testserverDrainTimeout)
	sctx, cancel := context.WithTimeout(context.Background(), testserverDrainTimeout)
	defer cancel()
	if err := ts.Shutdown(sctx); err != nil {
		logger.Warn("graceful stop timed out; calls still in flight were cut", "err", err)
	}
	if err := <-serveErr; err != nil {
		return failure(fmt.Errorf("serve: %w", err))
	}
	return nil
}

func demoCommand() *cli.Command {
	return &cli.Command{
		Name:  "demo",
		Usage: "start 3 test backends and the proxy on loopback, send calls over one connection, show where they landed",
		Description: "Everything runs in this process on 127.0.0.1 and stops by itself. All calls\n" +
			"share ONE client HTTP/2 connection, which an L4 balancer would pin to a\n" +
			"single backend; the table shows streamlb spreading them per stream.",
		OnUsageError: onUsageError,
		Flags: append([]cli.Flag{
			&cli.IntFlag{
				Name:  "calls",
				Value: loadtest.DefaultDemoCalls,
				Usage: "number of unary calls to send",
			},
			&cli.IntFlag{
				Name:  "concurrency",
				Value: loadtest.DefaultDemoConcurrency,
				Usage: "calls in flight at once, all on the one client connection",
			},
			&cli.DurationFlag{
				Name:  "duration",
				Value: loadtest.DefaultDemoDuration,
				Usage: "upper bound on the run; calls not sent by then are skipped",
			},
		}, logFlags("warn")...),
		Action: runDemo,
	}
}

func runDemo(c *cli.Context) error {
	if c.NArg() > 0 {
		return usageErr("unexpected argument %q", c.Args().First())
	}
	logger, err := newLogger(c, c.App.ErrWriter)
	if err != nil {
		return err
	}
	cfg := loadtest.DemoConfig{
		Calls:       c.Int("calls"),
		Concurrency: c.Int("concurrency"),
		Duration:    c.Duration("duration"),
		Logger:      logger,
	}
	if err := cfg.Validate(); err != nil {
		return usageErr("%v", err)
	}
	slog.SetDefault(logger)

	ctx, stop := signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := loadtest.RunDemo(ctx, cfg, c.App.Writer); err != nil {
		return failure(err)
	}
	return nil
}
