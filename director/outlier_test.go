package director

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/streamlb/streamlb/resolver"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// fakeClock is a hand-moved clock, safe for concurrent use.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Unix(1_700_000_000, 0)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// Set moves the clock to t, which must not be earlier than now.
func (c *fakeClock) Set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if t.Before(c.now) {
		panic("fakeClock: time moved back")
	}
	c.now = t
}

var (
	errUnavailable = status.Error(codes.Unavailable, "connection refused")
	errNotFound    = status.Error(codes.NotFound, "no such key")
	errInternal    = status.Error(codes.Internal, "oops")
	errCanceled    = status.Error(codes.Canceled, "client went away")
	errDeadline    = status.Error(codes.DeadlineExceeded, "deadline passed")
)

// newOutlierDirector returns a round-robin director on clk, with its
// rotation starting at the first backend and the given set applied. A nil
// cfg.Logger discards logs.
func newOutlierDirector(t *testing.T, cfg Config, clk *fakeClock, addrs ...string) *Director {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = discardLogger()
	}
	cfg.Rand = fakeRand(func(int) int { return 0 })
	cfg.Now = clk.Now
	d, err := New(cfg)
	if err != nil {
		t.Fatalf("New() error = %v", err)
	}
	mustUpdate(t, d, state(addrs...))
	return d
}

// pickAddr picks until it gets addr, ending the other streams with success,
// and returns addr's done.
func pickAddr(t *testing.T, d *Director, addr string) func(error) {
	t.Helper()
	for range 100 {
		got, done := mustPick(t, d)
		if got == addr {
			return done
		}
		done(nil)
	}
	t.Fatalf("Pick() did not return %s in 100 picks", addr)
	return nil
}

// failN ends n streams of addr with err.
func failN(t *testing.T, d *Director, addr string, err error, n int) {
	t.Helper()
	for range n {
		pickAddr(t, d, addr)(err)
	}
}

// pickCounts makes n picks, ending each with success, and counts them by
// address.
func pickCounts(t *testing.T, d *Director, n int) map[string]int {
	t.Helper()
	got := make(map[string]int)
	for range n {
		addr, done := mustPick(t, d)
		got[addr]++
		done(nil)
	}
	return got
}

// statsOf returns addr's stats, failing the test if it is not in the set.
// Like mustPick, it first does what Run would have done by then.
func statsOf(t *testing.T, d *Director, addr string) BackendStats {
	t.Helper()
	d.reconcile()
	for _, b := range d.Backends() {
		if b.Addr == addr {
			return b
		}
	}
	t.Fatalf("Backends() has no %s", addr)
	return BackendStats{}
}

func TestNewOutlierConfig(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		cfg     Config
		want    outlierConfig
		wantErr string
	}{
		{
			name: "defaults",
			want: outlierConfig{ejectAfter: 3, base: 10 * time.Second, max: 5 * time.Minute, maxPercent: 50, maxMultiplier: 30},
		},
		{
			name: "disabled",
			cfg:  Config{EjectAfter: -1},
			want: outlierConfig{ejectAfter: 0, base: 10 * time.Second, max: 5 * time.Minute, maxPercent: 50, maxMultiplier: 30},
		},
		{
			name: "explicit",
			cfg:  Config{EjectAfter: 5, BaseEjection: time.Second, MaxEjection: 2500 * time.Millisecond, MaxEjectionPercent: 100},
			want: outlierConfig{ejectAfter: 5, base: time.Second, max: 2500 * time.Millisecond, maxPercent: 100, maxMultiplier: 3},
		},
		{
			name: "long base raises default max",
			cfg:  Config{BaseEjection: 10 * time.Minute},
			want: outlierConfig{ejectAfter: 3, base: 10 * time.Minute, max: 10 * time.Minute, maxPercent: 50, maxMultiplier: 1},
		},
		{name: "negative base", cfg: Config{BaseEjection: -time.Second}, wantErr: "director: base ejection time -1s is negative"},
		{name: "negative max", cfg: Config{MaxEjection: -time.Second}, wantErr: "director: max ejection time -1s is negative"},
		{name: "max below base", cfg: Config{BaseEjection: time.Minute, MaxEjection: time.Second}, wantErr: "director: max ejection time 1s is shorter than the base ejection time 1m0s"},
		{name: "percent too big", cfg: Config{MaxEjectionPercent: 101}, wantErr: "director: max ejection percent 101 out of range 0..100"},
		{name: "percent negative", cfg: Config{MaxEjectionPercent: -1}, wantErr: "out of range"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := newOutlierConfig(tc.cfg)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("newOutlierConfig(%+v) error = %v, want it to contain %q", tc.cfg, err, tc.wantErr)
				}
				// New reports the same error.
				tc.cfg.Logger = discardLogger()
				if _, err := New(tc.cfg); err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Errorf("New(%+v) error = %v, want it to contain %q", tc.cfg, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("newOutlierConfig(%+v) error = %v", tc.cfg, err)
			}
			if diff := cmp.Diff(tc.want, got, cmp.AllowUnexported(outlierConfig{})); diff != "" {
				t.Errorf("newOutlierConfig(%+v) mismatch (-want +got):\n%s", tc.cfg, diff)
			}
		})
	}
}

