package loadtest

import (
	"fmt"
	"html/template"
	"io"
	"maps"
	"slices"
	"strings"
	"unicode/utf8"
)

// WriteHTML writes r to w as one self-contained HTML page: inline CSS and
// inline SVG charts (calls per backend, latency histogram), no script and
// nothing fetched from elsewhere, so it can be attached to a CI run or opened
// from disk.
func (r *Result) WriteHTML(w io.Writer) error {
	if err := htmlReport.Execute(w, newHTMLView(r)); err != nil {
		return fmt.Errorf("loadtest: write html: %w", err)
	}
	return nil
}

// Geometry of the charts, in SVG user units.
const (
	chartWidth   = 760
	barHeight    = 26
	barGap       = 10
	barLabelMin  = 60 // bounds of the left margin for backend names
	barLabelMax  = 320
	charWidth    = 7.2 // rough width of a character of the chart font
	barValueW    = 150 // right margin for the counts
	histHeight   = 220
	histTop      = 16
	histBottom   = 44 // room for the axis labels
	histLeft     = 48
	histRight    = 12
	histMaxTicks = 6
)

// palette colours the backends, in order; it repeats after its end.
var palette = []string{"#3b82f6", "#10b981", "#f59e0b", "#8b5cf6", "#ef4444", "#06b6d4", "#84cc16", "#ec4899"}

type htmlView struct {
	R        *Result
	Title    string
	Summary  []htmlStat
	Run      []htmlStat // when, what and how: the run's settings
	Bars     htmlBars
	Hist     htmlHist
	Timeline htmlTimeline
	Codes    []htmlCode
	Errors   []htmlCode // error messages, most frequent first
	Ended    string     // why the run ended, unless all calls were made
	Clocks   [2]string  // client and wire clock, described
}

type htmlStat struct {
	Label, Value string
	Bad          bool // shown in red
}

type htmlCode struct {
	Code  string
	Count int
	Share string
}

type htmlBars struct {
	Width, Height int
	Rows          []htmlBar
	EvenX         float64 // x of the even-share line; 0 for none
	EvenLabel     string
}

type htmlBar struct {
	X, Y, W, H            float64
	LabelX, ValueX, TextY float64
	Name, Value, P50, P99 string
	Color                 string
	Calls, Errors         int64
	Share                 string
}

type htmlHist struct {
	Width, Height int
	Bars          []htmlHistBar
	Ticks         []htmlTick
	BaseY         float64
	Left, Right   float64
	Top           float64
	Peak          int // calls in the tallest bar
	Empty         bool
}

type htmlHistBar struct {
	X, Y, W, H float64
	Title      string
}

type htmlTick struct {
	X      float64
	Label  string
	Anchor string // text-anchor of the label
}

func newHTMLView(r *Result) htmlView {
	v := htmlView{R: r, Title: "streamlb loadtest"}
	if r.Name != "" {
		v.Title += ": " + r.Name
	}
	v.Summary = []htmlStat{
		{Label: "Calls", Value: fmt.Sprintf("%d", r.Count)},
		{Label: "Failed", Value: fmt.Sprintf("%d", r.Errors), Bad: r.Errors > 0},
		{Label: "Requests/s", Value: fmt.Sprintf("%.1f", r.RPS)},
		{Label: "Total", Value: fmtDur(r.Total)},
		{Label: "p50 client", Value: fmtDur(r.Latency.P50)},
		{Label: "p99 client", Value: fmtDur(r.Latency.P99)},
		{Label: "p50 wire", Value: fmtDur(r.WireLatency.P50)},
		{Label: "p99 wire", Value: fmtDur(r.WireLatency.P99)},
	}
	v.Run = newHTMLRun(r)
	if r.EndReason != EndTotal {
		v.Ended = endText(r.EndReason)
	}
	v.Clocks = [2]string{clientClock, wireClock}
	v.Bars = newHTMLBars(r.Backends)
	v.Hist = newHTMLHist(r.Histogram)
	v.Timeline = newHTMLTimeline(r.Timeline)
	for _, code := range statusOrder(r.StatusCodes) {
		n := r.StatusCodes[code]
		v.Codes = append(v.Codes, htmlCode{Code: code, Count: n, Share: pctOf(int64(n), int64(r.Count))})
	}
	for i, msg := range statusOrder(r.ErrorMessages) {
		if i == maxHTMLErrors {
			break
		}
		n := r.ErrorMessages[msg]
		v.Errors = append(v.Errors, htmlCode{Code: msg, Count: n, Share: pctOf(int64(n), int64(r.Count))})
	}
	return v
}

