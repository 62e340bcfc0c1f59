package cluster_test

import (
	"context"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// scrapeFamilies fetches and parses the whole exposition.
func scrapeFamilies(t *testing.T, admin string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(admin + "/metrics")
	if err != nil {
		t.Errorf("GET /metrics: %v", err)
		return nil
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Errorf("parse /metrics: %v", err)
	}
	return fams
}

// checkExposition reports what is wrong with the per-call series of one
// scrape: a histogram whose buckets decrease or whose count is not its
// +Inf bucket, a negative in-flight gauge.
func checkExposition(fams map[string]*dto.MetricFamily) []string {
	var bad []string
	if f := fams["streamlb_call_duration_seconds"]; f != nil {
		for _, m := range f.GetMetric() {
			h := m.GetHistogram()
			var prev uint64
			inf := uint64(math.MaxUint64)
			for _, b := range h.GetBucket() {
				if b.GetCumulativeCount() < prev {
					bad = append(bad, fmt.Sprintf("%v: bucket le=%v %d below the one before (%d)", m.GetLabel(), b.GetUpperBound(), b.GetCumulativeCount(), prev))
				}
				prev = b.GetCumulativeCount()
				if math.IsInf(b.GetUpperBound(), 1) {
					inf = b.GetCumulativeCount()
				}
			}
			if inf != uint64(math.MaxUint64) && inf != h.GetSampleCount() {
				bad = append(bad, fmt.Sprintf("%v: count %d, +Inf bucket %d", m.GetLabel(), h.GetSampleCount(), inf))
			}
			if prev > h.GetSampleCount() {
				bad = append(bad, fmt.Sprintf("%v: count %d below a bucket (%d)", m.GetLabel(), h.GetSampleCount(), prev))
			}
			if h.GetSampleSum() < 0 {
				bad = append(bad, fmt.Sprintf("%v: sum %v", m.GetLabel(), h.GetSampleSum()))
			}
		}
	}
	if f := fams["streamlb_calls_in_flight"]; f != nil {
		for _, m := range f.GetMetric() {
			if v := m.GetGauge().GetValue(); v < 0 {
				bad = append(bad, fmt.Sprintf("%v: in flight %v", m.GetLabel(), v))
			}
		}
	}
	// No backend has more calls ended, by code or timed, than started.
	backendOf := func(m *dto.Metric) string {
		for _, l := range m.GetLabel() {
			if l.GetName() == "backend" {
				return l.GetValue()
			}
		}
		return ""
	}
	started, ended, timed := map[string]float64{}, map[string]float64{}, map[string]float64{}
	if f := fams["streamlb_calls_started_total"]; f != nil {
		for _, m := range f.GetMetric() {
			started[backendOf(m)] = m.GetCounter().GetValue()
		}
	}
	if f := fams["streamlb_calls_finished_total"]; f != nil {
		for _, m := range f.GetMetric() {
			ended[backendOf(m)] += m.GetCounter().GetValue()
		}
	}
	if f := fams["streamlb_call_duration_seconds"]; f != nil {
		for _, m := range f.GetMetric() {
			timed[backendOf(m)] = float64(m.GetHistogram().GetSampleCount())
		}
	}
	for b, n := range ended {
		if n > started[b] || timed[b] > started[b] {
			bad = append(bad, fmt.Sprintf("backend %s: %v calls finished and %v timed, %v started", b, n, timed[b], started[b]))
		}
	}
	return bad
}

// TestMetricsUnderLoadMatchClients: calls ending every way (OK, a
// backend's status, the client's cancel, the client's deadline) run
// concurrently over two backends while /metrics is scraped; every scrape
// is a valid exposition, and at the end the calls counted per code and
// backend are those the clients saw (those they gave up on at most). For
// both engines.
func TestMetricsUnderLoadMatchClients(t *testing.T) {
	for _, engine := range cluster.Engines() {
		t.Run(engine, func(t *testing.T) {
			a := startBackend(t, "a", "127.0.0.1:0")
			b := startBackend(t, "b", "127.0.0.1:0")
			r := runServer(t, cluster.ServerConfig{Engine: engine, Metrics: prometheus.NewRegistry(),
				Cluster: cluster.Config{Name: "echo", Targets: []string{a.Addr(), b.Addr()}}})
			client := dial(t, r.addr)
			ctx := testkit.Context(t, 60*time.Second)
			if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
				t.Fatal(err)
			}
			const workers, perWorker = 8, 60
			var mu sync.Mutex
			got := map[codes.Code]int{codes.OK: 1} // the first call
			var wg sync.WaitGroup
			for w := range workers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range perWorker {
						cctx, cancel := context.WithCancel(ctx)
						switch (w + i) % 5 {
						case 1:
							cctx = metadata.AppendToOutgoingContext(cctx, testserver.MetadataFailCode, strconv.Itoa(int(codes.NotFound)))
						case 2:
							cctx = metadata.AppendToOutgoingContext(cctx, testserver.MetadataHang, "1")
							time.AfterFunc(time.Duration(i%7)*time.Millisecond, cancel)
						case 3:
							cctx = metadata.AppendToOutgoingContext(cctx, testserver.MetadataHang, "1")
							var c2 context.CancelFunc
							cctx, c2 = context.WithTimeout(cctx, time.Duration(5+i%7)*time.Millisecond)
							defer c2()
						}
						_, err := client.UnaryCall(cctx, &testgrpc.SimpleRequest{ResponseSize: 10})
						cancel()
						mu.Lock()
						got[status.Code(err)]++
						mu.Unlock()
					}
				}()
			}
			scraped := make(chan struct{})
			go func() {
				defer close(scraped)
				for range 200 {
					for _, bad := range checkExposition(scrapeFamilies(t, r.admin)) {
						t.Errorf("while calls run: %s", bad)
					}
					select {
					case <-ctx.Done():
						return
					default:
					}
				}
			}()
			wg.Wait()
			<-scraped
			testkit.WaitFor(ctx, t, "nothing in flight", func() bool {
				for _, v := range scrape(t, r.admin, "streamlb_calls_in_flight") {
					if v != 0 {
						return false
					}
				}
				return true
			})
			fams := scrapeFamilies(t, r.admin)
			for _, bad := range checkExposition(fams) {
				t.Error(bad)
			}
			started := scrape(t, r.admin, "streamlb_calls_started_total")
			finished := scrape(t, r.admin, "streamlb_calls_finished_total")
			durCount := scrape(t, r.admin, "streamlb_call_duration_seconds")
			byCode := map[codes.Code]float64{}
			for _, ts := range []*testserver.Server{a, b} {
				var fin float64
				for c := codes.OK; c <= codes.Unauthenticated; c++ {
					v := finished["backend="+ts.Addr()+",code="+c.String()]
					fin += v
					byCode[c] += v
				}
				if s := started["backend="+ts.Addr()]; s != fin || durCount["backend="+ts.Addr()] != fin {
					t.Errorf("backend %s: started %v, finished %v, durations %v: want equal", ts.Addr(), s, fin, durCount["backend="+ts.Addr()])
				}
			}
			// A call the client gives up on may end before the proxy
			// picks for it, and which of the client's deadline and its
			// RST_STREAM the proxy sees first is a race: those two are
			// checked together, as at most what the clients got.
			total := 0
			for c, n := range got {
				total += n
				if c != codes.Canceled && c != codes.DeadlineExceeded && byCode[c] != float64(n) {
					t.Errorf("finished{code=%v} = %v, clients got %d", c, byCode[c], n)
				}
			}
			gaveUp := float64(got[codes.Canceled] + got[codes.DeadlineExceeded])
			if n := byCode[codes.Canceled] + byCode[codes.DeadlineExceeded]; n > gaveUp {
				t.Errorf("finished CANCELLED or DEADLINE_EXCEEDED %v, clients got %v", n, gaveUp)
			}
			for c, n := range byCode {
				if _, ok := got[c]; !ok && n != 0 {
					t.Errorf("finished{code=%v} = %v, clients got none", c, n)
				}
			}
			if total != 1+workers*perWorker {
				t.Fatalf("tallied %d calls", total)
			}
		})
	}
}

