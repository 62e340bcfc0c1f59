package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/testserver"
)

// runMainEnv, set to 1 in a test binary's environment, makes it run main
// instead of the tests: tests that need a process of the command's own
// (signals) run the test binary as streamlb.
const runMainEnv = "STREAMLB_TEST_RUN_MAIN"

// TestMain fails the package's tests if any goroutine outlives them.
func TestMain(m *testing.M) {
	if os.Getenv(runMainEnv) == "1" {
		main()
		os.Exit(0)
	}
	goleak.VerifyTestMain(m)
}

// TestUsage runs the app on command lines that must be rejected, or answered
// with help, before anything is started. Not parallel: urfave/cli/v2 mutates
// package globals (its help flag and command) in every Run.
func TestUsage(t *testing.T) {
	tests := []struct {
		name     string
		args     []string
		wantCode int
		wantOut  string // substring of stdout
		wantErr  string // substring of the returned error
	}{
		{name: "help", args: []string{"--help"}, wantOut: "balances every stream"},
		{name: "no arguments", args: nil, wantOut: "COMMANDS"},
		{name: "proxy help", args: []string{"proxy", "--help"}, wantOut: "--drain-timeout"},
		{name: "testserver help", args: []string{"testserver", "--help"}, wantOut: "--error-rate"},
		{name: "unknown command", args: []string{"frobnicate"}, wantCode: 2, wantErr: `unknown command "frobnicate"`},
		{name: "unknown flag", args: []string{"proxy", "--bogus"}, wantCode: 2, wantErr: "-bogus"},
		{name: "no backend", args: []string{"proxy"}, wantCode: 2, wantErr: "no backend"},
		{name: "bad policy", args: []string{"proxy", "--backend", "127.0.0.1:1", "--policy", "no_such_policy"}, wantCode: 2, wantErr: `unknown --policy "no_such_policy"`},
		{name: "bad engine", args: []string{"proxy", "--backend", "127.0.0.1:1", "--engine", "l4"}, wantCode: 2, wantErr: `unknown --engine "l4"`},
		{name: "bad backend", args: []string{"proxy", "--backend", "no-port"}, wantCode: 2, wantErr: "--backend"},
		{name: "duplicate backend", args: []string{"proxy", "--backend", "127.0.0.1:1", "--backend", "127.0.0.1:1"}, wantCode: 2, wantErr: "duplicate"},
		{name: "bad choice count", args: []string{"proxy", "--backend", "127.0.0.1:1", "--policy", "least_request", "--choice-count", "99"}, wantCode: 2, wantErr: "choice count"},
		{name: "zero max streams", args: []string{"proxy", "--backend", "127.0.0.1:1", "--max-concurrent-streams", "0"}, wantCode: 2, wantErr: "--max-concurrent-streams"},
		{name: "bad duration", args: []string{"proxy", "--backend", "127.0.0.1:1", "--drain-timeout", "soon"}, wantCode: 2, wantErr: "drain-timeout"},
		{name: "bad log level", args: []string{"proxy", "--backend", "127.0.0.1:1", "--log-level", "loud"}, wantCode: 2, wantErr: "--log-level"},
		{name: "bad log format", args: []string{"testserver", "--name", "a", "--log-format", "xml"}, wantCode: 2, wantErr: "--log-format"},
		{name: "testserver without name", args: []string{"testserver"}, wantCode: 2, wantErr: "--name"},
		{name: "testserver bad error rate", args: []string{"testserver", "--name", "a", "--error-rate", "2"}, wantCode: 2, wantErr: "ErrorRate"},
		{name: "demo zero pods", args: []string{"demo", "--steps", "3,0"}, wantCode: 2, wantErr: "pods"},
		{name: "demo bad steps", args: []string{"demo", "--steps", "three"}, wantCode: 2, wantErr: "steps"},
		{name: "TLS cert without key", args: []string{"proxy", "--backend", "127.0.0.1:1", "--tls-cert", "a.crt"}, wantCode: 2, wantErr: "--tls-cert and --tls-key"},
		{name: "client CA without cert", args: []string{"proxy", "--backend", "127.0.0.1:1", "--tls-client-ca", "ca.crt"}, wantCode: 2, wantErr: "--tls-client-ca needs"},
		{name: "missing TLS files", args: []string{"proxy", "--backend", "127.0.0.1:1", "--tls-cert", "/nonexistent/a.crt", "--tls-key", "/nonexistent/a.key"}, wantCode: 2, wantErr: "/nonexistent/a.crt"},
		{name: "backend cert without CA", args: []string{"proxy", "--backend", "127.0.0.1:1", "--backend-tls-cert", "a.crt", "--backend-tls-key", "a.key"}, wantCode: 2, wantErr: "need --backend-tls-ca"},
		{name: "missing backend CA", args: []string{"proxy", "--backend", "127.0.0.1:1", "--backend-tls-ca", "/nonexistent/ca.crt"}, wantCode: 2, wantErr: "backend CA"},
		{name: "etcd user without password", args: []string{"proxy", "--backend", "etcd://127.0.0.1:1/svc", "--etcd-username", "lb"}, wantCode: 2, wantErr: "STREAMLB_ETCD_PASSWORD"},
		{name: "etcd cert without key", args: []string{"proxy", "--backend", "etcd://127.0.0.1:1/svc", "--etcd-cert", "a.pem"}, wantCode: 2, wantErr: "--etcd-cert and --etcd-key"},
		{name: "zk user without password", args: []string{"proxy", "--backend", "zk://127.0.0.1:1/svc", "--zk-username", "svc"}, wantCode: 2, wantErr: "STREAMLB_ZK_PASSWORD"},
		{name: "zk password without user", args: []string{"proxy", "--backend", "zk://127.0.0.1:1/svc", "--zk-password", "x"}, wantCode: 2, wantErr: "needs --zk-username"},
		{name: "zk cert without key", args: []string{"proxy", "--backend", "zk://127.0.0.1:1/svc", "--zk-cert", "a.pem"}, wantCode: 2, wantErr: "--zk-cert and --zk-key"},
		{name: "missing zk CA", args: []string{"proxy", "--backend", "zk://127.0.0.1:1/svc", "--zk-ca", "/nonexistent/zk-ca.pem"}, wantCode: 2, wantErr: "/nonexistent/zk-ca.pem"},
		{name: "zk user with a colon", args: []string{"proxy", "--backend", "zk://127.0.0.1:1/svc", "--zk-username", "a:b", "--zk-password", "x"}, wantCode: 2, wantErr: "must not contain ':'"},
		{name: "testserver zk user without password", args: []string{"testserver", "--name", "a", "--register", "zk://127.0.0.1:1/svc", "--zk-username", "svc"}, wantCode: 2, wantErr: "STREAMLB_ZK_PASSWORD"},
		{name: "testserver missing etcd CA", args: []string{"testserver", "--name", "a", "--register", "etcd://127.0.0.1:1/svc", "--etcd-ca", "/nonexistent/ca.pem"}, wantCode: 2, wantErr: "/nonexistent/ca.pem"},
		{name: "negative retry budget", args: []string{"proxy", "--backend", "127.0.0.1:1", "--retry-budget=-1"}, wantCode: 2, wantErr: "--retry-budget must not be negative"},
		{name: "negative GC minimum heap", args: []string{"proxy", "--backend", "127.0.0.1:1", "--gc-min-heap=-1"}, wantCode: 2, wantErr: "--gc-min-heap must not be negative"},
		{name: "stray argument", args: []string{"proxy", "--backend", "127.0.0.1:1", "extra"}, wantCode: 2, wantErr: `unexpected argument "extra"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			app := newApp()
			app.Writer, app.ErrWriter = &stdout, &stderr
			// A cancelled context makes a command line that unexpectedly
			// passes validation stop at once instead of serving forever.
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			err := app.RunContext(ctx, append([]string{"streamlb"}, tc.args...))
			if got := exitCode(err); got != tc.wantCode {
				t.Errorf("exit code = %d (err %v), want %d", got, err, tc.wantCode)
			}
			if tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Errorf("error = %v, want it to contain %q", err, tc.wantErr)
			}
			if err != nil && strings.Contains(err.Error(), "\n") {
				t.Errorf("error %q spans several lines, want one", err)
			}
			if !strings.Contains(stdout.String(), tc.wantOut) {
				t.Errorf("stdout = %q, want it to contain %q", stdout.String(), tc.wantOut)
			}
		})
	}
}

// TestProxyCommand runs the proxy command against a real backend, makes a
// call through it, then cancels the app's context as a signal would and
// expects a clean drain and a nil error.
func TestProxyCommand(t *testing.T) {
	// Not parallel: the command sets the slog default logger, and
	// urfave/cli/v2 mutates package globals.
	prev := slog.Default()
	t.Cleanup(func() { slog.SetDefault(prev) })

	for _, engine := range cluster.Engines() {
		t.Run(engine, func(t *testing.T) {
			ts := startBackend(t)

			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			app := startApp(ctx, t, []string{"proxy", "--listen", "127.0.0.1:0", "--backend", ts.Addr(),
				"--engine", engine, "--drain-timeout", "5s", "--log-format", "json"}, "listening")
			addr := app.wait(ctx, t)["listening"].Addr

			cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				t.Fatal(err)
			}
			var header metadata.MD
			_, err = testgrpc.NewTestServiceClient(cc).EmptyCall(ctx, &testgrpc.Empty{}, grpc.Header(&header))
			cc.Close()
			if err != nil {
				t.Fatalf("EmptyCall through the proxy: %v", err)
			}
			if got := testserver.BackendFromHeader(header); got != "b1" {
				t.Errorf("call landed on %q, want b1", got)
			}

			if err := app.shutdown(t); err != nil || exitCode(err) != 0 {
				t.Errorf("proxy command returned %v (exit code %d), want nil", err, exitCode(err))
			}
		})
	}
}

// logRecord is what the tests read of a JSON log line.
type logRecord struct {
	Msg   string `json:"msg"`
	Addr  string `json:"addr"`
	Key   string `json:"key"`
	Level string `json:"level"`
}

// appRun is the app running one command line in a goroutine of its own,
// as main runs it, with its JSON logs read from a pipe.
type appRun struct {
	stop   context.CancelFunc // as SIGTERM would
	done   chan struct{}      // closed once RunContext returned and its logs were read
	err    error              // what RunContext returned, once done is closed
	logged chan map[string]logRecord
	// seen holds the message of every JSON log line; read it once done is
	// closed.
	seen map[string]struct{}
}

// startApp runs `streamlb args...` (args must ask for JSON logs) under a
// child of ctx. Once every one of msgs has been logged, logged receives
// the first record of each. The app is stopped and waited for at cleanup
// if the test has not done so.
func startApp(ctx context.Context, t *testing.T, args []string, msgs ...string) *appRun {
	t.Helper()
	return startAppWriter(ctx, t, nil, args, msgs...)
}

// startAppWriter is startApp with the app's stderr wrapped by wrap, if
// not nil.
func startAppWriter(ctx context.Context, t *testing.T, wrap func(io.Writer) io.Writer, args []string, msgs ...string) *appRun {
	t.Helper()
	appCtx, stop := context.WithCancel(ctx)
	r := &appRun{stop: stop, done: make(chan struct{}), logged: make(chan map[string]logRecord, 1), seen: map[string]struct{}{}}
	logs, logw := io.Pipe()
	scanDone := make(chan struct{})
	go func() {
		defer close(scanDone)
		got := map[string]logRecord{}
		sent := false
		sc := bufio.NewScanner(logs)
		for sc.Scan() {
			var rec logRecord
			if json.Unmarshal(sc.Bytes(), &rec) != nil {
				continue
			}
			r.seen[rec.Msg] = struct{}{}
			if sent || !slices.Contains(msgs, rec.Msg) {
				continue
			}
			if _, ok := got[rec.Msg]; !ok {
				got[rec.Msg] = rec
			}
			if len(got) == len(msgs) {
				r.logged <- got
				sent = true
			}
		}
		io.Copy(io.Discard, logs)
	}()
	app := newApp()
	app.Writer, app.ErrWriter = io.Discard, logw
	if wrap != nil {
		app.ErrWriter = wrap(logw)
	}
	go func() {
		r.err = app.RunContext(appCtx, append([]string{"streamlb"}, args...))
		logw.Close()
		<-scanDone
		close(r.done)
	}()
	t.Cleanup(func() {
		stop()
		select {
		case <-r.done:
		case <-time.After(30 * time.Second):
			t.Error("the app did not return after its context was cancelled")
		}
	})
	return r
}

// wait returns the records startApp was asked to wait for, failing t if
// the app returns first or ctx ends.
func (r *appRun) wait(ctx context.Context, t *testing.T) map[string]logRecord {
	t.Helper()
	select {
	case got := <-r.logged:
		return got
	case <-r.done:
		t.Fatalf("the app returned %v before it logged what the test waits for", r.err)
	case <-ctx.Done():
		t.Fatal("the app never logged what the test waits for")
	}
	return nil
}

// shutdown cancels the app's context, as SIGTERM would, and returns what
// the app returned, failing t if it does not return within 30s.
func (r *appRun) shutdown(t *testing.T) error {
	t.Helper()
	r.stop()
	select {
	case <-r.done:
		return r.err
	case <-time.After(30 * time.Second):
		t.Fatal("the app did not return after its context was cancelled")
	}
	return nil
}

// startBackend starts a testserver named b1 on a free loopback port for
// the test, stopped at cleanup.
func startBackend(t *testing.T) *testserver.Server {
	t.Helper()
	ts, err := testserver.New(testserver.Config{Name: "b1", Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if err := ts.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ts.Stop)
	return ts
}
