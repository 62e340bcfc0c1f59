package main

import (
	"context"
	"strings"
	"testing"
)

// TestAttackR26FlagsPastTheirSettingsRange: flags whose value becomes a
// narrower setting. The header list sizes are HTTP/2 SETTINGS values (32
// bits) taken from a 64-bit flag, and a value past 2^32-1 wrapped
// silently: --max-header-list-size 4294967297 advertised a 1-byte limit
// to clients (every grpc-go call failed INTERNAL "header list size to send
// violates the maximum size (1 bytes)"), --max-response-header-list-size
// 4294967306 one of 10 bytes to backends (every call reset, INTERNAL_ERROR),
// and 4294967296 the default. The stream windows are int32: a flag value
// below its range wrapped too (-4294867296 to a valid 100000). Each is now
// a usage error naming the flag; the largest 32-bit value still passes.
func TestAttackR26FlagsPastTheirSettingsRange(t *testing.T) {
	base := []string{"streamlb", "proxy", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1"}
	for _, tc := range []struct {
		args    []string
		wantErr string // "" for accepted
	}{
		{[]string{"--max-header-list-size", "4294967297"}, "--max-header-list-size must be at most 4294967295"},
		{[]string{"--max-header-list-size", "4294967296"}, "--max-header-list-size must be at most 4294967295"},
		{[]string{"--max-response-header-list-size", "4294967306"}, "--max-response-header-list-size must be at most 4294967295"},
		{[]string{"--backend-stream-window", "-4294867296"}, "BackendStreamWindow"},
		{[]string{"--backend-stream-window-max", "-4294442008"}, "BackendMaxStreamWindow"},
		{[]string{"--max-header-list-size", "4294967295", "--max-response-header-list-size", "4294967295"}, ""},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			app := newApp()
			var out strings.Builder
			app.Writer, app.ErrWriter = &out, &out
			// Cancelled: a command line that passes starts and stops at once.
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			err := app.RunContext(ctx, append(append([]string{}, base...), tc.args...))
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if code := exitCode(err); code != 2 || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("exit code %d, error %v; want 2 and an error containing %q", code, err, tc.wantErr)
			}
		})
	}
}
