package loadtest

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"time"
)

// Timeline is how the calls of a run spread over the backends as it went
// on: calls and errors per backend per interval, counted when each call
// ended (on the wire clock, see Backend), and the moments a backend
// appeared or vanished. Its per-backend totals equal the Backends rows.
type Timeline struct {
	// Interval is the width of every point: one second for runs of ten
	// seconds to two minutes, scaled for shorter and longer runs so there
	// are roughly 10 to 120 points.
	Interval time.Duration
	// Backends names the columns of every point's Calls and Errors, in
	// the order of Result.Backends.
	Backends []string
	// Points are the intervals from the start of the run, in order, with
	// no gaps.
	Points []TimelinePoint
	// Events are the backends that appeared after the first interval or
	// vanished before the last, in time order. UnknownBackend has none.
	// A backend appeared if its first call ended an interval or more
	// after the run's first call, and vanished if its last call ended an
	// interval or more before the run's last: a run whose last interval
	// holds only its last call or two, or whose calls started late, shows
	// no event.
	Events []BackendEvent
}

// TimelinePoint is one interval of a Timeline.
type TimelinePoint struct {
	// Start is the interval's start, from the start of the run.
	Start time.Duration
	// Calls and Errors count the calls that ended in the interval, per
	// backend (Timeline.Backends order); Errors are among Calls.
	Calls, Errors []int64
}

// BackendEvent is a backend appearing or vanishing during a run.
type BackendEvent struct {
	Backend string
	// Kind is EventAppeared or EventVanished.
	Kind string
	// At is from the start of the run: the start of the backend's first
	// interval with calls, or the end of its last.
	At time.Duration
}

// Kinds of BackendEvent.
const (
	EventAppeared = "appeared"
	EventVanished = "vanished"
)

// niceIntervals are the interval widths a Timeline picks from.
var niceIntervals = []time.Duration{
	100 * time.Millisecond, 200 * time.Millisecond, 500 * time.Millisecond,
	time.Second, 2 * time.Second, 5 * time.Second, 10 * time.Second, 15 * time.Second, 30 * time.Second,
	time.Minute, 2 * time.Minute, 5 * time.Minute, 10 * time.Minute, 15 * time.Minute, 30 * time.Minute, time.Hour,
}

// timelineInterval picks the interval for a run that lasted span.
func timelineInterval(span time.Duration) time.Duration {
	var want time.Duration
	switch {
	case span < 10*time.Second:
		want = span / 20
	case span <= 2*time.Minute:
		return time.Second
	default:
		want = span / 120
	}
	for _, d := range niceIntervals {
		if d >= want {
			return d
		}
	}
	// Beyond the table, whole hours.
	return want.Truncate(time.Hour) + time.Hour
}

// timelineLocked bins the recorded calls into a Timeline whose columns are
// rows. Caller must hold c.mu.
func (c *collector) timelineLocked(rows []Backend) Timeline {
	var span time.Duration
	begin := time.Duration(math.MaxInt64) // the run's first call's end
	for _, t := range c.backends {
		for _, r := range t.recs {
			span = max(span, r.end)
			begin = min(begin, max(r.end, 0))
		}
	}
	tl := Timeline{Interval: timelineInterval(span)}
	n := int(max(span, 0)/tl.Interval) + 1
	tl.Points = make([]TimelinePoint, n)
	for i := range tl.Points {
		tl.Points[i] = TimelinePoint{
			Start:  time.Duration(i) * tl.Interval,
			Calls:  make([]int64, len(rows)),
			Errors: make([]int64, len(rows)),
		}
	}
	for col, row := range rows {
		tl.Backends = append(tl.Backends, row.Name)
		first, last := n, -1
		firstEnd, lastEnd := time.Duration(math.MaxInt64), time.Duration(0)
		for _, r := range c.backends[row.Name].recs {
			end := max(r.end, 0)
			i := min(int(end/tl.Interval), n-1)
			tl.Points[i].Calls[col]++
			if !r.ok {
				tl.Points[i].Errors[col]++
			}
			first, last = min(first, i), max(last, i)
			firstEnd, lastEnd = min(firstEnd, end), max(lastEnd, end)
		}
		if row.Name == UnknownBackend || last < 0 {
			continue
		}
		if first > 0 && firstEnd-begin >= tl.Interval {
			tl.Events = append(tl.Events, BackendEvent{Backend: row.Name, Kind: EventAppeared, At: time.Duration(first) * tl.Interval})
		}
		if last < n-1 && span-lastEnd >= tl.Interval {
			tl.Events = append(tl.Events, BackendEvent{Backend: row.Name, Kind: EventVanished, At: time.Duration(last+1) * tl.Interval})
		}
	}
	slices.SortStableFunc(tl.Events, func(a, b BackendEvent) int { return int(a.At - b.At) })
	return tl
}

// WriteTimeline writes r's timeline to w as a compact table for a
// terminal: one row per interval, a column per backend with its calls and,
// if any, its errors, and the backends that appeared (+) or vanished (-)
// in that interval.
func (r *Result) WriteTimeline(w io.Writer) error {
	tl := r.Timeline
	fmt.Fprintf(w, "\nTimeline (calls per backend per %s, by when each call ended; errors in brackets):\n", fmtInterval(tl.Interval))
	head := []string{"TIME"}
	head = append(head, tl.Backends...)
	head = append(head, "TOTAL", "EVENTS")
	rows := [][]string{head}
	for i, p := range tl.Points {
		row := []string{fmtInterval(p.Start)}
		var calls, errs int64
		for j := range tl.Backends {
			row = append(row, callsCell(p.Calls[j], p.Errors[j]))
			calls += p.Calls[j]
			errs += p.Errors[j]
		}
		row = append(row, callsCell(calls, errs))
		var ev []string
		for _, e := range tl.Events {
			// An appearance belongs to the interval it starts, a
			// disappearance to the interval after the last call.
			if int(e.At/tl.Interval) == i {
				sign := "+"
				if e.Kind == EventVanished {
					sign = "-"
				}
				ev = append(ev, sign+e.Backend)
			}
		}
		row = append(row, strings.Join(ev, " "))
		rows = append(rows, row)
	}
	return writeColumns(w, rows)
}

// callsCell formats calls and errors as "calls" or "calls [errors]".
func callsCell(calls, errs int64) string {
	if errs == 0 {
		return fmt.Sprint(calls)
	}
	return fmt.Sprintf("%d [%d]", calls, errs)
}

// fmtInterval formats an offset or interval compactly: "1.5s", "200ms",
// "2m30s".
func fmtInterval(d time.Duration) string {
	switch {
	case d == 0:
		return "0s"
	case d < time.Second:
		return fmt.Sprintf("%dms", d.Milliseconds())
	case d < time.Minute:
		return strings.TrimSuffix(strings.TrimRight(fmt.Sprintf("%.1f", d.Seconds()), "0"), ".") + "s"
	default:
		return d.Truncate(time.Second).String()
	}
}
