package cluster

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"net/http/pprof"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// adminWriteTimeout bounds the writing of an admin response; pprof adds
// a profile's or trace's seconds to it, and maxProfileSeconds bounds
// those: together they bound what a client that never reads can make the
// proxy hold (a never-read /debug/pprof/trace?seconds=600 grew it by 0.4
// MB/s, attack round 3).
const adminWriteTimeout = 35 * time.Second

// maxProfileSeconds is the longest CPU profile or execution trace the
// admin endpoints take (pprof's default is 30 s).
const maxProfileSeconds = 60

// capSeconds refuses with 400 a profile or trace longer than
// maxProfileSeconds, and a seconds that is not a positive number (an
// integer for a CPU profile, whole seconds: integer): net/http/pprof takes
// those for its default, so ?seconds=-5, ?seconds=x or, for a CPU
// profile, ?seconds=0.5 ran a 30 s profile the client did not ask for.
// It hands the others, and a request without seconds (the default: 30 s
// of CPU profile, 1 s of trace), to h.
func capSeconds(h http.HandlerFunc, integer bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if q := r.URL.Query(); q.Has("seconds") {
			v := q.Get("seconds")
			var sec float64
			var err error
			if integer {
				var n int64
				n, err = strconv.ParseInt(v, 10, 64)
				sec = float64(n)
			} else {
				sec, err = strconv.ParseFloat(v, 64)
			}
			switch {
			case err != nil || !(sec > 0): // !(>): NaN too
				what := "a positive number"
				if integer {
					what = "a positive whole number"
				}
				http.Error(w, fmt.Sprintf("seconds must be %s, got %q", what, v), http.StatusBadRequest)
				return
			case sec > maxProfileSeconds:
				http.Error(w, fmt.Sprintf("seconds must be at most %d", maxProfileSeconds), http.StatusBadRequest)
				return
			}
		}
		h(w, r)
	}
}

// adminGate makes the admin responses that cost CPU to make (metrics,
// status, backends, runtime profiles) one at a time, as Envoy's admin
// requests are served by its one main thread: clients scraping at once
// wait their turn (in order) instead of taking every CPU from the data
// plane. On 2 CPUs, 16 clients scraping /metrics in a loop cut a 2,000
// calls/s load to about 590 calls/s; one, however fast, left it whole.
// A response is made into a buffer and written after the turn ends, so a
// client slow to read holds no turn. A profile over seconds (a CPU
// profile, a trace, a delta profile with ?seconds=) mostly sleeps and
// does not take a turn; nor do the probes /healthz and /readyz.
type adminGate chan struct{}

func (g adminGate) wrap(h http.Handler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/debug/pprof/") && r.URL.Query().Has("seconds") {
			h.ServeHTTP(w, r)
			return
		}
		select {
		case g <- struct{}{}:
		case <-r.Context().Done():
			return // the client went away while waiting
		}
		buf := &bufferedResponse{header: http.Header{}}
		func() {
			defer func() { <-g }()
			h.ServeHTTP(buf, r)
		}()
		maps.Copy(w.Header(), buf.header)
		if w.Header().Get("Content-Length") == "" {
			w.Header().Set("Content-Length", strconv.Itoa(buf.body.Len()))
		}
		if buf.code != 0 {
			w.WriteHeader(buf.code)
		}
		w.Write(buf.body.Bytes())
	}
}

// bufferedResponse is an http.ResponseWriter that keeps the response.
type bufferedResponse struct {
	header http.Header
	code   int
	body   bytes.Buffer
}

func (b *bufferedResponse) Header() http.Header { return b.header }

func (b *bufferedResponse) WriteHeader(code int) {
	if b.code == 0 {
		b.code = code
	}
}

func (b *bufferedResponse) Write(p []byte) (int, error) {
	if b.code == 0 {
		b.code = http.StatusOK
	}
	return b.body.Write(p)
}

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
//   - /debug/pprof/: the Go runtime's profiles (a CPU profile or trace at
//     most a minute long); /debug/pprof/mutex and
//     /debug/pprof/block answer 404 unless ServerConfig.MutexProfileFraction
//     and BlockProfileRate switch them on;
//   - / (that path only): a live status page, self-contained HTML that
//     polls /status.json, the clusters' per-backend state and, with
//     metrics on, their cumulative call counters and duration histograms.
func (s *Server) AdminHandler() http.Handler {
	mux := http.NewServeMux()
	gate := make(adminGate, 1)
	if s.cfg.Metrics != nil {
		mux.Handle("GET /metrics", gate.wrap(promhttp.HandlerFor(s.cfg.Metrics, promhttp.HandlerOpts{})))
	}
	mux.HandleFunc("GET /{$}", serveStatusPage)
	mux.HandleFunc("GET /status.json", gate.wrap(http.HandlerFunc(s.serveStatusJSON)))
	mux.HandleFunc("GET /debug/pprof/", gate.wrap(http.HandlerFunc(pprof.Index)))
	mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("GET /debug/pprof/profile", capSeconds(pprof.Profile, true))
	mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("GET /debug/pprof/trace", capSeconds(pprof.Trace, false))
	mux.Handle("GET /debug/pprof/mutex", gate.wrap(contentionProfile("mutex", s.cfg.MutexProfileFraction, "MutexProfileFraction (--mutex-profile-fraction)")))
	mux.Handle("GET /debug/pprof/block", gate.wrap(contentionProfile("block", s.cfg.BlockProfileRate, "BlockProfileRate (--block-profile-rate)")))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		q, err := url.ParseQuery(r.URL.RawQuery)
		if err != nil {
			// url.Values drops a pair that does not parse: the probe of
			// one cluster got the answer for all.
			http.Error(w, "malformed query: "+err.Error(), http.StatusBadRequest)
			return
		}
		ok, reason := s.Ready()
		if names := q["cluster"]; len(names) > 0 && ok {
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
	mux.HandleFunc("GET /backends", gate.wrap(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
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
	})))
	return mux
}

// contentionProfile serves the runtime profile name when rate switched it
// on, and otherwise 404 saying how to: with the rate at zero the runtime
// records nothing, and an empty profile would read as "no contention".
func contentionProfile(name string, rate int, knob string) http.Handler {
	if rate > 0 {
		return pprof.Handler(name)
	}
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, fmt.Sprintf("%s profile off: set %s to a positive value", name, knob), http.StatusNotFound)
	})
}
