package cluster_test

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
)

// TestFileHangup: with a configuration file and an access log file, each
// receive from ServerConfig.Hangup (SIGHUP) reloads the file and reopens
// the access log: after logrotate renamed it away, the next lines go to a
// new file at its path.
func TestFileHangup(t *testing.T) {
	_, _, path := twoClusterFile(t)
	f, err := cluster.LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	cfg := f.ServerConfig()
	logPath := filepath.Join(t.TempDir(), "access.log")
	al, err := cluster.OpenAccessLog(logPath, "json", io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { al.Close() }) // after the server's teardown
	cfg.AccessLog = al
	var logs syncBuffer
	cfg.Logger = slog.New(slog.NewJSONHandler(&logs, nil))
	hup := make(chan os.Signal, 1)
	cfg.Hangup = hup
	r := runServer(t, cfg)
	cc := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)
	lines := func(path string, n int) int {
		var got int
		testkit.WaitFor(ctx, t, "access log lines in "+path, func() bool {
			b, _ := os.ReadFile(path)
			got = strings.Count(string(b), "\n")
			return got >= n
		})
		return got
	}
	if _, err := backendOf(ctx, cc); err != nil {
		t.Fatal(err)
	}
	lines(logPath, 1)
	if err := os.Rename(logPath, logPath+".1"); err != nil {
		t.Fatal(err)
	}
	hup <- syscall.SIGHUP
	testkit.WaitFor(ctx, t, "access log reopened and configuration reloaded", func() bool {
		s := logs.String()
		return strings.Contains(s, `"msg":"access log reopened"`) && strings.Contains(s, `"msg":"configuration reloaded"`)
	})
	for range 2 {
		if _, err := backendOf(ctx, cc); err != nil {
			t.Fatal(err)
		}
	}
	if n := lines(logPath, 2); n != 2 {
		t.Errorf("new access log file: %d lines, want the 2 calls since the hangup", n)
	}
	if n := lines(logPath+".1", 1); n != 1 {
		t.Errorf("rotated access log file: %d lines, want the 1 call before the hangup", n)
	}
}
