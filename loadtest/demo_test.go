package loadtest_test

import (
	"bytes"
	"context"
	"log/slog"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/streamlb/streamlb/loadtest"
)

// TestMain fails the package's tests if any goroutine outlives them.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// tableRow is one parsed backend line of the demo's table.
type tableRow struct {
	calls  int
	share  float64
	errors int
}

// parseTable picks the backend rows ("backend-N addr calls share% errors")
// out of the demo's output.
func parseTable(t *testing.T, out string) map[string]tableRow {
	t.Helper()
	rows := make(map[string]tableRow)
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) != 5 || !strings.HasPrefix(f[0], "backend-") {
			continue
		}
		calls, err1 := strconv.Atoi(f[2])
		share, err2 := strconv.ParseFloat(strings.TrimSuffix(f[3], "%"), 64)
		errs, err3 := strconv.Atoi(f[4])
		if err1 != nil || err2 != nil || err3 != nil {
			t.Fatalf("cannot parse table line %q", line)
		}
		rows[f[0]] = tableRow{calls: calls, share: share, errors: errs}
	}
	return rows
}

func TestRunDemo(t *testing.T) {
	const calls = 300
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out bytes.Buffer
	err := loadtest.RunDemo(ctx, loadtest.DemoConfig{
		Calls:       calls,
		Concurrency: 10,
		Logger:      slog.New(slog.DiscardHandler),
	}, &out)
	if err != nil {
		t.Fatalf("RunDemo: %v\noutput:\n%s", err, out.String())
	}

	rows := parseTable(t, out.String())
	if len(rows) != 3 {
		t.Fatalf("table lists %d backends, want 3\noutput:\n%s", len(rows), out.String())
	}
	sum := 0
	for name, r := range rows {
		sum += r.calls
		if r.errors != 0 {
			t.Errorf("%s: errors = %d, want 0", name, r.errors)
		}
		if r.share < 100.0/3-10 || r.share > 100.0/3+10 {
			t.Errorf("%s: share = %.1f%%, want 33%% ± 10", name, r.share)
		}
	}
	if sum != calls {
		t.Errorf("calls sum to %d, want %d\noutput:\n%s", sum, calls, out.String())
	}
	if !strings.Contains(out.String(), "total") {
		t.Errorf("table has no total line\noutput:\n%s", out.String())
	}
}

func TestRunDemoCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var out bytes.Buffer
	err := loadtest.RunDemo(ctx, loadtest.DemoConfig{
		Calls:  50,
		Logger: slog.New(slog.DiscardHandler),
	}, &out)
	if err == nil {
		t.Fatalf("RunDemo with a cancelled context returned nil\noutput:\n%s", out.String())
	}
}

func TestDemoConfigValidate(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		cfg     loadtest.DemoConfig
		wantErr bool
	}{
		{name: "zero value", cfg: loadtest.DemoConfig{}},
		{name: "explicit", cfg: loadtest.DemoConfig{Backends: 2, Calls: 10, Concurrency: 100, Duration: time.Second}},
		{name: "negative calls", cfg: loadtest.DemoConfig{Calls: -1}, wantErr: true},
		{name: "negative concurrency", cfg: loadtest.DemoConfig{Concurrency: -1}, wantErr: true},
		{name: "negative backends", cfg: loadtest.DemoConfig{Backends: -1}, wantErr: true},
		{name: "negative duration", cfg: loadtest.DemoConfig{Duration: -time.Second}, wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			err := tc.cfg.Validate()
			if got := err != nil; got != tc.wantErr {
				t.Errorf("Validate() = %v, want error: %v", err, tc.wantErr)
			}
		})
	}
}

func TestReportWriteTable(t *testing.T) {
	t.Parallel()
	r := loadtest.Report{Rows: []loadtest.Row{
		{Backend: "a", Addr: "127.0.0.1:1", Calls: 3, Errors: 1},
		{Backend: "b", Addr: "127.0.0.1:2", Calls: 1},
	}}
	var out bytes.Buffer
	if err := r.WriteTable(&out); err != nil {
		t.Fatal(err)
	}
	want := "" +
		"BACKEND  ADDRESS      CALLS  SHARE   ERRORS\n" +
		"a        127.0.0.1:1  3      75.0%   1\n" +
		"b        127.0.0.1:2  1      25.0%   0\n" +
		"total                 4      100.0%  1\n"
	if got := out.String(); got != want {
		t.Errorf("WriteTable wrote\n%s\nwant\n%s", got, want)
	}
}