// newHTMLRun lists the run's settings.
func newHTMLRun(r *Result) []htmlStat {
	q := r.Request
	bound := fmt.Sprintf("%d calls", q.Total)
	switch {
	case q.Total == 0:
		bound = fmt.Sprintf("for %s (then %s)", q.Duration, q.DurationStop)
	case q.Duration > 0:
		bound += fmt.Sprintf(" or %s (then %s), whichever first", q.Duration, q.DurationStop)
	}
	rps := "unlimited"
	if q.RPS > 0 {
		rps = fmt.Sprintf("%d calls/s", q.RPS)
	}
	schema := "server reflection"
	if q.Proto != "" {
		schema = q.Proto
	} else if q.Protoset != "" {
		schema = q.Protoset
	}
	transport := "h2c (cleartext)"
	if q.TLS {
		transport = "TLS"
	}
	rows := []htmlStat{
		{Label: "Started", Value: r.Started.Format("2006-01-02 15:04:05 MST")},
		{Label: "Target", Value: r.Target},
		{Label: "Method", Value: r.Call},
		{Label: "Request", Value: q.Data},
	}
	if len(q.Metadata) > 0 {
		var md []string
		for _, k := range slices.Sorted(maps.Keys(q.Metadata)) {
			md = append(md, k+": "+q.Metadata[k])
		}
		rows = append(rows, htmlStat{Label: "Metadata", Value: strings.Join(md, ", ")})
	}
	return append(rows,
		htmlStat{Label: "Bound", Value: bound},
		htmlStat{Label: "Load", Value: fmt.Sprintf("%d connection(s), concurrency %d, rate %s", r.Connections, r.Concurrency, rps)},
		htmlStat{Label: "Timeouts", Value: fmt.Sprintf("call %s, connect %s", q.Timeout, q.ConnectTimeout)},
		htmlStat{Label: "Transport", Value: transport},
		htmlStat{Label: "Schema", Value: schema},
	)
}

// maxHTMLErrors bounds the error messages the page lists.
const maxHTMLErrors = 10

func newHTMLBars(rows []Backend) htmlBars {
	b := htmlBars{Width: chartWidth}
	var maxShare float64
	named := 0
	for _, row := range rows {
		maxShare = max(maxShare, row.Share)
		if row.Name != UnknownBackend {
			named++
		}
	}
	even := 0.0
	if named > 0 {
		even = 100 / float64(named)
	}
	// Scale so the longest bar, or the even share, fills the plot.
	scale := max(maxShare, even)
	longest := 0
	for _, row := range rows {
		longest = max(longest, utf8.RuneCountInString(row.Name))
	}
	barLabelW := min(max(float64(longest)*charWidth+16, barLabelMin), barLabelMax)
	plot := float64(chartWidth) - barLabelW - barValueW
	for i, row := range rows {
		y := float64(barGap + i*(barHeight+barGap))
		w := 0.0
		if scale > 0 {
			w = plot * row.Share / scale
		}
		color := backendColor(i, row.Name)
		b.Rows = append(b.Rows, htmlBar{
			X: barLabelW, Y: y, W: w, H: barHeight,
			LabelX: barLabelW - 8, ValueX: barLabelW + w + 8, TextY: y + barHeight/2 + 4,
			Name:  row.Name,
			Value: fmt.Sprintf("%d (%.1f%%)", row.Calls, row.Share),
			Share: fmt.Sprintf("%.1f%%", row.Share),
			P50:   fmtDur(row.P50), P99: fmtDur(row.P99),
			Color: color, Calls: row.Calls, Errors: row.Errors,
		})
	}
	b.Height = barGap + len(rows)*(barHeight+barGap) + 14
	if even > 0 && scale > 0 {
		b.EvenX = barLabelW + plot*even/scale
		b.EvenLabel = fmt.Sprintf("even share %.1f%%", even)
	}
	return b
}

