package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
)

// TestReleaseStartupPagesFlag runs the proxy command with and without
// --release-startup-pages, alone and beside --config, and checks that the
// release is logged exactly when asked for and that calls go through after
// it (the proxy runs in this process: its code pages were dropped and
// mapped again).
func TestReleaseStartupPagesFlag(t *testing.T) {
	// Not parallel: the command sets the slog default logger, and
	// urfave/cli/v2 mutates package globals.
	flags, file := processFlagCommands(t)
	for _, tc := range []struct {
		name        string
		args        []string
		wantRelease bool
	}{
		{name: "default", args: flags, wantRelease: true},
		{name: "off", args: append(flags[:len(flags):len(flags)], "--release-startup-pages=false")},
		{name: "config file", args: file, wantRelease: true},
		{name: "config file, off", args: append(file[:len(file):len(file)], "--release-startup-pages=false")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			args := append(tc.args[:len(tc.args):len(tc.args)], "--log-format", "json", "--log-level", "debug")
			app := startApp(ctx, t, args, "listening")
			addr := app.wait(ctx, t)["listening"].Addr
			cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				t.Fatal(err)
			}
			_, err = testgrpc.NewTestServiceClient(cc).UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: 10})
			cc.Close()
			if err != nil {
				t.Fatalf("UnaryCall through the proxy: %v", err)
			}
			if err := app.shutdown(t); err != nil {
				t.Fatalf("proxy command returned %v", err)
			}
			_, released := app.seen["released start-up pages"]
			if released != tc.wantRelease {
				t.Errorf("released start-up pages logged: %v, want %v", released, tc.wantRelease)
			}
		})
	}
}

// TestGCMinHeapFlag runs the proxy command with --gc-min-heap (in this
// process, whose live heap is well under the 64 MiB asked for) and checks
// that the collector's percentage is raised while the proxy runs and set
// back when it returns; that --gc-min-heap=0 and a GOGC in the
// environment leave it alone; and that the flag goes beside --config
// (TestCLIErrors has a negative value).
func TestGCMinHeapFlag(t *testing.T) {
	// Not parallel: the command sets the slog default logger and the GC
	// percentage, and urfave/cli/v2 mutates package globals.
	flags, file := processFlagCommands(t)
	const big = "--gc-min-heap=67108864" // 64 MiB
	for _, tc := range []struct {
		name   string
		args   []string
		gogc   string // set in the environment when not empty
		raised bool
	}{
		{name: "flags", args: append(flags[:len(flags):len(flags)], big), raised: true},
		{name: "config file", args: append(file[:len(file):len(file)], big), raised: true},
		{name: "off", args: append(flags[:len(flags):len(flags)], "--gc-min-heap=0")},
		{name: "GOGC set", args: append(flags[:len(flags):len(flags)], big), gogc: "100"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.gogc != "" {
				t.Setenv("GOGC", tc.gogc)
			}
			before := gcPercent()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			app := startApp(ctx, t, append(tc.args, "--log-format", "json"), "listening")
			app.wait(ctx, t)
			// A cycle, so the keeper has seen this heap. It runs in a
			// cleanup after the cycle, on the runtime's cleanup goroutine,
			// which may come after runtime.GC returned (the test read 100
			// once, in a run of the package beside other work).
			runtime.GC()
			running := gcPercent()
			for end := time.Now().Add(5 * time.Second); tc.raised && running <= before && time.Now().Before(end); {
				time.Sleep(10 * time.Millisecond)
				runtime.GC()
				running = gcPercent()
			}
			if err := app.shutdown(t); err != nil {
				t.Fatalf("proxy command returned %v", err)
			}
			if after := gcPercent(); after != before {
				t.Errorf("GC percentage %d after the proxy returned, want %d as before", after, before)
			}
			if tc.raised && running <= before {
				t.Errorf("GC percentage %d while the proxy ran, want over %d", running, before)
			}
			if !tc.raised && running != before {
				t.Errorf("GC percentage %d while the proxy ran, want %d untouched", running, before)
			}
		})
	}
}

// gcPercent is the collector's current GC percentage.
func gcPercent() int64 {
	s := []metrics.Sample{{Name: "/gc/gogc:percent"}}
	metrics.Read(s)
	return int64(s[0].Value.Uint64())
}

// processFlagCommands starts a backend and writes a configuration file
// routing to it, and returns the proxy command lines of both kinds, for
// the tests of the flags that go beside --config. It restores the slog
// default logger, which the command sets, at cleanup.
func processFlagCommands(t *testing.T) (flags, file []string) {
	t.Helper()
	prev := slog.Default()
	t.Cleanup(func() { slog.SetDefault(prev) })

	ts := startBackend(t)
	conf := filepath.Join(t.TempDir(), "proxy.yaml")
	text := fmt.Sprintf("listen: 127.0.0.1:0\nclusters:\n  - {name: a, targets: [%s]}\nroutes:\n  - {cluster: a}\n", ts.Addr())
	if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	flags = []string{"proxy", "--listen", "127.0.0.1:0", "--backend", ts.Addr()}
	file = []string{"proxy", "--config", conf}
	return flags, file
}
