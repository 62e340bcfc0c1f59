package loadtest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/bojand/ghz/load"
	"github.com/bojand/ghz/runner"

	"github.com/streamlb/streamlb/testserver"
)

// Defaults for Config fields left zero. They are ghz's, except
// DurationStop.
const (
	DefaultTotal            = 200
	DefaultConcurrency      = 50
	DefaultConnections      = 1
	DefaultTimeout          = 20 * time.Second
	DefaultConnectTimeout   = 10 * time.Second
	DefaultBackendHeader    = testserver.HeaderBackend
	DefaultProgressInterval = 500 * time.Millisecond
	DefaultDurationStop     = "wait"
)

// Config describes one load test. Target and Call are required; the zero
// value of every other field means its default.
type Config struct {
	// Target is the server's "host:port".
	Target string
	// Call is the method, "package.Service/Method" (or, as ghz also takes
	// it, "package.Service.Method").
	Call string
	// Name labels the run in reports.
	Name string

	// Data is the request message as JSON, or a JSON array of messages for
	// client streams. Nil means "{}". At most one of Data and BinaryData.
	Data []byte
	// BinaryData is the request message serialized as protobuf.
	BinaryData []byte
	// Metadata is sent with every call.
	Metadata map[string]string

	// Proto or Protoset name a file describing the method; with neither,
	// the method is looked up by server reflection. ImportPaths go with
	// Proto.
	Proto       string
	Protoset    string
	ImportPaths []string

	// Total is the number of calls to make. With Duration set and Total
	// zero, calls are made until Duration; with both, until either is
	// reached. With neither, DefaultTotal.
	Total int
	// Duration bounds the run.
	Duration time.Duration
	// DurationStop says what happens to calls in flight when Duration is
	// reached: "wait" lets them finish (within Timeout), "close" closes the
	// connections so they fail, "ignore" closes them and leaves the cut
	// calls out of the report. Empty means DefaultDurationStop.
	DurationStop string
	// Concurrency is the number of workers making calls, each waiting for
	// its call to finish before starting the next.
	Concurrency int
	// Connections is the number of client connections the workers share.
	// DefaultConnections is 1: the case a per-stream balancer exists for.
	Connections int
	// RPS caps the rate of calls started; 0 means unlimited.
	RPS int
	// Timeout bounds each call.
	Timeout time.Duration
	// ConnectTimeout bounds the first dial and the reflection lookup.
	ConnectTimeout time.Duration

	// TLS makes the connections use TLS instead of cleartext HTTP/2 (h2c).
	// CACert is a PEM file of roots (system roots when empty);
	// SkipTLSVerify skips verifying the server's certificate.
	TLS           bool
	CACert        string
	SkipTLSVerify bool

	// BackendHeader is the response header that names the backend that
	// served a call. Empty means DefaultBackendHeader.
	BackendHeader string

	// ProgressInterval is how often Run writes a progress line; 0 means
	// DefaultProgressInterval. ProgressTTY makes each line overwrite the
	// previous one (for a terminal) instead of ending with a newline.
	ProgressInterval time.Duration
	ProgressTTY      bool

	// Now is the clock used for per-backend latencies; nil means time.Now.
	Now func() time.Time
}

