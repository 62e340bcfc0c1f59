//go:build !proxyonly

package main

import (
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/streamlb/streamlb/loadtest"
)

// exitAssert is the exit code of a loadtest whose --assert-balance or
// --assert-max-error-rate check failed.
const exitAssert = 3

// loadtestCommand is `streamlb loadtest`: ghz-driven load with a
// per-backend balance report.
func loadtestCommand() *cli.Command {
	return &cli.Command{
		Name:      "loadtest",
		Usage:     "drive gRPC load with ghz and report how calls spread over backends",
		UsageText: "streamlb loadtest --call package.Service/Method [options] HOST:PORT",
		Description: "Makes gRPC calls with ghz (github.com/bojand/ghz) as a library, all over\n" +
			"--connections client connections (default 1, the case a per-stream balancer\n" +
			"is for), and reports ghz's summary plus where the calls landed: calls, share,\n" +
			"errors and latency per backend, read from the --backend-header response\n" +
			"header of every call, and the status codes. Flags are named as ghz's.\n" +
			"The method is looked up by server reflection unless --proto or --protoset\n" +
			"is given. Put flags before the target.\n\n" +
			"Exit codes:\n" +
			"  0  the run was made and every --assert-* check passed (failed calls are\n" +
			"     reported, not fatal, unless --assert-max-error-rate is given)\n" +
			"  1  the run could not happen or was cut short: unreachable target, unknown\n" +
			"     method, --out not writable (checked before the load), interrupted\n" +
			"  2  usage error: bad flags or flag values\n" +
			"  3  an --assert-balance or --assert-max-error-rate check failed (the\n" +
			"     reports are still written)",
		OnUsageError: onUsageError,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "target", Usage: "server `HOST:PORT` (or give it as the argument)"},
			// Required, but checked in runLoadtest (see proxy's --backend).
			&cli.StringFlag{Name: "call", Usage: "required: method to call, `package.Service/Method`"},
			&cli.StringFlag{Name: "data", Aliases: []string{"d"}, Usage: "request message as `JSON` (an array of messages for client streams); @ reads it from stdin (default {})"},
			&cli.StringFlag{Name: "data-file", Aliases: []string{"D"}, Usage: "read the JSON request message from `FILE`"},
			&cli.BoolFlag{Name: "binary", Aliases: []string{"b"}, Usage: "read the request message from stdin, serialized as binary protobuf"},
			&cli.StringFlag{Name: "binary-file", Aliases: []string{"B", "binary-data"}, Usage: "read the request message from `FILE`, serialized as binary protobuf"},
			&cli.StringFlag{Name: "metadata", Aliases: []string{"m"}, Usage: "call metadata as a `JSON` object of strings, e.g. '{\"x-delay\":\"1ms\"}'"},
			&cli.StringFlag{Name: "proto", Usage: "describe the method with this .proto `FILE` instead of server reflection"},
			&cli.StringFlag{Name: "protoset", Usage: "describe the method with this compiled protoset `FILE` instead of server reflection"},
			&cli.StringFlag{Name: "import-paths", Aliases: []string{"i"}, Usage: "comma-separated `DIRS` to search for --proto imports"},
			&cli.IntFlag{Name: "total", Aliases: []string{"n"}, DefaultText: fmt.Sprintf("%d, or unbounded with --duration", loadtest.DefaultTotal), Usage: "number of calls to make; with --duration too, the run stops at whichever comes first"},
			&cli.DurationFlag{Name: "duration", Aliases: []string{"z"}, DefaultText: "none", Usage: "make calls for this long"},
			&cli.StringFlag{Name: "duration-stop", Value: loadtest.DefaultDurationStop, Usage: "at the --duration bound, calls in flight: wait (finish), close (fail), ignore (cut, left out)"},
			&cli.IntFlag{Name: "concurrency", Aliases: []string{"c"}, Value: loadtest.DefaultConcurrency, Usage: "workers making calls, each one at a time"},
			&cli.IntFlag{Name: "connections", Value: loadtest.DefaultConnections, Usage: "client connections the workers share"},
			&cli.IntFlag{Name: "rps", Aliases: []string{"r"}, DefaultText: "unlimited", Usage: "cap on calls started per second; 0 is unlimited"},
			&cli.DurationFlag{Name: "timeout", Aliases: []string{"t"}, Value: loadtest.DefaultTimeout, Usage: "deadline of each call"},
			&cli.DurationFlag{Name: "connect-timeout", Value: loadtest.DefaultConnectTimeout, Usage: "bound on connecting and on the reflection lookup"},
			&cli.BoolFlag{Name: "insecure", Value: true, Usage: "cleartext HTTP/2 (h2c); --insecure=false uses TLS"},
			&cli.StringFlag{Name: "cacert", Usage: "with --insecure=false: PEM `FILE` of root certificates (default: the system's)"},
			&cli.BoolFlag{Name: "skipTLS", Usage: "with --insecure=false: do not verify the server's certificate"},
			&cli.StringFlag{Name: "name", Usage: "label of the run, shown in the reports"},
			&cli.StringFlag{Name: "backend-header", Value: loadtest.DefaultBackendHeader, Usage: "response header `NAME` that names the backend of each call"},
			&cli.StringFlag{Name: "format", Value: "table", Usage: "report on stdout: table or json"},
			&cli.StringFlag{Name: "out", Usage: "also write the report as a self-contained HTML page to `FILE` (checked writable before the load runs)"},
			&cli.BoolFlag{Name: "timeline", Usage: "with --format table: add calls and errors per backend per interval (1s, scaled for short and long runs)"},
			&cli.BoolFlag{Name: "progress", Usage: "write a progress line to stderr every 500ms even when stderr is not a terminal"},
			&cli.Float64Flag{Name: "assert-balance", Value: -1, DefaultText: "off", Usage: "exit 3 if any backend's share is more than `PCT` percentage points from an even share"},
			&cli.Float64Flag{Name: "assert-max-error-rate", Value: -1, DefaultText: "off", Usage: "exit 3 if more than `PCT` percent (0..100) of the calls failed, or none was made"},
			&cli.IntFlag{Name: "expect-backends", DefaultText: "the backends seen", Usage: "with --assert-balance: the even share is 100/`N` (backends with no calls count as 0%)"},
		},
		Action: runLoadtest,
	}
}

