package loadtest

import (
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
	"unicode/utf8"
)

// JSONReport is the schema WriteJSON writes. Durations are milliseconds;
// shares are percentages (0..100). Fields are only ever added to it.
//
// latency is on the client clock; wire_latency and the backends' p50_ms and
// p99_ms are on the wire clock (see Result); clocks says so in the report
// itself.
type JSONReport struct {
	Name          string         `json:"name,omitempty"`
	Target        string         `json:"target"`
	Call          string         `json:"call"`
	BackendHeader string         `json:"backend_header"`
	Connections   int            `json:"connections"`
	Concurrency   int            `json:"concurrency"`
	Started       string         `json:"started"` // RFC 3339, with the offset
	Request       JSONRequest    `json:"request"`
	EndReason     string         `json:"end_reason"`
	Count         uint64         `json:"count"`
	Errors        uint64         `json:"errors"`
	TotalMS       float64        `json:"total_ms"`
	RPS           float64        `json:"rps"`
	Clocks        JSONClocks     `json:"clocks"`
	Latency       JSONLatency    `json:"latency"`
	WireLatency   JSONLatency    `json:"wire_latency"`
	StatusCodes   map[string]int `json:"status_codes"`
	ErrorMessages map[string]int `json:"error_messages,omitempty"`
	Backends      []JSONBackend  `json:"backends"`
	Timeline      JSONTimeline   `json:"timeline"`
	Notes         []string       `json:"notes,omitempty"`
}

// JSONRequest is how the calls were made.
type JSONRequest struct {
	Data             string            `json:"data"`
	Metadata         map[string]string `json:"metadata,omitempty"`
	Proto            string            `json:"proto,omitempty"`
	Protoset         string            `json:"protoset,omitempty"`
	Total            int               `json:"total"` // 0: duration alone bounded the run
	DurationMS       float64           `json:"duration_ms"`
	DurationStop     string            `json:"duration_stop"`
	RPS              int               `json:"rps"` // 0: unlimited
	TimeoutMS        float64           `json:"timeout_ms"`
	ConnectTimeoutMS float64           `json:"connect_timeout_ms"`
	TLS              bool              `json:"tls"`
}

// JSONClocks names the clock of each latency in a JSONReport.
type JSONClocks struct {
	Latency     string `json:"latency"`
	WireLatency string `json:"wire_latency"`
	Backends    string `json:"backends"`
}

// The clocks, described for the reports.
const (
	clientClock = "client: from the call starting in the caller to its result returning (ghz)"
	wireClock   = "wire: from the request HEADERS frame leaving the client to the end of the response arriving"
)

// JSONTimeline is the timeline of a JSONReport: calls[i][j] and errors[i][j]
// are the calls and errors of backends[j] in the interval starting at
// start_ms[i].
type JSONTimeline struct {
	IntervalMS float64     `json:"interval_ms"`
	Backends   []string    `json:"backends"`
	StartMS    []float64   `json:"start_ms"`
	Calls      [][]int64   `json:"calls"`
	Errors     [][]int64   `json:"errors"`
	Events     []JSONEvent `json:"events"`
}

// JSONEvent is a backend appearing or vanishing.
type JSONEvent struct {
	Backend string  `json:"backend"`
	Kind    string  `json:"kind"` // "appeared" or "vanished"
	AtMS    float64 `json:"at_ms"`
}

// JSONLatency is the latency summary of a JSONReport, over the calls that
// succeeded.
type JSONLatency struct {
	AvgMS     float64 `json:"avg_ms"`
	P50MS     float64 `json:"p50_ms"`
	P90MS     float64 `json:"p90_ms"`
	P99MS     float64 `json:"p99_ms"`
	FastestMS float64 `json:"fastest_ms"`
	SlowestMS float64 `json:"slowest_ms"`
}

// JSONBackend is one backend of a JSONReport.
type JSONBackend struct {
	Name   string  `json:"name"`
	Calls  int64   `json:"calls"`
	Share  float64 `json:"share"`
	Errors int64   `json:"errors"`
	P50MS  float64 `json:"p50_ms"`
	P99MS  float64 `json:"p99_ms"`
}