// Validate reports the fields Run would reject, all of them, without
// touching the network. Its errors are the caller's mistakes (usage errors).
func (c Config) Validate() error {
	var errs []error
	add := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("loadtest: "+format, args...))
	}
	if c.Target == "" {
		add("no target: give HOST:PORT")
	} else if _, port, err := net.SplitHostPort(c.Target); err != nil || port == "" {
		add("target %q is not HOST:PORT", c.Target)
	}
	if c.Call == "" {
		add("no call: give the method as package.Service/Method")
	} else if _, err := callPath(c.Call); err != nil {
		errs = append(errs, err)
	}
	if c.Data != nil && c.BinaryData != nil {
		add("give request data as JSON or as binary, not both")
	}
	if c.Data != nil && !json.Valid(c.Data) {
		add("request data is not valid JSON: %v", jsonError(c.Data))
	}
	if c.Proto != "" && c.Protoset != "" {
		add("give a proto file or a protoset, not both")
	}
	if c.Proto != "" && !strings.HasSuffix(c.Proto, ".proto") {
		add("proto file %q must have the .proto extension", c.Proto)
	}
	if c.Total < 0 {
		add("total must not be negative, got %d", c.Total)
	}
	if c.Duration < 0 {
		add("duration must not be negative, got %v", c.Duration)
	}
	switch c.DurationStop {
	case "", "wait", "close", "ignore":
	default:
		add("duration stop action %q is not wait, close or ignore", c.DurationStop)
	}
	if c.Concurrency < 0 {
		add("concurrency must not be negative, got %d", c.Concurrency)
	}
	if c.Connections < 0 {
		add("connections must not be negative, got %d", c.Connections)
	}
	if conc, conns := cmpDefault(c.Concurrency, DefaultConcurrency), cmpDefault(c.Connections, DefaultConnections); conns > conc {
		add("connections (%d) must not exceed concurrency (%d)", conns, conc)
	}
	if c.RPS < 0 {
		add("rps must not be negative, got %d", c.RPS)
	}
	if c.Timeout < 0 {
		add("timeout must not be negative, got %v", c.Timeout)
	}
	if c.ConnectTimeout < 0 {
		add("connect timeout must not be negative, got %v", c.ConnectTimeout)
	}
	if c.ProgressInterval < 0 {
		add("progress interval must not be negative, got %v", c.ProgressInterval)
	}
	if c.BackendHeader != "" && (strings.ToLower(c.BackendHeader) != c.BackendHeader || strings.ContainsAny(c.BackendHeader, " :\t")) {
		add("backend header %q must be a lower-case metadata key", c.BackendHeader)
	}
	return errors.Join(errs...)
}

// cmpDefault returns v, or def when v is zero.
func cmpDefault[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

func (c Config) withDefaults() Config {
	if c.Total == 0 && c.Duration == 0 {
		c.Total = DefaultTotal
	}
	c.DurationStop = cmpDefault(c.DurationStop, DefaultDurationStop)
	c.Concurrency = cmpDefault(c.Concurrency, DefaultConcurrency)
	c.Connections = cmpDefault(c.Connections, DefaultConnections)
	c.Timeout = cmpDefault(c.Timeout, DefaultTimeout)
	c.ConnectTimeout = cmpDefault(c.ConnectTimeout, DefaultConnectTimeout)
	c.BackendHeader = cmpDefault(c.BackendHeader, DefaultBackendHeader)
	c.ProgressInterval = cmpDefault(c.ProgressInterval, DefaultProgressInterval)
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Data == nil && c.BinaryData == nil {
		c.Data = []byte("{}")
	}
	return c
}

// callPath turns "pkg.Service/Method" or "pkg.Service.Method" into the
// HTTP/2 :path of the call, "/pkg.Service/Method".
func callPath(call string) (string, error) {
	svc, method, ok := strings.Cut(call, "/")
	if !ok {
		i := strings.LastIndexByte(call, '.')
		if i < 0 {
			return "", fmt.Errorf("loadtest: call %q is not package.Service/Method", call)
		}
		svc, method = call[:i], call[i+1:]
	}
	if svc == "" || method == "" || strings.ContainsAny(method, "/.") || strings.Contains(svc, "/") {
		return "", fmt.Errorf("loadtest: call %q is not package.Service/Method", call)
	}
	return "/" + svc + "/" + method, nil
}

// jsonError says what is wrong with b, which is not valid JSON.
func jsonError(b []byte) error {
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	return errors.New("invalid JSON")
}

// ParseMetadata parses s, a JSON object of string values, as call metadata.
// Keys are lower-cased, as gRPC metadata keys are. It is the parser behind
// the command's --metadata flag.
func ParseMetadata(s string) (map[string]string, error) {
	var raw map[string]any
	if err := json.Unmarshal([]byte(s), &raw); err != nil {
		return nil, fmt.Errorf("loadtest: metadata must be a JSON object of strings: %w", err)
	}
	if raw == nil {
		return nil, errors.New("loadtest: metadata must be a JSON object of strings, got null")
	}
	md := make(map[string]string, len(raw))
	for k, v := range raw {
		sv, ok := v.(string)
		if !ok {
			return nil, fmt.Errorf("loadtest: metadata value of %q must be a string, got %s", k, jsonKind(v))
		}
		if k == "" {
			return nil, errors.New("loadtest: metadata key must not be empty")
		}
		md[strings.ToLower(k)] = sv
	}
	return md, nil
}

func jsonKind(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case bool:
		return "a boolean"
	case float64:
		return "a number"
	case []any:
		return "an array"
	case map[string]any:
		return "an object"
	default:
		return fmt.Sprintf("%T", v)
	}
}