func TestEjectionOutcomes(t *testing.T) {
	t.Parallel()
	u := errUnavailable
	tests := []struct {
		name        string
		ejectAfter  int
		errs        []error // outcomes of a:1's streams, in order
		wantEjected bool
	}{
		{name: "three unavailable eject", errs: []error{u, u, u}, wantEjected: true},
		{name: "two unavailable do not", errs: []error{u, u}},
		{name: "success resets the run", errs: []error{u, u, nil, u, u}},
		{name: "full run after a success", errs: []error{u, nil, u, u, u}, wantEjected: true},
		{name: "application status ends the run", errs: []error{u, u, errNotFound, u, u}},
		{name: "not found never ejects", errs: slices.Repeat([]error{errNotFound}, 6)},
		{name: "internal never ejects", errs: slices.Repeat([]error{errInternal}, 6)},
		{name: "plain error never ejects", errs: slices.Repeat([]error{errors.New("boom")}, 6)},
		{name: "canceled never ejects", errs: slices.Repeat([]error{errCanceled}, 6)},
		{name: "deadline exceeded never ejects", errs: slices.Repeat([]error{errDeadline}, 6)},
		{name: "context errors never eject", errs: slices.Repeat([]error{context.Canceled, context.DeadlineExceeded}, 3)},
		{name: "client errors do not end the run", errs: []error{u, errCanceled, u, context.DeadlineExceeded, errDeadline, u}, wantEjected: true},
		{name: "wrapped unavailable ejects", errs: slices.Repeat([]error{fmt.Errorf("relay: %w", u)}, 3), wantEjected: true},
		{name: "eject after one", ejectAfter: 1, errs: []error{u}, wantEjected: true},
		{name: "eject after five, four failures", ejectAfter: 5, errs: slices.Repeat([]error{u}, 4)},
		{name: "eject after five, five failures", ejectAfter: 5, errs: slices.Repeat([]error{u}, 5), wantEjected: true},
		{name: "negative disables ejection", ejectAfter: -1, errs: slices.Repeat([]error{u}, 10)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			d := newOutlierDirector(t, Config{EjectAfter: tc.ejectAfter}, newFakeClock(), "a:1", "b:1", "c:1")
			for _, err := range tc.errs {
				pickAddr(t, d, "a:1")(err)
			}
			got := statsOf(t, d, "a:1")
			var wantEjections int64
			if tc.wantEjected {
				wantEjections = 1
			}
			if got.Ejected != tc.wantEjected || got.Ejections != wantEjections {
				t.Errorf("a:1 Ejected, Ejections = %v, %d; want %v, %d", got.Ejected, got.Ejections, tc.wantEjected, wantEjections)
			}
			if n := pickCounts(t, d, 30)["a:1"]; (n == 0) != tc.wantEjected {
				t.Errorf("a:1 got %d of 30 picks, want ejected=%v", n, tc.wantEjected)
			}
		})
	}
}