func newHTMLHist(buckets []Bucket) htmlHist {
	h := htmlHist{Width: chartWidth, Height: histHeight, Left: histLeft, Right: chartWidth - histRight}
	h.BaseY = histHeight - histBottom
	if len(buckets) == 0 {
		h.Empty = true
		return h
	}
	peak := 0
	for _, b := range buckets {
		peak = max(peak, b.Count)
	}
	plotW := h.Right - h.Left
	plotH := h.BaseY - histTop
	slot := plotW / float64(len(buckets))
	for i, b := range buckets {
		hgt := 0.0
		if peak > 0 {
			hgt = plotH * float64(b.Count) / float64(peak)
		}
		h.Bars = append(h.Bars, htmlHistBar{
			X: h.Left + float64(i)*slot + 1, W: max(slot-2, 1),
			Y: h.BaseY - hgt, H: hgt,
			Title: fmt.Sprintf("%s – %s: %d calls", fmtDur(b.Low), fmtDur(b.High), b.Count),
		})
	}
	// Label a few bucket edges, always the first and the last.
	step := max(1, (len(buckets)+histMaxTicks-1)/histMaxTicks)
	for i := 0; i < len(buckets); i += step {
		anchor := "middle"
		if i == 0 {
			anchor = "start"
		}
		h.Ticks = append(h.Ticks, htmlTick{X: h.Left + float64(i)*slot, Label: fmtDur(buckets[i].Low), Anchor: anchor})
	}
	last := buckets[len(buckets)-1]
	h.Ticks = append(h.Ticks, htmlTick{X: h.Right, Label: fmtDur(last.High), Anchor: "end"})
	h.Peak = peak
	h.Top = histTop
	return h
}

var htmlReport = func() *template.Template {
	t := template.Must(template.New("report").Parse(htmlPage))
	template.Must(t.New("timeline").Parse(timelineTemplate))
	return t
}()