// ghzOptions translates c, with defaults applied, into ghz options.
func (c Config) ghzOptions() []runner.Option {
	opts := []runner.Option{
		runner.WithConcurrency(uint(c.Concurrency)),
		runner.WithConnections(uint(c.Connections)),
		runner.WithRPS(uint(c.RPS)),
		runner.WithTimeout(c.Timeout),
		runner.WithDialTimeout(c.ConnectTimeout),
		runner.WithDurationStopAction(c.DurationStop),
		runner.WithInsecure(!c.TLS),
		runner.WithClientLoadBalancing(tapPolicy),
		// Run stops the requester itself when Duration is reached, so ghz
		// keeps Total as its bound (it would replace it with "unlimited"
		// if given the duration).
		runner.WithTotalRequests(uint(c.total())),
		runner.WithWorkerTicker(newConstWorkers(c.Concurrency)),
	}
	if c.Name != "" {
		opts = append(opts, runner.WithName(c.Name))
	}
	if c.TLS {
		opts = append(opts, runner.WithSkipTLSVerify(c.SkipTLSVerify))
		if c.CACert != "" {
			opts = append(opts, runner.WithRootCertificate(c.CACert))
		}
	}
	if c.BinaryData != nil {
		opts = append(opts, runner.WithBinaryData(c.BinaryData))
	} else {
		opts = append(opts, runner.WithDataFromJSON(string(c.Data)))
	}
	if len(c.Metadata) > 0 {
		opts = append(opts, runner.WithMetadata(c.Metadata))
	}
	switch {
	case c.Proto != "":
		opts = append(opts, runner.WithProtoFile(c.Proto, c.ImportPaths))
	case c.Protoset != "":
		opts = append(opts, runner.WithProtoset(c.Protoset))
	}
	return opts
}

// constWorkers starts a constant number of ghz workers, as ghz's own
// load.ConstWorkerTicker does, without its race: that one sends the
// worker count from Run, in a goroutine of its own, on the channel that
// Finish closes when the run ends, so a run stopped before that goroutine
// got to send (a short Duration, a cancel right after the start) crashed
// with "send on closed channel", or raced under -race. Here the count is
// in the channel's buffer from the start, and Run sends nothing.
type constWorkers struct{ c chan load.TickValue }

func newConstWorkers(n int) *constWorkers {
	c := make(chan load.TickValue, 1)
	c <- load.TickValue{Delta: n, Done: true}
	return &constWorkers{c: c}
}

func (w *constWorkers) Ticker() <-chan load.TickValue { return w.c }
func (w *constWorkers) Run()                          {}
func (w *constWorkers) Finish()                       { close(w.c) }

// total is the bound on calls given to ghz.
func (c Config) total() int {
	if c.Total == 0 {
		return math.MaxInt32 // Duration alone bounds the run
	}
	return c.Total
}

// Run makes the calls cfg describes with ghz and returns what happened,
// including where the calls landed according to the backend header. While
// it runs it writes a progress line to progress every cfg.ProgressInterval,
// unless progress is nil.
//
// Run blocks until the run ends: Total calls made, Duration reached or ctx
// done. On ctx done it stops the calls as for DurationStop "close" and
// returns the partial Result together with an error wrapping ctx.Err().
// Otherwise it returns an error, and no Result, when the run could not
// happen: cfg invalid, target unreachable, method unknown, request data not
// fitting the method. Calls failing is not an error; the Result counts them.
// Run stops everything it started before it returns. Several Runs may run at
// once.
func Run(ctx context.Context, cfg Config, progress io.Writer) (*Result, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	path, _ := callPath(cfg.Call)

	// ghz does not bound its first connection attempt by much more than
	// --connect-timeout, and then fails every call with a message about
	// the connection; checking first gives one clear error.
	if err := checkReachable(ctx, cfg.Target, cfg.ConnectTimeout); err != nil {
		return nil, err
	}

	col := newCollector(path, cfg.BackendHeader, cfg.Now)
	dialTarget, unregister := registerTap(col, cfg.Target)
	defer unregister()

	rc, err := runner.NewConfig(cfg.Call, dialTarget, cfg.ghzOptions()...)
	if err != nil {
		return nil, fmt.Errorf("loadtest: %w", err)
	}
	// NewRequester looks the method up (by reflection, over a connection of
	// its own, bounded by the dial timeout) and checks the request data.
	reqr, err := runner.NewRequester(rc)
	if err != nil {
		return nil, fmt.Errorf("loadtest: %s: %w", cfg.Call, err)
	}

	col.start = cfg.Now()
	type outcome struct {
		rep *runner.Report
		err error
	}
	runDone := make(chan outcome, 1)
	go func() {
		rep, err := reqr.Run()
		runDone <- outcome{rep, err}
	}()

	stopProgress := startProgress(progress, cfg, col, col.start)
	var bound <-chan time.Time
	if cfg.Duration > 0 {
		t := time.NewTimer(cfg.Duration)
		defer t.Stop()
		bound = t.C
	}
	var out outcome
	endReason := EndTotal
	select {
	case out = <-runDone:
	case <-bound:
		// ghz applies DurationStop only for ReasonTimeout; for the
		// report, reaching the duration is the run's normal end.
		stopRequester(reqr, runner.ReasonTimeout)
		out = <-runDone
		endReason = EndDuration
	case <-ctx.Done():
		stopRequester(reqr, runner.ReasonCancel)
		out = <-runDone
		endReason = EndCancel
	}
	stopProgress()

	if out.rep == nil {
		if out.err == nil {
			out.err = errors.New("no report")
		}
		return nil, fmt.Errorf("loadtest: %s: %w", cfg.Call, out.err)
	}
	if out.err != nil && ctx.Err() == nil {
		// Worker errors are setup errors, such as data that does not fit
		// the request message; failed calls are in the report instead.
		return nil, fmt.Errorf("loadtest: %s: %w", cfg.Call, firstError(out.err))
	}
	res := newResult(cfg, out.rep, col, endReason)
	if err := ctx.Err(); err != nil {
		return res, fmt.Errorf("loadtest: interrupted after %d calls: %w", res.Count, err)
	}
	return res, nil
}