// TestEjectionLifecycle ejects one backend again and again on a fake clock
// and checks when it returns and what is logged. Steps run in order.
func TestEjectionLifecycle(t *testing.T) {
	t.Parallel()
	logger, records := captureLogs(t, slog.LevelInfo)
	clk := newFakeClock()
	d := newOutlierDirector(t, Config{Logger: logger}, clk, "a:1", "b:1", "c:1")
	records()
	ejected := func(dur time.Duration) logRecord {
		return logRecord{"level": "INFO", "msg": "backend ejected", "component": "director",
			"backend": "a:1", "failures": 3.0, "duration": float64(dur)}
	}
	restored := logRecord{"level": "INFO", "msg": "backend restored", "component": "director", "backend": "a:1"}
	// check makes 30 picks and checks whether a:1 got any, its stats, and
	// the logs since the last check.
	check := func(step string, wantPicked bool, wantEjections int64, wantLogs ...logRecord) {
		t.Helper()
		if n := pickCounts(t, d, 30)["a:1"]; (n > 0) != wantPicked {
			t.Errorf("%s: a:1 got %d of 30 picks, want picked=%v", step, n, wantPicked)
		}
		st := statsOf(t, d, "a:1")
		if st.Ejected == wantPicked || st.Ejections != wantEjections {
			t.Errorf("%s: a:1 Ejected, Ejections = %v, %d; want %v, %d", step, st.Ejected, st.Ejections, !wantPicked, wantEjections)
		}
		if diff := cmp.Diff(wantLogs, records()); diff != "" {
			t.Errorf("%s: logs mismatch (-want +got):\n%s", step, diff)
		}
	}

	failN(t, d, "a:1", errUnavailable, 3)
	check("first ejection", false, 1, ejected(10*time.Second))
	clk.Advance(10*time.Second - time.Nanosecond)
	check("just before the end", false, 1)
	clk.Advance(time.Nanosecond)
	check("after BaseEjection", true, 1, restored)

	failN(t, d, "a:1", errUnavailable, 3)
	check("second ejection at once", false, 2, ejected(20*time.Second))
	clk.Advance(19 * time.Second)
	check("second ejection after 19s", false, 2)
	clk.Advance(time.Second)
	check("second ejection after 20s", true, 2, restored)

	failN(t, d, "a:1", errUnavailable, 3)
	check("third ejection", false, 3, ejected(30*time.Second))
	clk.Advance(30 * time.Second)
	check("third restored", true, 3, restored)

	// Two BaseEjections back in the set take the multiplier from 3 to 1.
	clk.Advance(20 * time.Second)
	failN(t, d, "a:1", errUnavailable, 3)
	check("after decay", false, 4, ejected(20*time.Second))
	clk.Advance(20 * time.Second)
	check("fourth restored", true, 4, restored)

	// Long enough back, and ejections start over.
	clk.Advance(time.Hour)
	failN(t, d, "a:1", errUnavailable, 3)
	check("after full decay", false, 5, ejected(10*time.Second))
}

func TestEjectionCappedAtMax(t *testing.T) {
	t.Parallel()
	logger, records := captureLogs(t, slog.LevelInfo)
	clk := newFakeClock()
	d := newOutlierDirector(t, Config{Logger: logger, BaseEjection: time.Second, MaxEjection: 2500 * time.Millisecond}, clk, "a:1", "b:1")
	records()
	var got []float64
	for range 5 {
		failN(t, d, "a:1", errUnavailable, 3)
		clk.Advance(time.Minute) // ends the ejection, not yet restored
		pickCounts(t, d, 1)      // restores; the decay starts only now
		for _, r := range records() {
			if r["msg"] == "backend ejected" {
				got = append(got, r["duration"].(float64))
			}
		}
	}
	// Restored just now each time, so the multiplier does not decay.
	s := float64(time.Second)
	want := []float64{1 * s, 2 * s, 2.5 * s, 2.5 * s, 2.5 * s}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("ejection durations mismatch (-want +got):\n%s", diff)
	}
}

