// Command streamlb is a gRPC-aware L7 proxy that picks a backend for every
// stream, not every connection.
//
// It parses flags and calls into the packages, and does nothing else:
// cluster wires resolver, director and proxy together for the proxy command,
// demo runs the headless-service demo on the same wiring, testserver
// provides backends to try it on and loadtest drives load. Every command
// runs under one context that SIGINT or SIGTERM
// cancels, waits for everything it started, and maps the result to an exit
// code: 0 on success or after a drain, 1 on a runtime failure, 2 on a usage
// error.
package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime/debug"
	"slices"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/streamlb/streamlb/cluster"
)

// Exit codes.
const (
	exitFailure = 1 // a runtime failure: listen, serve, resolve
	exitUsage   = 2 // bad flags or flag values
)

func main() {
	err := newApp().Run(os.Args)
	if err == nil {
		return
	}
	// A stderr pipe nobody reads must not keep the process from exiting
	// (the log itself goes through a LogWriter): the deadline applies
	// where stderr is a pipe or a socket, and is refused, harmlessly, on a
	// terminal or a regular file.
	os.Stderr.SetWriteDeadline(time.Now().Add(2 * time.Second))
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
		Version:      buildVersion(debug.ReadBuildInfo),
		Commands:     []*cli.Command{proxyCommand(), validateCommand(), testserverCommand(), demoCommand(), loadtestCommand(), versionCommand()},
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
		&cli.IntFlag{
			Name:  "log-buffer",
			Value: cluster.DefaultLogBuffer,
			Usage: "`BYTES` of log lines held while stderr does not take them; lines past it are dropped and counted, so logging never waits for stderr",
		},
	}
}

// newLogger builds the logger the flags ask for. It writes to w through a
// cluster.LogWriter of --log-buffer bytes, so that logging never waits for
// w (a stderr pipe nobody reads would otherwise stop whatever logs); the
// caller closes the LogWriter, which flushes it, once nothing logs any
// more.
func newLogger(c *cli.Context, w io.Writer) (*slog.Logger, *cluster.LogWriter, error) {
	var level slog.Level
	name := strings.ToLower(c.String("log-level"))
	if !slices.Contains([]string{"debug", "info", "warn", "error"}, name) {
		return nil, nil, usageErr("unknown --log-level %q (want debug, info, warn or error)", c.String("log-level"))
	}
	if err := level.UnmarshalText([]byte(name)); err != nil {
		return nil, nil, usageErr("--log-level: %v", err)
	}
	var handler func(io.Writer, *slog.HandlerOptions) slog.Handler
	switch c.String("log-format") {
	case "text":
		handler = func(w io.Writer, o *slog.HandlerOptions) slog.Handler { return slog.NewTextHandler(w, o) }
	case "json":
		handler = func(w io.Writer, o *slog.HandlerOptions) slog.Handler { return slog.NewJSONHandler(w, o) }
	default:
		return nil, nil, usageErr("unknown --log-format %q (want text or json)", c.String("log-format"))
	}
	size := c.Int("log-buffer")
	if size <= 0 {
		return nil, nil, usageErr("--log-buffer must be positive, got %d", size)
	}
	// The line saying how many lines were dropped goes out at every level.
	notice := func(n int64) []byte {
		var b bytes.Buffer
		slog.New(handler(&b, nil)).Warn("log lines dropped: stderr did not take them in time", "dropped", n)
		return b.Bytes()
	}
	lw := cluster.NewLogWriter(w, size, notice)
	return slog.New(handler(lw, &slog.HandlerOptions{Level: level})), lw, nil
}
