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
type JSONReport struct {
	Name          string         `json:"name,omitempty"`
	Target        string         `json:"target"`
	Call          string         `json:"call"`
	BackendHeader string         `json:"backend_header"`
	Connections   int            `json:"connections"`
	Concurrency   int            `json:"concurrency"`
	EndReason     string         `json:"end_reason"`
	Count         uint64         `json:"count"`
	Errors        uint64         `json:"errors"`
	TotalMS       float64        `json:"total_ms"`
	RPS           float64        `json:"rps"`
	Latency       JSONLatency    `json:"latency"`
	StatusCodes   map[string]int `json:"status_codes"`
	ErrorMessages map[string]int `json:"error_messages,omitempty"`
	Backends      []JSONBackend  `json:"backends"`
	Notes         []string       `json:"notes,omitempty"`
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
	j := JSONReport{
		Name:          r.Name,
		Target:        r.Target,
		Call:          r.Call,
		BackendHeader: r.BackendHeader,
		Connections:   r.Connections,
		Concurrency:   r.Concurrency,
		EndReason:     r.EndReason,
		Count:         r.Count,
		Errors:        r.Errors,
		TotalMS:       ms(r.Total),
		RPS:           round(r.RPS, 1),
		Latency: JSONLatency{
			AvgMS:     ms(r.Latency.Average),
			P50MS:     ms(r.Latency.P50),
			P90MS:     ms(r.Latency.P90),
			P99MS:     ms(r.Latency.P99),
			FastestMS: ms(r.Latency.Fastest),
			SlowestMS: ms(r.Latency.Slowest),
		},
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
	fmt.Fprintf(tw, "  Target:\t%s\n", r.Target)
	fmt.Fprintf(tw, "  Call:\t%s\n", r.Call)
	fmt.Fprintf(tw, "  Connections:\t%d\n", r.Connections)
	fmt.Fprintf(tw, "  Concurrency:\t%d\n", r.Concurrency)
	fmt.Fprintf(tw, "  Count:\t%d (%d failed)\n", r.Count, r.Errors)
	fmt.Fprintf(tw, "  Total:\t%s\n", fmtDur(r.Total))
	fmt.Fprintf(tw, "  Requests/sec:\t%.1f\n", r.RPS)
	fmt.Fprintf(tw, "  Latency:\tavg %s  p50 %s  p90 %s  p99 %s  (fastest %s, slowest %s)\n",
		fmtDur(r.Latency.Average), fmtDur(r.Latency.P50), fmtDur(r.Latency.P90), fmtDur(r.Latency.P99),
		fmtDur(r.Latency.Fastest), fmtDur(r.Latency.Slowest))
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("loadtest: write table: %w", err)
	}

	fmt.Fprintf(w, "\nBackends (from the %q response header):\n", r.BackendHeader)
	rows := [][]string{{"BACKEND", "CALLS", "SHARE", "ERRORS", "P50", "P99"}}
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
	return nil
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