func TestEjectionRunResetOnRestore(t *testing.T) {
	t.Parallel()
	clk := newFakeClock()
	d := newOutlierDirector(t, Config{}, clk, "a:1", "b:1", "c:1")
	var pending []func(error)
	for range 8 {
		pending = append(pending, pickAddr(t, d, "a:1"))
	}
	for _, done := range pending[:3] {
		done(errUnavailable)
	}
	if !statsOf(t, d, "a:1").Ejected {
		t.Fatal("a:1 not ejected after 3 Unavailable")
	}
	// Streams picked before the ejection end during it. A full run does
	// not eject again; a partial one is forgotten on restore.
	for _, done := range pending[3:8] {
		done(errUnavailable)
	}
	if got := statsOf(t, d, "a:1"); got.Ejections != 1 || got.InFlight != 0 {
		t.Fatalf("a:1 Ejections, InFlight = %d, %d after late failures, want 1, 0", got.Ejections, got.InFlight)
	}
	clk.Advance(10 * time.Second)
	failN(t, d, "a:1", errUnavailable, 2)
	if got := statsOf(t, d, "a:1"); got.Ejected {
		t.Fatal("a:1 ejected by 2 failures after restore; the run was not reset")
	}
	failN(t, d, "a:1", errUnavailable, 1)
	if got := statsOf(t, d, "a:1"); !got.Ejected || got.Ejections != 2 {
		t.Fatalf("a:1 Ejected, Ejections = %v, %d after a new run, want true, 2", got.Ejected, got.Ejections)
	}
}