const htmlPage = `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{.Title}}</title>
<style>
  body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #111827; background: #f9fafb; margin: 0; }
  main { max-width: 820px; margin: 0 auto; padding: 24px 28px 40px; }
  h1 { font-size: 22px; margin: 0 0 4px; }
  h2 { font-size: 16px; margin: 28px 0 8px; }
  .sub { color: #4b5563; margin: 0 0 16px; font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 13px; }
  .stats { display: grid; grid-template-columns: repeat(auto-fill, minmax(100px, 1fr)); gap: 8px; }
  .stat { background: #fff; border: 1px solid #e5e7eb; border-radius: 6px; padding: 8px 10px; }
  .stat .v { font-size: 17px; font-weight: 600; }
  .stat .l { color: #6b7280; font-size: 12px; }
  .stat.bad .v { color: #b91c1c; }
  .card { background: #fff; border: 1px solid #e5e7eb; border-radius: 6px; padding: 12px; }
  svg { display: block; max-width: 100%; height: auto; }
  svg text { font: 12px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; fill: #374151; }
  table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid #e5e7eb; }
  th, td { padding: 5px 10px; border-bottom: 1px solid #f3f4f6; text-align: right; }
  th:first-child, td:first-child { text-align: left; }
  th { background: #f3f4f6; font-weight: 600; font-size: 13px; }
  td.msg { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; word-break: break-word; }
  td.name { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }
  .swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; }
  .note { color: #92400e; background: #fffbeb; border: 1px solid #fde68a; border-radius: 6px; padding: 6px 10px; margin-top: 12px; }
  .muted { color: #6b7280; font-size: 12px; }
  .legend { margin: 8px 0 0; font-size: 12px; }
  .legend .item { margin-right: 14px; white-space: nowrap; font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }
  table.run th { text-align: left; width: 110px; font-weight: 600; }
  table.run td { text-align: left; }
</style>
</head>
<body>
<main>
<h1>{{.Title}}</h1>
<p class="sub">{{.R.Call}} → {{.R.Target}} · {{.R.Connections}} connection{{if ne .R.Connections 1}}s{{end}}, concurrency {{.R.Concurrency}} · {{.R.Started.Format "2006-01-02 15:04:05 MST"}}{{if .Ended}} · ended: {{.Ended}}{{end}}</p>
<div class="stats">
{{- range .Summary}}
  <div class="stat{{if .Bad}} bad{{end}}"><div class="v">{{.Value}}</div><div class="l">{{.Label}}</div></div>
{{- end}}
</div>

<h2>Calls per backend</h2>
<p class="muted">Attributed by the <code>{{.R.BackendHeader}}</code> response header of each call; the dashed line is an even share.</p>
<div class="card">
{{- with .Bars}}
<svg xmlns="http://www.w3.org/2000/svg" width="{{.Width}}" height="{{.Height}}" viewBox="0 0 {{.Width}} {{.Height}}" role="img" aria-label="calls per backend">
{{- range .Rows}}
  <text x="{{.LabelX}}" y="{{.TextY}}" text-anchor="end">{{.Name}}</text>
  <rect x="{{.X}}" y="{{.Y}}" width="{{.W}}" height="{{.H}}" rx="3" fill="{{.Color}}"><title>{{.Name}}: {{.Value}}</title></rect>
  <text x="{{.ValueX}}" y="{{.TextY}}">{{.Value}}</text>
{{- end}}
{{- if .EvenX}}
  <line x1="{{.EvenX}}" x2="{{.EvenX}}" y1="4" y2="{{.Height}}" stroke="#111827" stroke-width="1" stroke-dasharray="4 3"/>
{{- end}}
</svg>
{{- if not .Rows}}<p class="muted">No calls were attributed.</p>{{end}}
{{- end}}
</div>

{{template "timeline" .Timeline}}
<h2>Backends</h2>
<table>
<tr><th>Backend</th><th>Calls</th><th>Share</th><th>Errors</th><th>p50 wire</th><th>p99 wire</th></tr>
{{- range .Bars.Rows}}
<tr><td class="name"><span class="swatch" style="background: {{.Color}}"></span>{{.Name}}</td><td>{{.Calls}}</td><td>{{.Share}}</td><td>{{.Errors}}</td><td>{{.P50}}</td><td>{{.P99}}</td></tr>
{{- end}}
</table>
<p class="muted">Per-backend latencies are on the wire clock, like “p50 wire” above; “p50 client” is on the client clock. Clocks: {{index .Clocks 0}}; {{index .Clocks 1}}. Both over the calls that succeeded.</p>

<h2>Latency histogram</h2>
<p class="muted">Calls that succeeded, on the client clock; the last bar may hold a slow tail beyond the 99.9th percentile.</p>
<div class="card">
{{- with .Hist}}
{{- if .Empty}}<p class="muted">No successful calls.</p>{{else}}
<svg xmlns="http://www.w3.org/2000/svg" width="{{.Width}}" height="{{.Height}}" viewBox="0 0 {{.Width}} {{.Height}}" role="img" aria-label="latency histogram">
  <line x1="{{.Left}}" x2="{{.Right}}" y1="{{.BaseY}}" y2="{{.BaseY}}" stroke="#9ca3af"/>
{{- range .Bars}}
  <rect x="{{.X}}" y="{{.Y}}" width="{{.W}}" height="{{.H}}" fill="#3b82f6"><title>{{.Title}}</title></rect>
{{- end}}
{{- $base := .BaseY}}
{{- range .Ticks}}
  <line x1="{{.X}}" x2="{{.X}}" y1="{{$base}}" y2="{{$base}}" stroke="#9ca3af"/>
  <text x="{{.X}}" y="{{$base}}" dy="18" text-anchor="{{.Anchor}}">{{.Label}}</text>
{{- end}}
  <line x1="{{.Left}}" x2="{{.Left}}" y1="{{.Top}}" y2="{{.BaseY}}" stroke="#9ca3af"/>
  <text x="{{.Left}}" y="{{.Top}}" dx="-6" dy="4" text-anchor="end">{{.Peak}}</text>
  <text x="{{.Left}}" y="{{.BaseY}}" dx="-6" dy="4" text-anchor="end">0</text>
  <text x="{{.Right}}" y="{{.Height}}" dy="-6" text-anchor="end">latency per call (bars: calls)</text>
</svg>
{{- end}}
{{- end}}
</div>

<h2>Status codes</h2>
<table>
<tr><th>Code</th><th>Calls</th><th>Share</th></tr>
{{- range .Codes}}
<tr><td class="name">{{.Code}}</td><td>{{.Count}}</td><td>{{.Share}}</td></tr>
{{- end}}
</table>
{{- with .Errors}}

<h2>Errors</h2>
<table>
<tr><th>Message</th><th>Calls</th><th>Share</th></tr>
{{- range .}}
<tr><td class="msg">{{.Code}}</td><td>{{.Count}}</td><td>{{.Share}}</td></tr>
{{- end}}
</table>
{{- end}}
{{- range .R.Notes}}
<p class="note">{{.}}</p>
{{- end}}

<h2>Run</h2>
<table class="run">
{{- range .Run}}
<tr><th>{{.Label}}</th><td class="msg">{{.Value}}</td></tr>
{{- end}}
</table>
</main>
</body>
</html>
`
