//go:build unix

package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
)

// TestAttackR2HoldbackFlagCombos: --response-holdback and
// --backend-stream-window(-max) combinations, each started for a moment:
// those that must serve, and those that must be refused with a usage
// error. --response-holdback near the int64 maximum wraps the check's
// arithmetic (proxy.Config.setDefaults) and is accepted.
func TestAttackR2HoldbackFlagCombos(t *testing.T) {
	run := func(args ...string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 700*time.Millisecond)
		defer cancel()
		app := newApp()
		app.Writer, app.ErrWriter = io.Discard, io.Discard
		return app.RunContext(ctx, append([]string{"streamlb", "proxy", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1", "--release-startup-pages=false"}, args...))
	}
	serve := [][]string{
		{"--backend-stream-window-max", "16384"},
		{"--backend-stream-window-max", "16384", "--response-holdback", "0"},
		{"--backend-stream-window-max", "174770", "--response-holdback", "131072"},
		{"--backend-stream-window", "65536", "--backend-stream-window-max", "65536"},
		{"--response-holdback", "-1", "--backend-stream-window-max", "16384"},
	}
	for _, args := range serve {
		if err := run(args...); err != nil {
			t.Errorf("%v: %v, want it served until stopped", args, err)
		}
	}
	refuse := [][]string{
		{"--backend-stream-window-max", "174769", "--response-holdback", "131072"},
		{"--backend-stream-window-max", "16384", "--response-holdback", "12283"},
		{"--backend-stream-window-max", "1048576", "--response-holdback", "9223372036854775807"},
		{"--backend-stream-window-max", "1048576", "--response-holdback", "4611686018427387904"},
	}
	for _, args := range refuse {
		if err := run(args...); err == nil || !strings.Contains(err.Error(), "needs a BackendMaxStreamWindow") {
			t.Errorf("%v: %v, want the usage error of a hold-back too large for the window", args, err)
		}
	}
}

// TestAttackR2AccessLogBesideConfig: --access-log beside --config.
// An access log path that cannot be opened is a usage error, not a proxy
// that runs without its log; "-" serves; a storm of SIGHUPs (each reopens
// the log and reloads the file) while calls run loses no call's line and
// leaves the proxy serving.
func TestAttackR2AccessLogBesideConfig(t *testing.T) {
	ts := startBackend(t)
	ctx := testkit.Context(t, 60*time.Second)
	dir := t.TempDir()
	conf := filepath.Join(dir, "streamlb.yaml")
	text := fmt.Sprintf("listen: 127.0.0.1:0\nclusters:\n  - {name: a, targets: [%s]}\nroutes:\n  - {cluster: a}\n", ts.Addr())
	if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Run("unopenable", func(t *testing.T) {
		app := newApp()
		app.Writer, app.ErrWriter = io.Discard, io.Discard
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		err := app.RunContext(cctx, []string{"streamlb", "proxy", "--config", conf, "--access-log", filepath.Join(dir, "no", "such", "dir", "a.log"), "--release-startup-pages=false"})
		if err == nil || !strings.Contains(err.Error(), "access-log") {
			t.Errorf("an access log in a missing directory: %v, want a usage error naming --access-log", err)
		}
	})
	t.Run("sighup storm", func(t *testing.T) {
		path := filepath.Join(dir, "access.log")
		p := startProc(t, "proxy", "--config", conf, "--access-log", path, "--log-format", "json", "--release-startup-pages=false")
		rec, _ := p.waitLog(ctx, t, 0, "listening")
		cc, err := grpc.NewClient("passthrough:///"+rec.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer cc.Close()
		client := testgrpc.NewTestServiceClient(cc)
		const calls = 60
		errs := make(chan error, 1)
		go func() {
			for i := 0; i < calls; i++ {
				if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
					errs <- fmt.Errorf("call %d: %w", i, err)
					return
				}
				time.Sleep(3 * time.Millisecond)
			}
			errs <- nil
		}()
		for i := 0; i < 40; i++ {
			p.cmd.Process.Signal(syscall.SIGHUP)
			time.Sleep(5 * time.Millisecond)
		}
		if err := <-errs; err != nil {
			t.Errorf("during the SIGHUP storm: %v", err)
		}
		var got []string
		testkit.WaitFor(ctx, t, "every call's access log line", func() bool {
			b, _ := os.ReadFile(path)
			got = strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
			return len(b) > 0 && len(got) >= calls
		})
		if len(got) != calls {
			t.Errorf("%d access log lines, want %d", len(got), calls)
		}
		stopProc(ctx, t, p)
	})
}