// JSON returns r in the JSONReport schema.
func (r *Result) JSON() JSONReport {
	q := r.Request
	j := JSONReport{
		Name:          r.Name,
		Target:        r.Target,
		Call:          r.Call,
		BackendHeader: r.BackendHeader,
		Connections:   r.Connections,
		Concurrency:   r.Concurrency,
		Started:       r.Started.Format(time.RFC3339Nano),
		Request: JSONRequest{
			Data: q.Data, Metadata: q.Metadata, Proto: q.Proto, Protoset: q.Protoset,
			Total: q.Total, DurationMS: ms(q.Duration), DurationStop: q.DurationStop, RPS: q.RPS,
			TimeoutMS: ms(q.Timeout), ConnectTimeoutMS: ms(q.ConnectTimeout), TLS: q.TLS,
		},
		EndReason:     r.EndReason,
		Count:         r.Count,
		Errors:        r.Errors,
		TotalMS:       ms(r.Total),
		RPS:           round(r.RPS, 1),
		Clocks:        JSONClocks{Latency: clientClock, WireLatency: wireClock, Backends: wireClock},
		Latency:       jsonLatency(r.Latency),
		WireLatency:   jsonLatency(r.WireLatency),
		Timeline:      jsonTimeline(r.Timeline),
		StatusCodes:   r.StatusCodes,
		ErrorMessages: r.ErrorMessages,
		Backends:      make([]JSONBackend, 0, len(r.Backends)),
		Notes:         r.Notes,
	}
	if j.StatusCodes == nil {
		j.StatusCodes = map[string]int{}
	}
	for _, b := range r.Backends {
		j.Backends = append(j.Backends, JSONBackend{
			Name:   b.Name,
			Calls:  b.Calls,
			Share:  round(b.Share, 2),
			Errors: b.Errors,
			P50MS:  ms(b.P50),
			P99MS:  ms(b.P99),
		})
	}
	return j
}

func jsonLatency(l Latency) JSONLatency {
	return JSONLatency{
		AvgMS:     ms(l.Average),
		P50MS:     ms(l.P50),
		P90MS:     ms(l.P90),
		P99MS:     ms(l.P99),
		FastestMS: ms(l.Fastest),
		SlowestMS: ms(l.Slowest),
	}
}

func jsonTimeline(tl Timeline) JSONTimeline {
	j := JSONTimeline{
		IntervalMS: ms(tl.Interval),
		Backends:   tl.Backends,
		StartMS:    make([]float64, 0, len(tl.Points)),
		Calls:      make([][]int64, 0, len(tl.Points)),
		Errors:     make([][]int64, 0, len(tl.Points)),
		Events:     make([]JSONEvent, 0, len(tl.Events)),
	}
	if j.Backends == nil {
		j.Backends = []string{}
	}
	for _, p := range tl.Points {
		j.StartMS = append(j.StartMS, ms(p.Start))
		j.Calls = append(j.Calls, p.Calls)
		j.Errors = append(j.Errors, p.Errors)
	}
	for _, e := range tl.Events {
		j.Events = append(j.Events, JSONEvent{Backend: e.Backend, Kind: e.Kind, AtMS: ms(e.At)})
	}
	return j
}

// WriteJSON writes r to w as one indented JSON object in the JSONReport
// schema, followed by a newline.
func (r *Result) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(r.JSON()); err != nil {
		return fmt.Errorf("loadtest: write json: %w", err)
	}
	return nil
}

// ms converts d to milliseconds, rounded to the microsecond.
func ms(d time.Duration) float64 {
	return round(float64(d)/float64(time.Millisecond), 3)
}

func round(v float64, places int) float64 {
	p := math.Pow10(places)
	return math.Round(v*p) / p
}

