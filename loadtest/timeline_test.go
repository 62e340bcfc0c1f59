package loadtest

import (
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestTimelineInterval(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		span time.Duration
		want time.Duration
	}{
		{name: "empty", span: 0, want: 100 * time.Millisecond},
		{name: "short", span: 1600 * time.Millisecond, want: 100 * time.Millisecond},
		{name: "five seconds", span: 5 * time.Second, want: 500 * time.Millisecond},
		{name: "ten seconds", span: 10 * time.Second, want: time.Second},
		{name: "two minutes", span: 2 * time.Minute, want: time.Second},
		{name: "ten minutes", span: 10 * time.Minute, want: 5 * time.Second},
		{name: "a day", span: 24 * time.Hour, want: 15 * time.Minute},
		{name: "a year", span: 365 * 24 * time.Hour, want: 74 * time.Hour},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := timelineInterval(tc.span); got != tc.want {
				t.Errorf("timelineInterval(%v) = %v, want %v", tc.span, got, tc.want)
			}
		})
	}
}

// TestTimelineEdges: a run whose last interval holds only its last call,
// or whose calls all started late, shows no backend appearing or
// vanishing; one backend that stopped an interval before the end did
// vanish. The first case made TestRunTimeline fail about once in 15 runs.
func TestTimelineEdges(t *testing.T) {
	t.Parallel()
	start := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	for _, tc := range []struct {
		name string
		// calls from a, b and c in turn every ms over [from, to) ms,
		// then one more from a at last ms
		from, to, last int
		stopB          int // b makes no call from this ms on (0: never stops)
		want           []BackendEvent
	}{
		{name: "last interval holds one call", from: 0, to: 600, last: 600},
		{name: "calls start late", from: 150, to: 600, last: 600},
		{name: "b stops early", from: 0, to: 600, last: 600, stopB: 450,
			want: []BackendEvent{{Backend: "b", Kind: EventVanished, At: 500 * time.Millisecond}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCollector("/s/M", "x-backend", func() time.Time { return start })
			c.start = start
			at := func(ms int) time.Time { return start.Add(time.Duration(ms) * time.Millisecond) }
			for ms := tc.from; ms < tc.to; ms++ {
				name := []string{"a", "b", "c"}[ms%3]
				if name == "b" && tc.stopB != 0 && ms >= tc.stopB {
					continue
				}
				c.record(name, true, at(ms), time.Millisecond)
			}
			c.record("a", true, at(tc.last).Add(500*time.Microsecond), time.Millisecond)
			tl := c.finish().timeline
			if tl.Interval != 100*time.Millisecond {
				t.Fatalf("interval %v, want 100ms", tl.Interval)
			}
			if diff := cmp.Diff(tc.want, tl.Events); diff != "" {
				t.Errorf("events (-want +got):\n%s", diff)
			}
		})
	}
}

// TestTimelineBins records calls on a fixed clock: a backend that vanishes,
// one that appears, errors, and calls with no backend name.
func TestTimelineBins(t *testing.T) {
	t.Parallel()
	start := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	c := newCollector("/s/M", "x-backend", func() time.Time { return start })
	c.start = start
	at := func(ms int) time.Time { return start.Add(time.Duration(ms) * time.Millisecond) }
	// A span just under 2s: 100ms intervals, 20 points.
	for ms := 0; ms < 1000; ms += 50 {
		c.record("a", true, at(ms), time.Millisecond)
	}
	c.record("a", false, at(420), time.Millisecond)
	for ms := 500; ms < 2000; ms += 50 {
		c.record("b", true, at(ms), time.Millisecond)
	}
	c.record("", false, at(1999), time.Millisecond)

	tal := c.finish()
	tl := tal.timeline
	if tl.Interval != 100*time.Millisecond || len(tl.Points) != 20 {
		t.Fatalf("interval %v, %d points; want 100ms, 20", tl.Interval, len(tl.Points))
	}
	if diff := cmp.Diff([]string{"a", "b", UnknownBackend}, tl.Backends); diff != "" {
		t.Errorf("backends (-want +got):\n%s", diff)
	}
	want := []BackendEvent{
		{Backend: "b", Kind: EventAppeared, At: 500 * time.Millisecond},
		{Backend: "a", Kind: EventVanished, At: time.Second},
	}
	if diff := cmp.Diff(want, tl.Events); diff != "" {
		t.Errorf("events (-want +got):\n%s", diff)
	}
	if got := tl.Points[4]; got.Calls[0] != 3 || got.Errors[0] != 1 {
		t.Errorf("point 400ms: a has %d calls, %d errors; want 3, 1", got.Calls[0], got.Errors[0])
	}
	// The timeline's totals are the rows'.
	for j, row := range tal.rows {
		var calls, errs int64
		for _, p := range tl.Points {
			calls += p.Calls[j]
			errs += p.Errors[j]
		}
		if calls != row.Calls || errs != row.Errors {
			t.Errorf("%s: timeline %d calls, %d errors; row %d, %d", row.Name, calls, errs, row.Calls, row.Errors)
		}
	}
}
