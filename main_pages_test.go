package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/testserver"
)

// TestReleaseStartupPagesFlag runs the proxy command with and without
// --release-startup-pages, alone and beside --config, and checks that the
// release is logged exactly when asked for and that calls go through after
// it (the proxy runs in this process: its code pages were dropped and
// mapped again).
func TestReleaseStartupPagesFlag(t *testing.T) {
	// Not parallel: the command sets the slog default logger, and
	// urfave/cli/v2 mutates package globals.
	prev := slog.Default()
	t.Cleanup(func() { slog.SetDefault(prev) })

	ts, err := testserver.New(testserver.Config{Name: "b1", Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if err := ts.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ts.Stop)
	conf := filepath.Join(t.TempDir(), "proxy.yaml")
	text := fmt.Sprintf("listen: 127.0.0.1:0\nclusters:\n  - {name: a, targets: [%s]}\nroutes:\n  - {cluster: a}\n", ts.Addr())
	if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	flags := []string{"proxy", "--listen", "127.0.0.1:0", "--backend", ts.Addr()}
	file := []string{"proxy", "--config", conf}
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