func runLoadtest(c *cli.Context) error {
	cfg, err := loadtestConfig(c)
	if err != nil {
		return err
	}
	format := c.String("format")
	if format != "table" && format != "json" {
		return usageErr("unknown --format %q (want table or json)", format)
	}
	assert := c.IsSet("assert-balance")
	if assert && c.Float64("assert-balance") < 0 {
		return usageErr("--assert-balance must not be negative, got %v", c.Float64("assert-balance"))
	}
	if c.Int("expect-backends") < 0 {
		return usageErr("--expect-backends must not be negative, got %d", c.Int("expect-backends"))
	}
	assertErrs := c.IsSet("assert-max-error-rate")
	if r := c.Float64("assert-max-error-rate"); assertErrs && (r < 0 || r > 100) {
		return usageErr("--assert-max-error-rate must be a percentage from 0 to 100, got %v", r)
	}

	// Open --out now, so a path that cannot be written fails before the
	// load, not after it.
	var page *reportFile
	if path := c.String("out"); path != "" {
		if page, err = openReportFile(path); err != nil {
			return failure(err)
		}
		defer page.discard()
	}

	var progress io.Writer
	if isTerminal(c.App.ErrWriter) {
		progress, cfg.ProgressTTY = c.App.ErrWriter, true
	} else if c.Bool("progress") {
		progress = c.App.ErrWriter
	}

	ctx, stop := signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
	defer stop()
	res, runErr := loadtest.Run(ctx, cfg, progress)
	if res == nil {
		return failure(runErr)
	}

	if format == "json" {
		err = res.WriteJSON(c.App.Writer)
	} else {
		err = res.WriteTable(c.App.Writer)
		if err == nil && c.Bool("timeline") {
			err = res.WriteTimeline(c.App.Writer)
		}
	}
	if err != nil {
		return failure(err)
	}
	if page != nil {
		if err := page.write(res); err != nil {
			return failure(err)
		}
	}
	if runErr != nil {
		return failure(runErr) // interrupted: the partial report is out
	}
	var failed []string
	if assert {
		if err := res.CheckBalance(c.Float64("assert-balance"), c.Int("expect-backends")); err != nil {
			failed = append(failed, err.Error())
		}
	}
	if assertErrs {
		if err := res.CheckErrorRate(c.Float64("assert-max-error-rate")); err != nil {
			failed = append(failed, err.Error())
		}
	}
	if len(failed) > 0 {
		return cli.Exit(strings.Join(failed, "; "), exitAssert)
	}
	return nil
}

