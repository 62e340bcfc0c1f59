//go:build unix

package main

import (
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/streamlb/streamlb/internal/testkit"
)

// TestAttackR4ConfigBecomesFIFO: the configuration file's path turns into
// a FIFO while the proxy runs (a mistake, or a hostile writer of the
// config directory). The proxy must refuse it as unreadable, keep the
// running configuration, reload once a regular file is back, and exit on
// SIGTERM. Before, the reload loop's os.ReadFile blocked in open(2)
// waiting for a writer, forever: no reload ever again, and SIGTERM
// drained the listeners but the process never exited (seen 12 s and
// more after "drained").
func TestAttackR4ConfigBecomesFIFO(t *testing.T) {
	ts := startBackend(t)
	ctx := testkit.Context(t, 20*time.Second)
	dir := t.TempDir()
	conf := filepath.Join(dir, "streamlb.yaml")
	text := fmt.Sprintf("listen: 127.0.0.1:0\nclusters:\n  - {name: a, targets: [%s]}\nroutes:\n  - {name: %%s, cluster: a}\n", ts.Addr())
	if err := os.WriteFile(conf, []byte(fmt.Sprintf(text, "one")), 0o600); err != nil {
		t.Fatal(err)
	}
	p := startProc(t, "proxy", "--config", conf, "--log-format", "json", "--release-startup-pages=false")
	_, at := p.waitLog(ctx, t, 0, "listening")

	if err := os.Remove(conf); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(conf, 0o600); err != nil {
		t.Fatal(err)
	}
	// Release a reader stuck in open(2) when the test ends, whatever
	// happened, so that nothing of it lingers.
	t.Cleanup(func() {
		if f, err := os.OpenFile(conf, os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
			f.Close()
		}
	})
	_, at = p.waitLog(ctx, t, at, "configuration file unreadable; the running configuration stays")

	// A regular file again, with a change: reloaded.
	next := filepath.Join(dir, "next.yaml")
	if err := os.WriteFile(next, []byte(fmt.Sprintf(text, "two")), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(next, conf); err != nil {
		t.Fatal(err)
	}
	p.waitLog(ctx, t, at, "configuration reloaded")
	stopProc(ctx, t, p)
}
