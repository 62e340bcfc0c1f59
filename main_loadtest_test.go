//go:build !proxyonly

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/loadtest"
	"github.com/streamlb/streamlb/testserver"
)

// TestLoadtestCommand runs `streamlb loadtest` against a real test backend:
// reports on stdout and in an HTML file, the balance assertion, and the
// errors of bad command lines. Not parallel: urfave/cli/v2 mutates package
// globals in every Run.
func TestLoadtestCommand(t *testing.T) {
	ts, err := testserver.New(testserver.Config{Name: "solo", Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if err := ts.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ts.Stop)
	live := ts.Addr()

	// Refused for the whole test: a port merely closed again was taken
	// by another package's server, run in parallel, and "unreachable"
	// reached it.
	dead := testkit.RefusingAddr(t)

	dir := t.TempDir()
	page := filepath.Join(dir, "report.html")
	const (
		call    = "grpc.testing.TestService/EmptyCall"
		unary   = "grpc.testing.TestService/UnaryCall"
		failing = `{"response_status":{"code":14,"message":"planned"}}`
	)
	// noLoad checks that a command failing before the load made no call.
	var callsBefore int64
	noLoad := func(t *testing.T, _ string) {
		if got := ts.Calls(); got != callsBefore {
			t.Errorf("the backend got %d calls, want none: the command should fail before the load", got-callsBefore)
		}
	}

	tests := []struct {
		name     string
		args     []string
		wantCode int
		wantErr  string // substring of the returned error
		wantOut  string // substring of stdout
		check    func(t *testing.T, stdout string)
	}{
		{
			name:    "table",
			args:    []string{"--call", call, "-n", "40", "-c", "4", live},
			wantOut: "Backends (from the \"x-backend\" response header; latencies on the wire clock)",
		},
		{
			name:    "timeline",
			args:    []string{"--call", call, "-n", "40", "-c", "4", "--timeline", live},
			wantOut: "Timeline (calls per backend per 100ms",
		},
		{
			name: "duration ends normally",
			args: []string{"--call", call, "-z", "200ms", "-c", "2", "--rps", "100", "--format", "json", live},
			check: func(t *testing.T, stdout string) {
				var rep loadtest.JSONReport
				if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
					t.Fatal(err)
				}
				if rep.EndReason != loadtest.EndDuration {
					t.Errorf("end reason %q, want %q, not timeout", rep.EndReason, loadtest.EndDuration)
				}
			},
		},
		{
			name:    "error rate passes",
			args:    []string{"--call", unary, "-n", "30", "-c", "3", "--assert-max-error-rate", "0", live},
			wantOut: "solo",
		},
		{
			name:     "error rate fails",
			args:     []string{"--call", unary, "-d", failing, "-n", "30", "-c", "3", "--assert-max-error-rate", "50", live},
			wantCode: exitAssert,
			wantErr:  "error rate assertion failed: 30 of 30 calls failed (100.00%, allowed 50%)",
			wantOut:  "Unavailable",
		},
		{
			name:     "both gates fail",
			args:     []string{"--call", unary, "-d", failing, "-n", "30", "-c", "3", "--assert-max-error-rate", "10", "--assert-balance", "5", "--expect-backends", "2", live},
			wantCode: exitAssert,
			wantErr:  "balance assertion failed: backend solo got 100.0% (even share 50.0%, allowed ±5); error rate assertion failed",
		},
		{
			name:     "error rate all allowed",
			args:     []string{"--call", unary, "-d", failing, "-n", "10", "-c", "2", "--assert-max-error-rate", "100", live},
			wantOut:  "Unavailable",
			wantCode: 0,
		},
		{name: "error rate out of range", args: []string{"--call", call, "--assert-max-error-rate", "101", live}, wantCode: exitUsage, wantErr: "--assert-max-error-rate must be a percentage"},
		{
			name:     "out not writable",
			args:     []string{"--call", call, "-n", "10", "--out", filepath.Join(dir, "missing", "r.html"), live},
			wantCode: exitFailure,
			wantErr:  "--out: open " + filepath.Join(dir, "missing", "r.html"),
			check:    noLoad,
		},
		{
			name:     "out is a directory",
			args:     []string{"--call", call, "-n", "10", "--out", dir, live},
			wantCode: exitFailure,
			wantErr:  "--out:",
			check:    noLoad,
		},
		{
			name: "json and html",
			args: []string{"--call", call, "--total", "30", "--concurrency", "3", "--format", "json", "--out", page,
				"--assert-balance", "10", "--expect-backends", "1", "--target", live},
			check: func(t *testing.T, stdout string) {
				var rep loadtest.JSONReport
				if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
					t.Fatalf("stdout is not the JSON report: %v\n%s", err, stdout)
				}
				if rep.Count != 30 || len(rep.Backends) != 1 || rep.Backends[0].Name != "solo" || rep.Backends[0].Calls != 30 {
					t.Errorf("JSON report %+v, want 30 calls all on solo", rep)
				}
				html, err := os.ReadFile(page)
				if err != nil {
					t.Fatal(err)
				}
				for _, want := range []string{"<svg", "solo", "Timeline", "Started", live, call, "p50 wire", "p50 client"} {
					if !bytes.Contains(html, []byte(want)) {
						t.Errorf("HTML report lacks %q", want)
					}
				}
				if rep.Started == "" || rep.Request.Total != 30 || rep.Target != live || rep.Call != call {
					t.Errorf("JSON report started %q, request %+v: want the run's time, target, method and options", rep.Started, rep.Request)
				}
			},
		},
		{
			name:     "balance fails",
			args:     []string{"--call", call, "-n", "30", "-c", "3", "--assert-balance", "10", "--expect-backends", "3", live},
			wantCode: exitAssert,
			wantErr:  "balance assertion failed: backend solo got 100.0% (even share 33.3%, allowed ±10)",
			wantOut:  "solo",
		},
		{name: "no call", args: []string{live}, wantCode: exitUsage, wantErr: "no call"},
		{name: "no target", args: []string{"--call", call}, wantCode: exitUsage, wantErr: "no target"},
		{name: "flags after target", args: []string{live, "--call", call}, wantCode: exitUsage, wantErr: "flags go before the target"},
		{name: "two targets", args: []string{"--call", call, "--target", live, live}, wantCode: exitUsage, wantErr: "give the target once"},
		{name: "bad format", args: []string{"--call", call, "--format", "xml", live}, wantCode: exitUsage, wantErr: `unknown --format "xml"`},
		{name: "malformed data", args: []string{"--call", call, "-d", `{"a":`, live}, wantCode: exitUsage, wantErr: "not valid JSON"},
		{name: "malformed metadata", args: []string{"--call", call, "-m", `["a"]`, live}, wantCode: exitUsage, wantErr: "--metadata"},
		{name: "metadata not strings", args: []string{"--call", call, "-m", `{"a":1}`, live}, wantCode: exitUsage, wantErr: `value of "a" must be a string`},
		{name: "two data sources", args: []string{"--call", call, "-d", "{}", "-B", "x.bin", live}, wantCode: exitUsage, wantErr: "request message once"},
		{name: "missing data file", args: []string{"--call", call, "-D", filepath.Join(dir, "none.json"), live}, wantCode: exitUsage, wantErr: "request data"},
		{name: "zero concurrency", args: []string{"--call", call, "-c", "0", live}, wantCode: exitUsage, wantErr: "--concurrency must be positive"},
		{name: "connections over concurrency", args: []string{"--call", call, "-c", "2", "--connections", "3", live}, wantCode: exitUsage, wantErr: "must not exceed concurrency"},
		{name: "negative balance", args: []string{"--call", call, "--assert-balance", "-1", live}, wantCode: exitUsage, wantErr: "--assert-balance"},
		{name: "unknown flag", args: []string{"--bogus", live}, wantCode: exitUsage, wantErr: "bogus"},
		{name: "unreachable", args: []string{"--call", call, dead}, wantCode: exitFailure, wantErr: "cannot reach " + dead},
		{name: "unknown method", args: []string{"--call", "grpc.testing.TestService/Nope", live}, wantCode: exitFailure, wantErr: "Nope"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			callsBefore = ts.Calls()
			var stdout, stderr bytes.Buffer
			app := newApp()
			app.Writer, app.ErrWriter = &stdout, &stderr
			err := app.RunContext(ctx, append([]string{"streamlb", "loadtest"}, tc.args...))
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
			if stderr.Len() > 0 {
				t.Errorf("stderr = %q, want nothing (no progress off a terminal, no log spam)", stderr.String())
			}
			if tc.check != nil {
				tc.check(t, stdout.String())
			}
		})
	}
}

// TestLoadtestHelp checks that --help shows the real defaults and the exit
// codes.
func TestLoadtestHelp(t *testing.T) {
	var stdout bytes.Buffer
	app := newApp()
	app.Writer, app.ErrWriter = &stdout, &stdout
	if err := app.Run([]string{"streamlb", "loadtest", "--help"}); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"(default: 200, or unbounded with --duration)",
		"(default: unlimited)",
		"--assert-max-error-rate PCT",
		"--timeline",
		"3  an --assert-balance or --assert-max-error-rate check failed",
	} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("help lacks %q:\n%s", want, stdout.String())
		}
	}
	if strings.Contains(stdout.String(), "(default: 0)") {
		t.Errorf("help shows a zero default that is not the real one:\n%s", stdout.String())
	}
}
