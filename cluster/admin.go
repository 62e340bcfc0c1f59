package cluster

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/pprof"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// AdminHandler serves the admin endpoints:
//   - /healthz: 200 while the process runs (liveness);
//   - /readyz: 200 while the server should get clients, 503 with the
//     reason while draining or while no backend is healthy (every backend
//     failing its health checks or ejected, or none resolved), so an
//     orchestrator sends clients to a proxy that has one; with a
//     configuration file, ready means some routed cluster has a usable
//     backend (see [Server.Ready]), and /readyz?cluster=NAME (repeatable)
//     asks about those clusters alone: 503 naming the first without a
//     usable backend, 404 for a cluster no route uses;
//   - /backends: the cluster's per-backend state as JSON;
//   - /metrics: Prometheus metrics, if ServerConfig.Metrics is set;
//   - /debug/pprof/: the Go runtime's profiles;
//   - / (that path only): a live status page, self-contained HTML that
//     polls /status.json, the clusters' per-backend state and, with
//     metrics on, their cumulative call counters and duration histograms.
func (s *Server) AdminHandler() http.Handler {
	mux := http.NewServeMux()
	if s.cfg.Metrics != nil {
		mux.Handle("GET /metrics", promhttp.HandlerFor(s.cfg.Metrics, promhttp.HandlerOpts{}))
	}
	mux.HandleFunc("GET /{$}", serveStatusPage)
	mux.HandleFunc("GET /status.json", s.serveStatusJSON)
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		ok, reason := s.Ready()
		if names := r.URL.Query()["cluster"]; len(names) > 0 && ok {
			var known bool
			ok, known, reason = s.ClustersReady(names...)
			if !known {
				http.Error(w, reason, http.StatusNotFound)
				return
			}
		}
		if !ok {
			http.Error(w, reason, http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, reason)
	})
	mux.HandleFunc("GET /backends", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if s.set != nil {
			// By cluster name.
			m := map[string]any{}
			for _, c := range s.set.current() {
				m[c.Name()] = c.Backends()
			}
			enc.Encode(m)
			return
		}
		enc.Encode(s.cluster.Backends())
	})
	return mux
}