// firstError returns the first of the errors ghz joined (with
// go.uber.org/multierr, which implements Unwrap() []error), so a setup error
// repeated by every worker is reported once.
func firstError(err error) error {
	if u, ok := err.(interface{ Unwrap() []error }); ok {
		if errs := u.Unwrap(); len(errs) > 0 {
			return errs[0]
		}
	}
	return err
}

// stopRequester stops a requester whose Run has not returned yet. ghz's
// Stop sends on a channel that Run closes as it returns, so a Stop racing
// with the natural end of the run can panic; that end is what Stop was for,
// so the panic is dropped.
func stopRequester(r *runner.Requester, reason runner.StopReason) {
	defer func() { _ = recover() }()
	r.Stop(reason)
}

// checkReachable dials target once over TCP.
func checkReachable(ctx context.Context, target string, timeout time.Duration) error {
	d := net.Dialer{Timeout: timeout}
	conn, err := d.DialContext(ctx, "tcp", target)
	if err != nil {
		var oe *net.OpError
		if errors.As(err, &oe) && oe.Err != nil {
			err = oe.Err
		}
		return fmt.Errorf("loadtest: cannot reach %s: %w", target, err)
	}
	return conn.Close()
}

// startProgress writes a progress line to w every cfg.ProgressInterval until
// the returned function is called; that function waits for the writer
// goroutine to exit and, on a terminal, clears the line.
func startProgress(w io.Writer, cfg Config, col *collector, start time.Time) (stop func()) {
	if w == nil {
		return func() {}
	}
	quit := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(cfg.ProgressInterval)
		defer t.Stop()
		for {
			select {
			case <-quit:
				return
			case <-t.C:
				line := progressLine(cfg.Now().Sub(start), col.done.Load(), col.failed.Load())
				if cfg.ProgressTTY {
					fmt.Fprintf(w, "\r%s\x1b[K", line)
				} else {
					fmt.Fprintln(w, line)
				}
			}
		}
	}()
	return func() {
		close(quit)
		wg.Wait()
		if cfg.ProgressTTY {
			fmt.Fprint(w, "\r\x1b[K")
		}
	}
}

func progressLine(elapsed time.Duration, calls, errs int64) string {
	rps := 0.0
	if s := elapsed.Seconds(); s > 0 {
		rps = float64(calls) / s
	}
	return fmt.Sprintf("loadtest: %6.1fs  %8d calls  %9.1f calls/s  %d errors",
		elapsed.Seconds(), calls, rps, errs)
}

// okLatencies returns the sorted latencies of the calls ghz saw succeed.
func okLatencies(rep *runner.Report) []time.Duration {
	lat := make([]time.Duration, 0, len(rep.Details))
	for _, d := range rep.Details {
		if d.Error == "" {
			lat = append(lat, d.Latency)
		}
	}
	slices.Sort(lat)
	return lat
}
