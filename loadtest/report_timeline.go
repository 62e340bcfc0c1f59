package loadtest

import (
	"fmt"
	"strings"
)

// Geometry of the timeline chart, in SVG user units.
const (
	tlHeight = 240
	tlTop    = 28 // room for the event labels
	tlBottom = 36 // room for the axis labels
	tlLeft   = 52
	tlRight  = 12
	tlTicks  = 8
)

// htmlTimeline is the stacked chart of calls per backend per interval.
type htmlTimeline struct {
	Width, Height  int
	Left, Right    float64
	Top, BaseY     float64
	Peak           int64 // calls in the busiest interval
	Interval       string
	Rects          []htmlRect
	ErrorLine      string // SVG points of the errors-per-interval line; empty without errors
	Ticks          []htmlTick
	Marks          []htmlMark
	Legend         []htmlLegend
	Empty, HasErrs bool
}

type htmlRect struct {
	X, Y, W, H float64
	Color      string
	Title      string
}

type htmlMark struct {
	X, LabelY float64
	Color     string
	Label     string
	Anchor    string
}

type htmlLegend struct {
	Name, Color string
}

// backendColor is the colour of the i-th backend of rows named name.
func backendColor(i int, name string) string {
	if name == UnknownBackend {
		return "#9ca3af"
	}
	return palette[i%len(palette)]
}

func newHTMLTimeline(tl Timeline) htmlTimeline {
	h := htmlTimeline{
		Width: chartWidth, Height: tlHeight,
		Left: tlLeft, Right: chartWidth - tlRight, Top: tlTop, BaseY: tlHeight - tlBottom,
		Interval: fmtInterval(tl.Interval),
	}
	var peak int64
	for _, p := range tl.Points {
		var sum int64
		for _, n := range p.Calls {
			sum += n
		}
		peak = max(peak, sum)
	}
	if peak == 0 {
		h.Empty = true
		return h
	}
	h.Peak = peak
	colors := make(map[string]string, len(tl.Backends))
	for i, name := range tl.Backends {
		colors[name] = backendColor(i, name)
		h.Legend = append(h.Legend, htmlLegend{Name: name, Color: colors[name]})
	}
	plotW, plotH := h.Right-h.Left, h.BaseY-h.Top
	slot := plotW / float64(len(tl.Points))
	gap := min(1, slot/4)
	var errPts []string
	for i, p := range tl.Points {
		x := h.Left + float64(i)*slot
		y := h.BaseY
		var errs int64
		for j, n := range p.Calls {
			errs += p.Errors[j]
			if n == 0 {
				continue
			}
			hgt := plotH * float64(n) / float64(peak)
			y -= hgt
			title := fmt.Sprintf("%s–%s: %s %d calls", fmtInterval(p.Start), fmtInterval(p.Start+tl.Interval), tl.Backends[j], n)
			if p.Errors[j] > 0 {
				title += fmt.Sprintf(", %d errors", p.Errors[j])
			}
			h.Rects = append(h.Rects, htmlRect{X: x + gap/2, Y: y, W: max(slot-gap, 0.5), H: hgt, Color: colors[tl.Backends[j]], Title: title})
		}
		h.HasErrs = h.HasErrs || errs > 0
		errPts = append(errPts, fmt.Sprintf("%.1f,%.1f", x+slot/2, h.BaseY-plotH*float64(errs)/float64(peak)))
	}
	if h.HasErrs {
		h.ErrorLine = strings.Join(errPts, " ")
	}
	step := max(1, (len(tl.Points)+tlTicks-1)/tlTicks)
	for i := 0; i < len(tl.Points); i += step {
		anchor := "middle"
		if i == 0 {
			anchor = "start"
		}
		h.Ticks = append(h.Ticks, htmlTick{X: h.Left + float64(i)*slot, Label: fmtInterval(tl.Points[i].Start), Anchor: anchor})
	}
	end := tl.Points[len(tl.Points)-1].Start + tl.Interval
	h.Ticks = append(h.Ticks, htmlTick{X: h.Right, Label: fmtInterval(end), Anchor: "end"})
	for k, e := range tl.Events {
		x := h.Left + plotW*float64(e.At)/float64(end)
		sign, anchor := "▲ ", "start"
		if e.Kind == EventVanished {
			sign, anchor = "▼ ", "end"
		}
		// Alternate two label rows so neighbouring marks stay legible.
		h.Marks = append(h.Marks, htmlMark{
			X: x, LabelY: float64(10 + 12*(k%2)), Color: colors[e.Backend],
			Label: sign + e.Backend + " " + e.Kind, Anchor: anchor,
		})
	}
	return h
}

// timelineTemplate is the timeline section of the HTML report.
const timelineTemplate = `
<h2>Timeline</h2>
<p class="muted">Calls per backend per {{.Interval}}, stacked, by when each call ended;
{{- if .HasErrs}} the red line is failed calls per interval;{{end}} ▲/▼ mark a backend appearing after the start or vanishing before the end.</p>
<div class="card">
{{- if .Empty}}<p class="muted">No calls were attributed.</p>{{else}}
<svg xmlns="http://www.w3.org/2000/svg" width="{{.Width}}" height="{{.Height}}" viewBox="0 0 {{.Width}} {{.Height}}" role="img" aria-label="calls per backend over time">
  <line x1="{{.Left}}" x2="{{.Right}}" y1="{{.BaseY}}" y2="{{.BaseY}}" stroke="#9ca3af"/>
  <line x1="{{.Left}}" x2="{{.Left}}" y1="{{.Top}}" y2="{{.BaseY}}" stroke="#9ca3af"/>
{{- range .Rects}}
  <rect x="{{.X}}" y="{{.Y}}" width="{{.W}}" height="{{.H}}" fill="{{.Color}}"><title>{{.Title}}</title></rect>
{{- end}}
{{- if .ErrorLine}}
  <polyline points="{{.ErrorLine}}" fill="none" stroke="#dc2626" stroke-width="1.5"/>
{{- end}}
{{- $base := .BaseY}}{{$top := .Top}}
{{- range .Marks}}
  <line x1="{{.X}}" x2="{{.X}}" y1="{{$top}}" y2="{{$base}}" stroke="{{.Color}}" stroke-width="1.5" stroke-dasharray="4 3"/>
  <text x="{{.X}}" y="{{.LabelY}}" text-anchor="{{.Anchor}}">{{.Label}}</text>
{{- end}}
{{- range .Ticks}}
  <text x="{{.X}}" y="{{$base}}" dy="16" text-anchor="{{.Anchor}}">{{.Label}}</text>
{{- end}}
  <text x="{{.Left}}" y="{{.Top}}" dx="-6" dy="4" text-anchor="end">{{.Peak}}</text>
  <text x="{{.Left}}" y="{{.BaseY}}" dx="-6" dy="4" text-anchor="end">0</text>
  <text x="{{.Right}}" y="{{.Height}}" dy="-4" text-anchor="end">time since start (bars: calls per {{.Interval}})</text>
</svg>
<p class="legend">{{range .Legend}}<span class="item"><span class="swatch" style="background: {{.Color}}"></span>{{.Name}}</span>{{end}}</p>
{{- end}}
</div>
`