// WriteTable writes r to w for a terminal: the summary, the per-backend
// table and the status codes.
func (r *Result) WriteTable(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	title := "Summary"
	if r.Name != "" {
		title += " (" + r.Name + ")"
	}
	fmt.Fprintf(tw, "%s:\n", title)
	fmt.Fprintf(tw, "  Started:\t%s\n", r.Started.Format(time.RFC3339))
	fmt.Fprintf(tw, "  Target:\t%s\n", r.Target)
	fmt.Fprintf(tw, "  Call:\t%s\n", r.Call)
	fmt.Fprintf(tw, "  Connections:\t%d\n", r.Connections)
	fmt.Fprintf(tw, "  Concurrency:\t%d\n", r.Concurrency)
	fmt.Fprintf(tw, "  Count:\t%d (%d failed)\n", r.Count, r.Errors)
	fmt.Fprintf(tw, "  Total:\t%s\n", fmtDur(r.Total))
	fmt.Fprintf(tw, "  Requests/sec:\t%.1f\n", r.RPS)
	if r.EndReason != EndTotal {
		fmt.Fprintf(tw, "  Ended:\t%s\n", endText(r.EndReason))
	}
	fmt.Fprintf(tw, "  Latency (client):\t%s\n", latencyLine(r.Latency))
	fmt.Fprintf(tw, "  Latency (wire):\t%s\n", latencyLine(r.WireLatency))
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("loadtest: write table: %w", err)
	}

	fmt.Fprintf(w, "\nBackends (from the %q response header; latencies on the wire clock):\n", r.BackendHeader)
	rows := [][]string{{"BACKEND", "CALLS", "SHARE", "ERRORS", "WIRE P50", "WIRE P99"}}
	var calls, errs int64
	for _, b := range r.Backends {
		rows = append(rows, []string{b.Name, fmt.Sprint(b.Calls), fmt.Sprintf("%.1f%%", b.Share), fmt.Sprint(b.Errors), fmtDur(b.P50), fmtDur(b.P99)})
		calls += b.Calls
		errs += b.Errors
	}
	rows = append(rows, []string{"total", fmt.Sprint(calls), pctOf(calls, calls), fmt.Sprint(errs), "", ""})
	if err := writeColumns(w, rows); err != nil {
		return err
	}

	fmt.Fprintln(w, "\nStatus codes:")
	rows = [][]string{{"CODE", "CALLS", "SHARE"}}
	for _, code := range statusOrder(r.StatusCodes) {
		n := int64(r.StatusCodes[code])
		rows = append(rows, []string{code, fmt.Sprint(n), pctOf(n, int64(r.Count))})
	}
	if err := writeColumns(w, rows); err != nil {
		return err
	}
	if len(r.ErrorMessages) > 0 {
		fmt.Fprintln(w, "\nErrors:")
		msgs := statusOrder(r.ErrorMessages)
		for i, msg := range msgs {
			if i == maxErrorMessages {
				fmt.Fprintf(w, "  ... and %d other messages\n", len(msgs)-i)
				break
			}
			fmt.Fprintf(w, "  %6d  %s\n", r.ErrorMessages[msg], msg)
		}
	}
	for _, n := range r.Notes {
		fmt.Fprintf(w, "\nnote: %s\n", n)
	}
	fmt.Fprintf(w, "\nClocks: client = %s;\n        wire = %s.\n",
		strings.TrimPrefix(clientClock, "client: "), strings.TrimPrefix(wireClock, "wire: "))
	return nil
}

// latencyLine formats a latency summary on one line.
func latencyLine(l Latency) string {
	return fmt.Sprintf("avg %s  p50 %s  p90 %s  p99 %s  (fastest %s, slowest %s)",
		fmtDur(l.Average), fmtDur(l.P50), fmtDur(l.P90), fmtDur(l.P99), fmtDur(l.Fastest), fmtDur(l.Slowest))
}

// endText says why a run ended.
func endText(reason string) string {
	switch reason {
	case EndTotal:
		return "all calls made"
	case EndDuration:
		return "duration reached"
	case EndCancel:
		return "interrupted"
	}
	return reason
}

// writeColumns writes rows as an indented table: the first column aligned
// left, the others, numbers, aligned right.
func writeColumns(w io.Writer, rows [][]string) error {
	var widths []int
	for _, row := range rows {
		for i, cell := range row {
			if i == len(widths) {
				widths = append(widths, 0)
			}
			widths[i] = max(widths[i], utf8.RuneCountInString(cell))
		}
	}
	var b strings.Builder
	for _, row := range rows {
		var line strings.Builder
		line.WriteString("  ")
		for i, cell := range row {
			pad := strings.Repeat(" ", widths[i]-utf8.RuneCountInString(cell))
			if i == 0 {
				line.WriteString(cell + pad)
			} else {
				line.WriteString("  " + pad + cell)
			}
		}
		// Empty cells at the end of a row leave blanks.
		b.WriteString(strings.TrimRight(line.String(), " ") + "\n")
	}
	if _, err := io.WriteString(w, b.String()); err != nil {
		return fmt.Errorf("loadtest: write table: %w", err)
	}
	return nil
}

// maxErrorMessages bounds the error messages WriteTable lists.
const maxErrorMessages = 5

// statusOrder lists the keys of m, most frequent first, then by name.
func statusOrder(m map[string]int) []string {
	return slices.SortedFunc(maps.Keys(m), func(a, b string) int {
		return cmp.Or(cmp.Compare(m[b], m[a]), cmp.Compare(a, b))
	})
}

// pctOf formats n as a percentage of total.
func pctOf(n, total int64) string {
	if total == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f%%", 100*float64(n)/float64(total))
}

// fmtDur formats a latency with three significant digits, in the unit that
// suits it.
func fmtDur(d time.Duration) string {
	switch {
	case d <= 0:
		return "-"
	case d < time.Millisecond:
		return fmt.Sprintf("%.0fµs", float64(d)/float64(time.Microsecond))
	case d < 10*time.Millisecond:
		return fmt.Sprintf("%.2fms", float64(d)/float64(time.Millisecond))
	case d < time.Second:
		return fmt.Sprintf("%.1fms", float64(d)/float64(time.Millisecond))
	default:
		return fmt.Sprintf("%.2fs", d.Seconds())
	}
}