// TestMetricsValidAcrossReloads: reloads that change the cluster's
// backends (a new cluster of the same name, its series withdrawn and
// registered again) run under load while /metrics is scraped: every
// scrape is a valid exposition, no call fails but those the clients
// cancel, and at the end nothing is in flight. For both engines.
func TestMetricsValidAcrossReloads(t *testing.T) {
	for _, engine := range cluster.Engines() {
		t.Run(engine, func(t *testing.T) {
			a := startBackend(t, "a", "127.0.0.1:0")
			b := startBackend(t, "b", "127.0.0.1:0")
			dir := t.TempDir()
			conf := "engine: %s\nclusters: [{name: echo, targets: [%s]}]\nroutes: [{cluster: echo}]\n"
			sets := []string{a.Addr() + ", " + b.Addr(), a.Addr(), b.Addr()}
			path := writeConfig(t, dir, fmt.Sprintf(conf, engine, sets[0]))
			f, err := cluster.LoadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			cfg := f.ServerConfig()
			cfg.Metrics = prometheus.NewRegistry()
			r := runServer(t, cfg)
			client := dial(t, r.addr)
			ctx := testkit.Context(t, 60*time.Second)
			if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
				t.Fatal(err)
			}
			// Calls and scrapes run until the reloads are done (at most
			// perWorker calls each, 300 scrapes).
			const workers, perWorker, reloads = 6, 400, 8
			reloaded := make(chan struct{})
			var ended atomic.Int64 // calls ended
			var wg sync.WaitGroup
			for w := range workers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range perWorker {
						select {
						case <-reloaded:
							return
						default:
						}
						cctx, cancel := context.WithCancel(ctx)
						md := []string{testserver.MetadataDelay, strconv.Itoa((w+i)%10) + "ms"}
						if (w+i)%4 == 0 {
							time.AfterFunc(time.Duration(i%5)*time.Millisecond, cancel)
						}
						_, err := client.UnaryCall(metadata.AppendToOutgoingContext(cctx, md...), &testgrpc.SimpleRequest{ResponseSize: 10})
						gaveUp := cctx.Err() != nil
						cancel()
						ended.Add(1)
						if err != nil && !gaveUp {
							t.Errorf("call: %v", err)
						}
					}
				}()
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range 300 {
					for _, bad := range checkExposition(scrapeFamilies(t, r.admin)) {
						t.Errorf("while calls run: %s", bad)
					}
					select {
					case <-reloaded:
						return
					default:
					}
				}
			}()
			for i := 1; i <= reloads; i++ {
				writeConfig(t, dir, fmt.Sprintf(conf, engine, sets[i%len(sets)]))
				if err := r.srv.Reload(ctx); err != nil {
					t.Errorf("reload %d: %v", i, err)
					break
				}
				// Calls run on each set a while.
				n := ended.Load()
				testkit.WaitFor(ctx, t, "calls on the new set", func() bool { return ended.Load() >= n+24 })
			}
			close(reloaded)
			wg.Wait()
			testkit.WaitFor(ctx, t, "nothing in flight", func() bool {
				for _, v := range scrape(t, r.admin, "streamlb_calls_in_flight") {
					if v != 0 {
						return false
					}
				}
				return true
			})
			for _, bad := range checkExposition(scrapeFamilies(t, r.admin)) {
				t.Error(bad)
			}
		})
	}
}
