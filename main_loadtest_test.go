package main

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

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

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close()

	dir := t.TempDir()
	page := filepath.Join(dir, "report.html")
	const call = "grpc.testing.TestService/EmptyCall"

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
			wantOut: "Backends (from the \"x-backend\" response header)",
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
				if !bytes.Contains(html, []byte("<svg")) || !bytes.Contains(html, []byte("solo")) {
					t.Errorf("HTML report lacks a chart or the backend name")
				}
			},
		},
		{
			name:     "balance fails",
			args:     []string{"--call", call, "-n", "30", "-c", "3", "--assert-balance", "10", "--expect-backends", "3", live},
			wantCode: exitBalance,
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
