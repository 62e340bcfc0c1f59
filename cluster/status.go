package cluster

import (
	_ "embed"
	"encoding/json"
	"math"
	"net/http"
	"time"

	dto "github.com/prometheus/client_model/go"
)

// The status page (GET / on the admin listener) is one self-contained HTML
// document: inline CSS and JavaScript, no external assets, so it works on
// a host with no route to the internet and its Content-Security-Policy can
// forbid every origin but its own. It polls /status.json every two seconds
// and keeps a minute of snapshots in the browser: rates, shares and
// latency quantiles are differences between the newest snapshot and the
// oldest one in the window, so the server keeps no history and costs
// nothing while nobody looks.

//go:embed status.html
var statusHTML []byte

// statusCSP allows the page its own inline style and script and fetches to
// its own origin, and nothing else.
const statusCSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'"

// statusDoc is the body of /status.json: the state of each current
// cluster and, with metrics on, the cumulative counters the page diffs.
type statusDoc struct {
	Version     string          `json:"version,omitempty"`
	TimeMS      int64           `json:"time_ms"` // server clock, Unix milliseconds
	Ready       bool            `json:"ready"`
	ReadyReason string          `json:"ready_reason"`
	Metrics     bool            `json:"metrics"`
	Clusters    []statusCluster `json:"clusters"`
}

type statusCluster struct {
	Name  string `json:"name"`
	Ready bool   `json:"ready"`
	// PickFailures counts calls for which no backend could be picked
	// (metrics only).
	PickFailures float64         `json:"pick_failures"`
	Backends     []statusBackend `json:"backends"`
}

// statusBackend is one backend: its state from the director, and with
// metrics on its counters from the registry (Started, Finished, Duration).
type statusBackend struct {
	Addr      string `json:"addr"`
	Weight    uint32 `json:"weight"`
	Healthy   bool   `json:"healthy"`
	Ejected   bool   `json:"ejected"`
	Ejections int64  `json:"ejections"`
	InFlight  int64  `json:"in_flight"`
	// Successes and Failures are the director's counts since the backend
	// joined the set (calls that ended CANCELLED count in neither); they
	// are what the page shows with metrics off.
	Successes int64 `json:"successes"`
	Failures  int64 `json:"failures"`

	Started  float64            `json:"started"`
	Finished map[string]float64 `json:"finished,omitempty"` // by gRPC code name
	Duration *statusHistogram   `json:"duration,omitempty"`
}

// statusHistogram is a cumulative histogram as Prometheus keeps it: Counts[i]
// observations were at most Bounds[i] seconds; the +Inf bucket is Count.
type statusHistogram struct {
	Count  uint64    `json:"count"`
	Sum    float64   `json:"sum"`
	Bounds []float64 `json:"bounds"`
	Counts []uint64  `json:"counts"`
}

// serveStatusPage serves the status page at exactly "/".
func serveStatusPage(w http.ResponseWriter, _ *http.Request) {
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Content-Security-Policy", statusCSP)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Cache-Control", "no-cache")
	w.Write(statusHTML)
}

// serveStatusJSON serves /status.json.
func (s *Server) serveStatusJSON(w http.ResponseWriter, _ *http.Request) {
	doc, err := s.status()
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	json.NewEncoder(w).Encode(doc)
}

// status builds the status document: the clusters currently routed to
// (or the one cluster), each backend's state from its director, and the
// per-backend call counters gathered from the metrics registry, matched by
// their cluster and backend labels.
func (s *Server) status() (*statusDoc, error) {
	doc := &statusDoc{Version: s.cfg.Version, TimeMS: time.Now().UnixMilli(), Metrics: s.cfg.Metrics != nil}
	doc.Ready, doc.ReadyReason = s.Ready()
	var counters map[string]*clusterCounters
	if s.cfg.Metrics != nil {
		fams, err := s.cfg.Metrics.Gather()
		if err != nil {
			return nil, err
		}
		counters = gatherCounters(fams)
	}
	cs := []*Cluster{s.cluster}
	if s.set != nil {
		cs = s.set.current()
	}
	doc.Clusters = make([]statusCluster, 0, len(cs))
	for _, c := range cs {
		cc := counters[c.Name()]
		sc := statusCluster{Name: c.Name(), Ready: c.Ready(), Backends: []statusBackend{}}
		if cc != nil {
			sc.PickFailures = cc.pickFailures
		}
		for _, b := range c.Backends() {
			sb := statusBackend{
				Addr: b.Addr, Weight: b.Weight, Healthy: b.Healthy, Ejected: b.Ejected, Ejections: b.Ejections,
				InFlight: b.InFlight, Successes: b.Successes, Failures: b.Failures,
			}
			if cc != nil {
				if bc := cc.backends[b.Addr]; bc != nil {
					sb.Started, sb.Finished, sb.Duration = bc.started, bc.finished, bc.duration
				}
			}
			sc.Backends = append(sc.Backends, sb)
		}
		doc.Clusters = append(doc.Clusters, sc)
	}
	return doc, nil
}

// clusterCounters are one cluster's counters out of a Gather.
type clusterCounters struct {
	pickFailures float64
	backends     map[string]*backendCounters
}

type backendCounters struct {
	started  float64
	finished map[string]float64
	duration *statusHistogram
}

// gatherCounters picks the per-call families out of fams, by the cluster
// label, then the backend label.
func gatherCounters(fams []*dto.MetricFamily) map[string]*clusterCounters {
	out := make(map[string]*clusterCounters)
	get := func(m *dto.Metric) (*clusterCounters, *backendCounters) {
		var cluster, backend string
		for _, l := range m.GetLabel() {
			switch l.GetName() {
			case "cluster":
				cluster = l.GetValue()
			case "backend":
				backend = l.GetValue()
			}
		}
		cc := out[cluster]
		if cc == nil {
			cc = &clusterCounters{backends: make(map[string]*backendCounters)}
			out[cluster] = cc
		}
		if backend == "" {
			return cc, nil
		}
		bc := cc.backends[backend]
		if bc == nil {
			bc = &backendCounters{finished: make(map[string]float64)}
			cc.backends[backend] = bc
		}
		return cc, bc
	}
	for _, f := range fams {
		switch f.GetName() {
		case "streamlb_calls_started_total":
			for _, m := range f.GetMetric() {
				if _, bc := get(m); bc != nil {
					bc.started = m.GetCounter().GetValue()
				}
			}
		case "streamlb_calls_finished_total":
			for _, m := range f.GetMetric() {
				if _, bc := get(m); bc != nil {
					if v := m.GetCounter().GetValue(); v > 0 {
						bc.finished[labelValue(m, "code")] = v
					}
				}
			}
		case "streamlb_call_duration_seconds":
			for _, m := range f.GetMetric() {
				_, bc := get(m)
				h := m.GetHistogram()
				if bc == nil || h == nil {
					continue
				}
				sh := &statusHistogram{Count: h.GetSampleCount(), Sum: h.GetSampleSum()}
				for _, b := range h.GetBucket() {
					if math.IsInf(b.GetUpperBound(), +1) {
						continue // JSON has no +Inf; it is Count
					}
					sh.Bounds = append(sh.Bounds, b.GetUpperBound())
					sh.Counts = append(sh.Counts, b.GetCumulativeCount())
				}
				bc.duration = sh
			}
		case "streamlb_pick_failures_total":
			for _, m := range f.GetMetric() {
				cc, _ := get(m)
				cc.pickFailures = m.GetCounter().GetValue()
			}
		}
	}
	return out
}

func labelValue(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}