// loadtestConfig builds the loadtest configuration from the flags, reading
// the request data they point at. Its errors are usage errors.
func loadtestConfig(c *cli.Context) (loadtest.Config, error) {
	target := c.String("target")
	switch {
	case c.NArg() > 1 || (c.NArg() == 1 && target != ""):
		extra := c.Args().Get(c.NArg() - 1)
		if target == "" {
			extra = c.Args().Get(1)
		}
		if strings.HasPrefix(extra, "-") {
			return loadtest.Config{}, usageErr("unexpected argument %q: flags go before the target (streamlb loadtest [options] HOST:PORT)", extra)
		}
		return loadtest.Config{}, usageErr("unexpected argument %q (give the target once)", extra)
	case c.NArg() == 1:
		target = c.Args().First()
	}
	if target == "" {
		return loadtest.Config{}, usageErr("no target: give HOST:PORT as the argument or with --target")
	}
	if c.String("call") == "" {
		return loadtest.Config{}, usageErr("no call: give --call package.Service/Method")
	}
	cfg := loadtest.Config{
		Target:         target,
		Call:           c.String("call"),
		Name:           c.String("name"),
		Proto:          c.String("proto"),
		Protoset:       c.String("protoset"),
		Total:          c.Int("total"),
		Duration:       c.Duration("duration"),
		DurationStop:   c.String("duration-stop"),
		Concurrency:    c.Int("concurrency"),
		Connections:    c.Int("connections"),
		RPS:            c.Int("rps"),
		Timeout:        c.Duration("timeout"),
		ConnectTimeout: c.Duration("connect-timeout"),
		TLS:            !c.Bool("insecure"),
		CACert:         c.String("cacert"),
		SkipTLSVerify:  c.Bool("skipTLS"),
		BackendHeader:  strings.ToLower(c.String("backend-header")),
	}
	for _, p := range strings.Split(c.String("import-paths"), ",") {
		if p = strings.TrimSpace(p); p != "" {
			cfg.ImportPaths = append(cfg.ImportPaths, p)
		}
	}
	// Zero values mean "default" in loadtest.Config; on the command line
	// they are mistakes.
	for _, name := range []string{"concurrency", "connections", "total"} {
		if c.IsSet(name) && c.Int(name) <= 0 {
			return cfg, usageErr("--%s must be positive, got %d", name, c.Int(name))
		}
	}
	for _, name := range []string{"timeout", "connect-timeout", "duration"} {
		if c.IsSet(name) && c.Duration(name) <= 0 {
			return cfg, usageErr("--%s must be positive, got %v", name, c.Duration(name))
		}
	}

	sources := 0
	for _, name := range []string{"data", "data-file", "binary", "binary-file"} {
		if c.IsSet(name) {
			sources++
		}
	}
	if sources > 1 {
		return cfg, usageErr("give the request message once: --data, --data-file, --binary or --binary-file")
	}
	var err error
	switch {
	case c.String("data") == "@":
		cfg.Data, err = io.ReadAll(os.Stdin)
	case c.IsSet("data"):
		cfg.Data = []byte(c.String("data"))
	case c.IsSet("data-file"):
		cfg.Data, err = os.ReadFile(c.String("data-file"))
	case c.Bool("binary"):
		cfg.BinaryData, err = io.ReadAll(os.Stdin)
	case c.IsSet("binary-file"):
		cfg.BinaryData, err = os.ReadFile(c.String("binary-file"))
	}
	if err != nil {
		return cfg, usageErr("request data: %v", err)
	}
	if s := c.String("metadata"); s != "" {
		if cfg.Metadata, err = loadtest.ParseMetadata(s); err != nil {
			return cfg, usageErr("--metadata: %v", strings.TrimPrefix(err.Error(), "loadtest: "))
		}
	}
	if err := cfg.Validate(); err != nil {
		return cfg, usageErr("%s", strings.ReplaceAll(err.Error(), "\n", "; "))
	}
	return cfg, nil
}

// reportFile is the --out file, opened before the run so an unwritable
// path fails fast. Until write succeeds, discard removes a file the command
// created (and leaves a file that was there untouched).
type reportFile struct {
	f       *os.File
	created bool
	written bool
}

func openReportFile(path string) (*reportFile, error) {
	_, statErr := os.Stat(path)
	// No O_TRUNC: an existing report survives a run that fails.
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("--out: %w", err)
	}
	return &reportFile{f: f, created: os.IsNotExist(statErr)}, nil
}

// write replaces the file's content with res as HTML and closes it.
func (r *reportFile) write(res *loadtest.Result) error {
	err := r.f.Truncate(0)
	if err == nil {
		err = res.WriteHTML(r.f)
	}
	if cerr := r.f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("--out: %w", err)
	}
	r.written = true
	return nil
}

// discard closes the file unless written, and removes it if the command
// created it.
func (r *reportFile) discard() {
	if r.written {
		return
	}
	r.f.Close()
	if r.created {
		os.Remove(r.f.Name())
	}
}

// isTerminal reports whether w is a character device, such as a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}