func TestEjectionMaxPercent(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name        string
		backends    int
		percent     int
		wantEjected int
	}{
		{name: "two backends default percent", backends: 2, wantEjected: 1},
		{name: "one backend", backends: 1, wantEjected: 0},
		{name: "one backend at 100 percent", backends: 1, percent: 100, wantEjected: 0},
		{name: "three backends", backends: 3, wantEjected: 1},
		{name: "four backends", backends: 4, wantEjected: 2},
		{name: "never all", backends: 3, percent: 100, wantEjected: 2},
		{name: "ten percent of ten", backends: 10, percent: 10, wantEjected: 1},
		{name: "one percent of ten", backends: 10, percent: 1, wantEjected: 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			logger, records := captureLogs(t, slog.LevelWarn)
			var addrs []string
			for i := range tc.backends {
				addrs = append(addrs, fmt.Sprintf("b%d:1", i))
			}
			d := newOutlierDirector(t, Config{Logger: logger, MaxEjectionPercent: tc.percent}, newFakeClock(), addrs...)
			// Every backend fails, in address order.
			for _, a := range addrs {
				failN(t, d, a, errUnavailable, 3)
			}
			var gotEjected []string
			for _, b := range d.Backends() {
				if b.Ejected {
					gotEjected = append(gotEjected, b.Addr)
				}
			}
			if diff := cmp.Diff(addrs[:tc.wantEjected], gotEjected, cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("ejected backends mismatch (-want +got):\n%s", diff)
			}
			if picks := pickCounts(t, d, 2*tc.backends); len(picks) == 0 {
				t.Error("no backend pickable")
			}
			var warned []string
			for _, r := range records() {
				if r["msg"] == "backend not ejected: max ejection percent reached" {
					warned = append(warned, r["backend"].(string))
				}
			}
			if diff := cmp.Diff(addrs[tc.wantEjected:], warned, cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("warned backends mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

// TestEjectionCapWarnsOncePerChange checks that a backend the cap keeps in
// is warned about once until the ejected set changes, not on every run.
func TestEjectionCapWarnsOncePerChange(t *testing.T) {
	t.Parallel()
	logger, records := captureLogs(t, slog.LevelWarn)
	clk := newFakeClock()
	d := newOutlierDirector(t, Config{Logger: logger}, clk, "a:1", "b:1")
	warn := func(backend string) logRecord {
		return logRecord{"level": "WARN", "msg": "backend not ejected: max ejection percent reached", "component": "director",
			"backend": backend, "failures": 3.0, "ejected": 1.0, "backends": 2.0, "max_ejection_percent": 50.0}
	}
	steps := []struct {
		name string
		do   func()
		want []logRecord
	}{
		{name: "a ejected", do: func() { failN(t, d, "a:1", errUnavailable, 3) }},
		{name: "b kept in", do: func() { failN(t, d, "b:1", errUnavailable, 3) }, want: []logRecord{warn("b:1")}},
		{name: "b kept in again", do: func() { failN(t, d, "b:1", errUnavailable, 6) }},
		{name: "a restored, b ejected", do: func() {
			clk.Advance(10 * time.Second)
			failN(t, d, "b:1", errUnavailable, 3)
		}},
		{name: "a kept in", do: func() { failN(t, d, "a:1", errUnavailable, 3) }, want: []logRecord{warn("a:1")}},
	}
	for _, step := range steps {
		step.do()
		if diff := cmp.Diff(step.want, records()); diff != "" {
			t.Errorf("%s: logs mismatch (-want +got):\n%s", step.name, diff)
		}
	}
	want := []BackendStats{
		{Addr: "a:1", Weight: 1, Successes: 3, Failures: 6, Ejections: 1, Healthy: true},
		{Addr: "b:1", Weight: 1, Successes: 2, Failures: 12, Ejected: true, Ejections: 1, Healthy: true,
			EjectedUntil: clk.Now().Add(10 * time.Second), Reason: "ejected for 10s after 3 calls in a row ended UNAVAILABLE"},
	}
	if diff := cmp.Diff(want, d.Backends()); diff != "" {
		t.Errorf("Backends() mismatch (-want +got):\n%s", diff)
	}
}

func TestEjectionSurvivesUpdateState(t *testing.T) {
	t.Parallel()
	logger, records := captureLogs(t, slog.LevelInfo)
	clk := newFakeClock()
	d := newOutlierDirector(t, Config{Logger: logger}, clk, "a:1", "b:1", "c:1")
	ejectedFor := func(want time.Duration) {
		t.Helper()
		var got []float64
		for _, r := range records() {
			if r["msg"] == "backend ejected" {
				got = append(got, r["duration"].(float64))
			}
		}
		if diff := cmp.Diff([]float64{float64(want)}, got); diff != "" {
			t.Errorf("ejection durations mismatch (-want +got):\n%s", diff)
		}
	}

	// Streams to the first a:1, still open when it leaves the set.
	var stale []func(error)
	for range 3 {
		stale = append(stale, pickAddr(t, d, "a:1"))
	}
	failN(t, d, "a:1", errUnavailable, 3)
	clk.Advance(10 * time.Second)
	pickCounts(t, d, 1)
	failN(t, d, "a:1", errUnavailable, 3)
	records()

	mustUpdate(t, d, resolver.State{Addresses: []resolver.Address{{Addr: "a:1", Weight: 4}, {Addr: "b:1"}, {Addr: "c:1"}, {Addr: "d:1"}}})
	if got := statsOf(t, d, "a:1"); !got.Ejected || got.Ejections != 2 || got.Weight != 4 {
		t.Errorf("a:1 after an update = %+v, want still ejected with 2 ejections and weight 4", got)
	}
	if n := pickCounts(t, d, 30)["a:1"]; n != 0 {
		t.Errorf("ejected a:1 got %d of 30 picks after an update", n)
	}
	clk.Advance(20 * time.Second)
	pickCounts(t, d, 1)
	failN(t, d, "a:1", errUnavailable, 3)
	ejectedFor(30 * time.Second) // the multiplier survived too

	mustUpdate(t, d, state("b:1", "c:1", "d:1"))
	mustUpdate(t, d, state("a:1", "b:1", "c:1", "d:1"))
	// Fresh, but for the old a:1's streams, which still run on it.
	if got, want := statsOf(t, d, "a:1"), (BackendStats{Addr: "a:1", Weight: 1, InFlight: 3, Healthy: true}); got != want {
		t.Errorf("a:1 after leaving and rejoining = %+v, want fresh %+v", got, want)
	}
	// Streams of the old a:1 do not count against the new one, but
	// for ending in flight.
	for _, done := range stale {
		done(errUnavailable)
	}
	if got, want := statsOf(t, d, "a:1"), (BackendStats{Addr: "a:1", Weight: 1, Healthy: true}); got != want {
		t.Errorf("a:1 after stale failures = %+v, want %+v", got, want)
	}
	records()
	failN(t, d, "a:1", errUnavailable, 3)
	ejectedFor(10 * time.Second) // a fresh multiplier
	if got := statsOf(t, d, "a:1"); !got.Ejected || got.Ejections != 1 {
		t.Errorf("a:1 = %+v, want ejected once", got)
	}
}

func TestEjectionSetShrinksToEjected(t *testing.T) {
	t.Parallel()
	logger, records := captureLogs(t, slog.LevelInfo)
	d := newOutlierDirector(t, Config{Logger: logger}, newFakeClock(), "a:1", "b:1", "c:1", "d:1")
	failN(t, d, "a:1", errUnavailable, 3)
	failN(t, d, "b:1", errUnavailable, 3)
	records()

	// Only ejected backends left: the one whose ejection ends first (a:1,
	// ejected first, as the clock did not move, the first by address) is
	// restored at once.
	mustUpdate(t, d, state("a:1", "b:1"))
	r := func(msg, backend string) logRecord {
		return logRecord{"level": "INFO", "msg": msg, "component": "director", "backend": backend}
	}
	want := []logRecord{
		{"level": "INFO", "msg": "backend removed", "component": "director", "backend": "c:1", "policy": RoundRobin},
		{"level": "INFO", "msg": "backend removed", "component": "director", "backend": "d:1", "policy": RoundRobin},
		r("backend restored early: no other backend is pickable", "a:1"),
	}
	if diff := cmp.Diff(want, records()); diff != "" {
		t.Errorf("logs mismatch (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(map[string]int{"a:1": 4}, pickCounts(t, d, 4)); diff != "" {
		t.Errorf("picks mismatch (-want +got):\n%s", diff)
	}

	mustUpdate(t, d, resolver.State{})
	if _, _, err := d.Pick(t.Context(), "/s/m"); !errors.Is(err, ErrNoBackend) {
		t.Errorf("Pick() on an empty set error = %v, want ErrNoBackend", err)
	}
}

// TestPickDoesNotWaitToRestore holds the mutex while an ejection is due and
// checks that Pick, done and Backends go on with the current snapshot
// without blocking (a failure run handed to Run included), and that the
// ejection ends once Run's work can run.
func TestPickDoesNotWaitToRestore(t *testing.T) {
	t.Parallel()
	clk := newFakeClock()
	d := newOutlierDirector(t, Config{}, clk, "a:1", "b:1", "c:1")
	failN(t, d, "a:1", errUnavailable, 3)
	if !statsOf(t, d, "a:1").Ejected {
		t.Fatal("a:1 not ejected after 3 failures")
	}
	clk.Advance(time.Minute)

	d.mu.Lock()
	got := make(map[string]int)
	for range 6 {
		addr, done, err := d.Pick(t.Context(), "/s/m")
		if err != nil {
			d.mu.Unlock()
			t.Fatalf("Pick() while mu is held: %v", err)
		}
		got[addr]++
		done(errUnavailable) // completes b:1's and c:1's runs: handed over, not waited for
	}
	stillEjected := slices.ContainsFunc(d.Backends(), func(b BackendStats) bool { return b.Addr == "a:1" && b.Ejected })
	d.mu.Unlock()
	if diff := cmp.Diff(map[string]int{"b:1": 3, "c:1": 3}, got); diff != "" {
		t.Fatalf("picks while mu is held (-want +got):\n%s", diff)
	}
	if !stillEjected {
		t.Error("a:1 restored although mu was held")
	}

	d.reconcile() // Run's timer
	if n := pickCounts(t, d, 6)["a:1"]; n == 0 {
		t.Error("a:1 not picked after mu was released")
	}
}

// TestEjectionConcurrent runs picks with failing and succeeding outcomes,
// clock moves, set updates and Backends at once; run it with -race. Bounded
// loops, no sleeps.
func TestEjectionConcurrent(t *testing.T) {
	t.Parallel()
	sets := []resolver.State{
		state("a:1", "b:1", "c:1", "d:1"),
		state("a:1", "b:1", "c:1", "d:1", "e:1"),
	}
	for _, policy := range Policies() {
		t.Run(policy, func(t *testing.T) {
			t.Parallel()
			clk := newFakeClock()
			d, err := New(Config{Policy: policy, HashHeader: testHashHeader, Logger: discardLogger(), Now: clk.Now, BaseEjection: time.Second})
			if err != nil {
				t.Fatal(err)
			}
			mustUpdate(t, d, sets[0])
			var wg sync.WaitGroup
			wg.Go(func() {
				for i := range 100 {
					clk.Advance(100 * time.Millisecond)
					if err := d.UpdateState(sets[i%len(sets)]); err != nil {
						t.Errorf("UpdateState() error = %v", err)
						return
					}
					d.Backends()
				}
				if err := d.UpdateState(sets[0]); err != nil {
					t.Errorf("UpdateState() error = %v", err)
				}
			})
			outcomes := []error{nil, errUnavailable, errUnavailable, errCanceled, errNotFound}
			for w := range 8 {
				wg.Go(func() {
					for i := range 400 {
						addr, done, err := d.Pick(context.Background(), "/s/m")
						if err != nil {
							t.Errorf("Pick() error = %v; some backend must stay pickable", err)
							return
						}
						if addr == "a:1" || addr == "b:1" {
							done(outcomes[(i+w)%len(outcomes)])
						} else {
							done(nil)
						}
					}
				})
			}
			wg.Wait()
			ejected := 0
			for _, b := range d.Backends() {
				if b.InFlight != 0 {
					t.Errorf("backend %s has %d in flight after all done calls, want 0", b.Addr, b.InFlight)
				}
				if b.Ejected {
					ejected++
				}
			}
			if ejected > 2 {
				t.Errorf("%d of 4 backends ejected, want at most 2 (50%%)", ejected)
			}
		})
	}
}

func TestPickAllocationsWhileEjected(t *testing.T) {
	// Not parallel: AllocsPerRun measures the whole process.
	for _, policy := range Policies() {
		t.Run(policy, func(t *testing.T) {
			clk := newFakeClock()
			// A tiny failure penalty keeps peak_ewma picking a:1 as it
			// fails, so that it can be ejected.
			d, err := New(Config{Policy: policy, HashHeader: testHashHeader, Logger: discardLogger(), Now: clk.Now, FailurePenalty: time.Nanosecond})
			if err != nil {
				t.Fatal(err)
			}
			mustUpdate(t, d, state("a:1", "b:1", "c:1", "d:1"))
			failN(t, d, "a:1", errUnavailable, 3)
			if !statsOf(t, d, "a:1").Ejected {
				t.Fatal("a:1 not ejected")
			}
			ctx := context.Background()
			allocs := testing.AllocsPerRun(1000, func() {
				_, done, _ := d.Pick(ctx, "/s/m")
				done(nil)
			})
			if allocs > 2 {
				t.Errorf("Pick+done with an ejected backend allocates %v times per call, want at most 2", allocs)
			}
		})
	}
}
