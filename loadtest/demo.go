package loadtest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"

	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/resolver"
	"github.com/streamlb/streamlb/testserver"
)

// Defaults for DemoConfig fields left zero.
const (
	DefaultDemoBackends    = 3
	DefaultDemoCalls       = 3000
	DefaultDemoConcurrency = 30
	DefaultDemoDuration    = 30 * time.Second
)

// demoStopTimeout bounds the proxy's graceful drain at the end of the demo.
const demoStopTimeout = 5 * time.Second

// DemoConfig configures RunDemo. The zero value runs the default demo.
type DemoConfig struct {
	// Backends is how many testservers to start; 0 means
	// DefaultDemoBackends.
	Backends int
	// Calls is how many unary calls to send; 0 means DefaultDemoCalls.
	Calls int
	// Concurrency is how many calls are in flight at once, all on the one
	// client connection; 0 means DefaultDemoConcurrency.
	Concurrency int
	// Duration bounds the sending; calls not sent by then are skipped and
	// calls still in flight are abandoned. 0 means DefaultDemoDuration.
	Duration time.Duration
	// Logger receives the logs of the backends, director and proxy; nil
	// means slog.Default().
	Logger *slog.Logger
}

// Validate reports a field that RunDemo would reject.
func (c DemoConfig) Validate() error {
	var errs []error
	if c.Backends < 0 {
		errs = append(errs, fmt.Errorf("loadtest: backends must not be negative, got %d", c.Backends))
	}
	if c.Calls < 0 {
		errs = append(errs, fmt.Errorf("loadtest: calls must not be negative, got %d", c.Calls))
	}
	if c.Concurrency < 0 {
		errs = append(errs, fmt.Errorf("loadtest: concurrency must not be negative, got %d", c.Concurrency))
	}
	if c.Duration < 0 {
		errs = append(errs, fmt.Errorf("loadtest: duration must not be negative, got %v", c.Duration))
	}
	return errors.Join(errs...)
}

// withDefaults returns c with zero fields replaced by their defaults.
func (c DemoConfig) withDefaults() DemoConfig {
	if c.Backends == 0 {
		c.Backends = DefaultDemoBackends
	}
	if c.Calls == 0 {
		c.Calls = DefaultDemoCalls
	}
	if c.Concurrency == 0 {
		c.Concurrency = DefaultDemoConcurrency
	}
	c.Concurrency = min(c.Concurrency, c.Calls)
	if c.Duration == 0 {
		c.Duration = DefaultDemoDuration
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return c
}

// RunDemo starts cfg.Backends testservers on 127.0.0.1, the frame proxy with
// round robin in front of them, and sends cfg.Calls EmptyCalls through the
// proxy over one client connection. It then writes to out where the calls
// landed, as a Report table, and stops everything it started before it
// returns.
//
// It returns an error if the setup fails, if any call fails, or if ctx ends
// before the calls are done (the table is written in the last two cases).
// Reaching cfg.Duration is not an error: the table then says how many calls
// were not sent. RunDemo blocks; it is safe to run several at once.
func RunDemo(ctx context.Context, cfg DemoConfig, out io.Writer) (err error) {
	if err := cfg.Validate(); err != nil {
		return err
	}
	cfg = cfg.withDefaults()

	backends, err := startBackends(cfg.Backends, cfg.Logger)
	if err != nil {
		return err
	}
	defer func() {
		for _, b := range backends {
			b.Stop()
		}
	}()
	targets := make([]string, len(backends))
	names := make(map[string]string, len(backends)) // name -> addr
	for i, b := range backends {
		targets[i] = b.Addr()
		names[b.Name()] = b.Addr()
	}

	d, err := director.New(director.Config{Policy: director.RoundRobin, Logger: cfg.Logger})
	if err != nil {
		return fmt.Errorf("loadtest: %w", err)
	}
	res, err := resolver.NewStatic(targets)
	if err != nil {
		return fmt.Errorf("loadtest: %w", err)
	}
	// Prime the director so the first calls find backends; Run pushes the
	// same set again, which the director takes as no change.
	if err := d.UpdateState(res.State()); err != nil {
		return fmt.Errorf("loadtest: %w", err)
	}
	resCtx, cancelRes := context.WithCancel(context.Background())
	resDone := make(chan error, 1)
	go func() { resDone <- res.Run(resCtx, d) }()
	defer func() {
		cancelRes()
		if rerr := <-resDone; rerr != nil {
			err = errors.Join(err, fmt.Errorf("loadtest: resolver: %w", rerr))
		}
	}()

	srv, err := proxy.New(proxy.Config{Picker: d, Logger: cfg.Logger})
	if err != nil {
		return fmt.Errorf("loadtest: %w", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("loadtest: listen: %w", err)
	}
	proxyAddr := ln.Addr().String()
	serveDone := make(chan error, 1)
	go func() { serveDone <- srv.Serve(ln) }()
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), demoStopTimeout)
		defer cancel()
		if serr := srv.Shutdown(sctx); serr != nil {
			err = errors.Join(err, fmt.Errorf("loadtest: proxy shutdown: %w", serr))
		}
		if serr := <-serveDone; !errors.Is(serr, proxy.ErrServerClosed) {
			err = errors.Join(err, fmt.Errorf("loadtest: proxy serve: %w", serr))
		}
	}()

	// One client connection: an L4 balancer would pin it, and every call on
	// it, to one backend.
	cc, err := grpc.NewClient("passthrough:///"+proxyAddr,
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("loadtest: dial proxy: %w", err)
	}
	defer cc.Close()

	fmt.Fprintf(out, "streamlb demo: %d backends on loopback, proxy (frame engine, %s) on %s\n",
		len(backends), director.RoundRobin, proxyAddr)
	fmt.Fprintf(out, "sending %d unary calls, %d at a time, over one client connection\n\n",
		cfg.Calls, cfg.Concurrency)

	start := time.Now()
	runCtx, cancelRun := context.WithTimeout(ctx, cfg.Duration)
	defer cancelRun()
	t := newTally(names)
	var next atomic.Int64
	var wg sync.WaitGroup
	client := testgrpc.NewTestServiceClient(cc)
	for range cfg.Concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			callLoop(runCtx, client, &next, int64(cfg.Calls), t)
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)

	report := t.report()
	if werr := report.WriteTable(out); werr != nil {
		return werr
	}
	done, failed := report.Total()
	fmt.Fprintf(out, "\n%d calls finished in %v (%.0f calls/s)\n",
		done, elapsed.Round(time.Millisecond), float64(done)/elapsed.Seconds())
	if skipped := int64(cfg.Calls) - done; skipped > 0 && ctx.Err() == nil {
		fmt.Fprintf(out, "stopped at the %v bound: %d calls not sent or not finished\n", cfg.Duration, skipped)
	}
	fmt.Fprintln(out, "All calls shared one client connection: a connection-level (L4) balancer would have sent them all to one backend.")
	switch {
	case ctx.Err() != nil:
		return fmt.Errorf("loadtest: demo interrupted after %d calls: %w", done, ctx.Err())
	case failed > 0:
		return fmt.Errorf("loadtest: %d of %d calls failed", failed, done)
	}
	return nil
}

