package cluster_test

import (
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
)

// TestAccessLogWriteFailuresReported: an access log whose writes fail (a
// full disk: /dev/full answers every write with ENOSPC) is reported in the
// process log, with the lines lost, once per 10 s at most, with either
// engine. The lines were dropped without a word (slog's Logger drops the
// handler's error): an operator found an empty log and no reason.
func TestAccessLogWriteFailuresReported(t *testing.T) {
	if _, err := os.Stat("/dev/full"); err != nil {
		t.Skipf("no /dev/full: %v", err)
	}
	backend := startBackend(t, "b", "127.0.0.1:0")
	for _, engine := range cluster.Engines() {
		t.Run(engine, func(t *testing.T) {
			al, err := cluster.OpenAccessLog("/dev/full", "text", os.Stderr)
			if err != nil {
				t.Skipf("open /dev/full: %v", err)
			}
			t.Cleanup(func() { al.Close() })
			var logs syncBuffer
			r := runServer(t, cluster.ServerConfig{Engine: engine, AccessLog: al,
				Logger:  slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn})),
				Cluster: cluster.Config{Targets: []string{backend.Addr()}}})
			client := dial(t, r.addr)
			ctx := testkit.Context(t, 20*time.Second)
			for i := range 5 {
				if _, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{}); err != nil {
					t.Fatalf("call %d: %v", i, err)
				}
			}
			testkit.WaitFor(ctx, t, "the failed writes reported", func() bool {
				return strings.Contains(logs.String(), "no space left on device")
			})
			// One line for the five calls (the rest within 10 s are counted).
			time.Sleep(100 * time.Millisecond)
			if got := strings.Count(logs.String(), "access log: writing lines failed"); got != 1 {
				t.Errorf("%d reports of the failed writes, want 1:\n%s", got, logs.String())
			}
			if !strings.Contains(logs.String(), "path=/dev/full") {
				t.Errorf("the report does not name the path:\n%s", logs.String())
			}
		})
	}
}
