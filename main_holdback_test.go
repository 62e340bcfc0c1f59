package main

import (
	"context"
	"io"
	"strings"
	"testing"
	"time"
)

// TestHoldbackFitsWindow: without --response-holdback, the hold-back's
// default shrinks to what --backend-stream-window-max lets a held message
// arrive with (4/3 of it), so a small window max starts the proxy; a
// --response-holdback given with a window too small for it is still a
// usage error. The CLI passed its flag's default explicitly, so a window
// max under 174768 refused to start with a hold-back nobody asked for.
func TestHoldbackFitsWindow(t *testing.T) {
	run := func(args ...string) (error, time.Duration) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		app := newApp()
		app.Writer, app.ErrWriter = io.Discard, io.Discard
		start := time.Now()
		err := app.RunContext(ctx, append([]string{"streamlb", "proxy", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1"}, args...))
		return err, time.Since(start)
	}
	for _, w := range []string{"131072", "65536"} {
		if err, took := run("--backend-stream-window-max", w); err != nil {
			t.Errorf("--backend-stream-window-max %s: %v after %v, want it served until stopped", w, err, took)
		}
	}
	err, _ := run("--backend-stream-window-max", "131072", "--response-holdback", "131072")
	if err == nil || !strings.Contains(err.Error(), "needs a BackendMaxStreamWindow of at least") {
		t.Errorf("a --response-holdback too large for the window: %v, want the usage error", err)
	}
}