// startBackends starts n testservers on loopback ports. On error it stops the
// ones it started.
func startBackends(n int, logger *slog.Logger) ([]*testserver.Server, error) {
	var backends []*testserver.Server
	for i := range n {
		ts, err := testserver.New(testserver.Config{
			Name:   fmt.Sprintf("backend-%d", i+1),
			Logger: logger,
		})
		if err == nil {
			err = ts.Start("127.0.0.1:0")
		}
		if err != nil {
			for _, b := range backends {
				b.Stop()
			}
			return nil, fmt.Errorf("loadtest: start backend: %w", err)
		}
		backends = append(backends, ts)
	}
	return backends, nil
}

// callLoop sends EmptyCalls until next passes limit or ctx ends, recording
// each finished call in t. Calls cut short by ctx are not recorded: they say
// nothing about where the proxy sends calls.
func callLoop(ctx context.Context, client testgrpc.TestServiceClient, next *atomic.Int64, limit int64, t *tally) {
	for next.Add(1) <= limit {
		if ctx.Err() != nil {
			return
		}
		var header, trailer metadata.MD
		_, err := client.EmptyCall(ctx, &testgrpc.Empty{}, grpc.Header(&header), grpc.Trailer(&trailer))
		if err != nil && ctx.Err() != nil {
			return
		}
		name := testserver.BackendFromHeader(header)
		if name == "" {
			// A call that failed before its headers may still carry the
			// name in its trailers.
			if v := trailer.Get(testserver.TrailerBackend); len(v) > 0 {
				name = v[0]
			}
		}
		t.record(name, err)
	}
}

// tally counts finished calls per backend name. It is safe for concurrent
// use.
type tally struct {
	addrs map[string]string // name -> addr; immutable

	mu   sync.Mutex // guards rows
	rows map[string]*Row
}

func newTally(addrs map[string]string) *tally {
	t := &tally{addrs: addrs, rows: make(map[string]*Row)}
	// Every backend gets a row, so one that received nothing shows as 0.
	for name, addr := range addrs {
		t.rows[name] = &Row{Backend: name, Addr: addr}
	}
	return t
}

func (t *tally) record(name string, err error) {
	if name == "" {
		name = Unattributed
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	row, ok := t.rows[name]
	if !ok {
		row = &Row{Backend: name, Addr: t.addrs[name]}
		t.rows[name] = row
	}
	row.Calls++
	if err != nil {
		row.Errors++
	}
}

func (t *tally) report() Report {
	t.mu.Lock()
	defer t.mu.Unlock()
	var r Report
	for _, row := range t.rows {
		r.Rows = append(r.Rows, *row)
	}
	sortRows(r.Rows)
	return r
}
