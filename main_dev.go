//go:build !proxyonly

package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/streamlb/streamlb/demo"
	"github.com/streamlb/streamlb/testserver"
)

// The development commands: testserver, demo (here) and loadtest
// (main_loadtest.go). A build with -tags proxyonly leaves them out, and with
// them the embedded etcd server, ghz and the gRPC interop service
// (main_proxyonly.go).

// testserverDrainTimeout bounds the testserver command's graceful stop.
const testserverDrainTimeout = 5 * time.Second

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
			&cli.StringFlag{
				Name:  "register",
				Usage: "register as Kitex does, in etcd at `etcd://HOST:PORT[,...]/PREFIX` (key PREFIX/ADDR, a lease kept alive, revoked on graceful stop) or in ZooKeeper at zk://HOST:PORT[,...]/PATH (ephemeral node PATH/ADDR, session closed on graceful stop)",
			},
			&cli.DurationFlag{
				Name:  "register-ttl",
				Value: testserver.DefaultRegisterTTL,
				Usage: "lease TTL (etcd) or session timeout (ZooKeeper) of --register: how long the registration outlives a killed testserver",
			},
		}, append(registryFlags(), logFlags("info")...)...),
		Action: runTestserver,
	}
}

// registerOptions reads the testserver's --register-ttl and the registry
// flags (TLS and credentials) of --register's registry.
func registerOptions(c *cli.Context) (testserver.RegisterOptions, error) {
	opts := testserver.RegisterOptions{TTL: c.Duration("register-ttl")}
	e, z, err := registryOptions(c)
	if err != nil {
		return opts, err
	}
	if strings.HasPrefix(c.String("register"), "zk://") {
		if opts.TLS, err = z.TLSConfig(); err != nil {
			return opts, usageErr("%v", err)
		}
		opts.Username, opts.Password = z.Username, z.Password
		return opts, nil
	}
	if opts.TLS, err = e.TLSConfig(); err != nil {
		return opts, usageErr("%v", err)
	}
	opts.Username, opts.Password = e.Username, e.Password
	return opts, nil
}

func runTestserver(c *cli.Context) error {
	if c.NArg() > 0 {
		return usageErr("unexpected argument %q", c.Args().First())
	}
	if c.String("name") == "" {
		return usageErr("no name: give --name NAME")
	}
	logger, lw, err := newLogger(c, c.App.ErrWriter)
	if err != nil {
		return err
	}
	defer lw.Close()
	regOpts, err := registerOptions(c)
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
	var reg *testserver.Registration
	if target := c.String("register"); target != "" {
		addr := registerAddr(ln.Addr())
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		reg, err = testserver.Register(rctx, target, addr, regOpts)
		cancel()
		if err != nil {
			ts.Stop()
			<-serveErr
			return failure(err)
		}
		logger.Info("registered", "key", reg.Key(), "ttl", c.Duration("register-ttl"))
	}
	select {
	case err := <-serveErr:
		if reg != nil {
			reg.Abandon()
		}
		if err != nil {
			return failure(fmt.Errorf("serve: %w", err))
		}
		return nil
	case <-ctx.Done():
	}
	stop()
	if reg != nil {
		// Deregister first, so the proxies stop sending new calls
		// while the calls in flight finish.
		dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := reg.Deregister(dctx); err != nil {
			logger.Warn("deregistration failed; the lease will expire", "err", err)
		} else {
			logger.Info("deregistered", "key", reg.Key())
		}
		cancel()
	}
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

// registerAddr is the address a testserver listening on addr registers:
// an unspecified IP (":9090") becomes the loopback address.
func registerAddr(addr net.Addr) string {
	ta, ok := addr.(*net.TCPAddr)
	if !ok || !ta.IP.IsUnspecified() {
		return addr.String()
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(ta.Port))
}

func demoCommand() *cli.Command {
	return &cli.Command{
		Name:  "demo",
		Usage: "the headless-service demo: pods scale up and down, streamlb follows them over DNS or an etcd registry",
		Description: "Everything runs in this process on loopback and stops by itself (about 30 s\n" +
			"by default). An embedded DNS server answers a headless service's name with one\n" +
			"A record per pod; pods are test backends on 127.0.0.11, .12, ... sharing a\n" +
			"port. streamlb re-resolves the name; one client sends steady load over ONE\n" +
			"connection to it, while a plain grpc-go client dials the name directly. The\n" +
			"pods are scaled through --steps and a table shows where both clients' calls land.\n" +
			"With --registry etcd the pods register in an embedded etcd instead, as Kitex\n" +
			"services do, and streamlb watches it.",
		OnUsageError: onUsageError,
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "steps", Value: "3,5,2", Usage: "pod counts to scale through, comma-separated"},
			&cli.DurationFlag{Name: "step-duration", Value: demo.DefaultStepDuration, Usage: "how long load runs at each step"},
			&cli.DurationFlag{Name: "dns-refresh", Value: demo.DefaultRefresh, Usage: "streamlb's DNS re-resolution interval"},
			&cli.IntFlag{Name: "rate", Value: demo.DefaultRate, Usage: "calls per second each client sends"},
			&cli.IntFlag{Name: "concurrency", Value: demo.DefaultConcurrency, Usage: "calls in flight per client, all on its one connection"},
			&cli.DurationFlag{Name: "interval", Value: demo.DefaultInterval, Usage: "how often the live table is printed"},
			&cli.StringFlag{Name: "registry", Value: demo.RegistryDNS, Usage: "how pods are published: dns (a headless service's A records) or etcd (pods register in an embedded etcd as Kitex services do, with leases; the first scale-in kills one pod without deregistering)"},
			&cli.DurationFlag{Name: "lease-ttl", Value: demo.DefaultLeaseTTL, Usage: "with --registry etcd: each pod's lease TTL, so how long a killed pod stays registered"},
		}, logFlags("error")...),
		Action: runDemo,
	}
}

func runDemo(c *cli.Context) error {
	if c.NArg() > 0 {
		return usageErr("unexpected argument %q", c.Args().First())
	}
	logger, lw, err := newLogger(c, c.App.ErrWriter)
	if err != nil {
		return err
	}
	defer lw.Close()
	var steps []int
	for _, f := range strings.Split(c.String("steps"), ",") {
		var n int
		if _, err := fmt.Sscan(strings.TrimSpace(f), &n); err != nil {
			return usageErr("--steps: %q is not a number of pods", f)
		}
		steps = append(steps, n)
	}
	cfg := demo.Config{
		Steps:        steps,
		StepDuration: c.Duration("step-duration"),
		Refresh:      c.Duration("dns-refresh"),
		Rate:         c.Int("rate"),
		Concurrency:  c.Int("concurrency"),
		Interval:     c.Duration("interval"),
		Registry:     c.String("registry"),
		LeaseTTL:     c.Duration("lease-ttl"),
		Logger:       logger,
	}
	if err := cfg.Validate(); err != nil {
		return usageErr("%v", err)
	}
	slog.SetDefault(logger)
	ctx, stop := signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
	defer stop()
	if _, err := demo.Run(ctx, cfg, c.App.Writer); err != nil {
		return failure(err)
	}
	return nil
}
