package cluster_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// statusDoc is the part of /status.json the tests read.
type statusDoc struct {
	Version  string `json:"version"`
	Ready    bool   `json:"ready"`
	Metrics  bool   `json:"metrics"`
	Clusters []struct {
		Name     string `json:"name"`
		Ready    bool   `json:"ready"`
		Backends []struct {
			Addr      string             `json:"addr"`
			Healthy   bool               `json:"healthy"`
			Ejected   bool               `json:"ejected"`
			InFlight  int64              `json:"in_flight"`
			Successes int64              `json:"successes"`
			Failures  int64              `json:"failures"`
			Started   float64            `json:"started"`
			Finished  map[string]float64 `json:"finished"`
			Duration  *struct {
				Count  uint64    `json:"count"`
				Sum    float64   `json:"sum"`
				Bounds []float64 `json:"bounds"`
				Counts []uint64  `json:"counts"`
			} `json:"duration"`
		} `json:"backends"`
	} `json:"clusters"`
}

// fetchAdmin fetches url and returns the response's status, content type
// and body.
func fetchAdmin(t *testing.T, url string) (int, string, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return resp.StatusCode, resp.Header.Get("Content-Type"), string(body)
}

func getStatus(t *testing.T, admin string) statusDoc {
	t.Helper()
	code, ct, body := fetchAdmin(t, admin+"/status.json")
	if code != http.StatusOK || ct != "application/json" {
		t.Fatalf("GET /status.json = %d %q, want 200 application/json", code, ct)
	}
	var doc statusDoc
	if err := json.Unmarshal([]byte(body), &doc); err != nil {
		t.Fatalf("GET /status.json: %v in %s", err, body)
	}
	return doc
}

// TestStatusPage serves the page and /status.json from a running server
// after calls, and checks the counters against the calls made and the
// backends' own counts.
func TestStatusPage(t *testing.T) {
	backends := map[string]*testserver.Server{}
	var targets []string
	for _, name := range []string{"a", "b", "c"} {
		ts := startBackend(t, name, "127.0.0.1:0")
		backends[ts.Addr()] = ts
		targets = append(targets, ts.Addr())
	}
	r := runServer(t, cluster.ServerConfig{
		Metrics: prometheus.NewRegistry(), Version: "v1.2.3-test",
		Cluster: cluster.Config{Name: "echo", Targets: targets},
	})

	code, ct, page := fetchAdmin(t, r.admin+"/")
	if code != http.StatusOK || !strings.HasPrefix(ct, "text/html") {
		t.Fatalf("GET / = %d %q, want 200 text/html", code, ct)
	}
	if !strings.Contains(page, "status.json") || !strings.Contains(page, "<script>") {
		t.Error("GET / is not the status page")
	}
	if u := regexp.MustCompile(`(?i)(https?:)?//[a-z0-9.-]+\.[a-z]{2,}|<(link|img|script)[^>]+(src|href)=`).FindString(page); u != "" {
		t.Errorf("status page refers to an external asset: %q", u)
	}
	for _, path := range []string{"/nope", "/index.html", "/status"} {
		if code, _, _ := fetchAdmin(t, r.admin+path); code != http.StatusNotFound {
			t.Errorf("GET %s = %d, want 404", path, code)
		}
	}

	client := dial(t, r.addr)
	const calls, failing = 60, 6
	for i := range calls {
		ctx := t.Context()
		if i < failing {
			ctx = metadata.AppendToOutgoingContext(ctx, testserver.MetadataFailCode, "14") // UNAVAILABLE
		}
		_, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{}, grpc.WaitForReady(true))
		if i < failing {
			if status.Code(err) != codes.Unavailable {
				t.Fatalf("call %d: %v, want Unavailable", i, err)
			}
		} else if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
	}

	var doc statusDoc
	ctx := testkit.Context(t, 10*time.Second)
	testkit.WaitFor(ctx, t, "every call finished in /status.json", func() bool {
		doc = getStatus(t, r.admin)
		var n float64
		for _, c := range doc.Clusters {
			for _, b := range c.Backends {
				for _, v := range b.Finished {
					n += v
				}
			}
		}
		return n == calls
	})
	if !doc.Metrics || !doc.Ready || doc.Version != "v1.2.3-test" {
		t.Errorf("status.json metrics=%v ready=%v version=%q, want true, true, v1.2.3-test", doc.Metrics, doc.Ready, doc.Version)
	}
	if len(doc.Clusters) != 1 || doc.Clusters[0].Name != "echo" || !doc.Clusters[0].Ready {
		t.Fatalf("status.json clusters = %+v, want echo, ready", doc.Clusters)
	}
	var started, unavailable float64
	for _, b := range doc.Clusters[0].Backends {
		ts := backends[b.Addr]
		if ts == nil {
			t.Errorf("status.json has backend %s, not one of ours", b.Addr)
			continue
		}
		want := float64(ts.Calls())
		ok, un := b.Finished["OK"], b.Finished["Unavailable"]
		if b.Started != want || ok+un != want {
			t.Errorf("%s: started %v, finished %v OK + %v Unavailable, want %v in all (the backend's own count)", b.Addr, b.Started, ok, un, want)
		}
		if b.Duration == nil || float64(b.Duration.Count) != want || len(b.Duration.Bounds) != len(b.Duration.Counts) || len(b.Duration.Bounds) == 0 {
			t.Errorf("%s: duration %+v, want %v observations in buckets", b.Addr, b.Duration, want)
		} else if last := b.Duration.Counts[len(b.Duration.Counts)-1]; last > b.Duration.Count {
			t.Errorf("%s: cumulative bucket %d above the count %d", b.Addr, last, b.Duration.Count)
		}
		if !b.Healthy || b.Ejected || b.InFlight != 0 {
			t.Errorf("%s: healthy=%v ejected=%v in_flight=%d, want true, false, 0", b.Addr, b.Healthy, b.Ejected, b.InFlight)
		}
		started += b.Started
		unavailable += un
	}
	if started != calls || unavailable != failing {
		t.Errorf("status.json started %v (%v Unavailable), want %d (%d)", started, unavailable, calls, failing)
	}
}

// TestStatusPageMetricsOff checks that without metrics /status.json still
// lists the backends' state, and says metrics are off.
func TestStatusPageMetricsOff(t *testing.T) {
	a := startBackend(t, "a", "127.0.0.1:0")
	r := runServer(t, cluster.ServerConfig{Cluster: cluster.Config{Targets: []string{a.Addr()}}})
	if code, ct, _ := fetchAdmin(t, r.admin+"/"); code != http.StatusOK || !strings.HasPrefix(ct, "text/html") {
		t.Errorf("GET / = %d %q, want 200 text/html", code, ct)
	}
	client := dial(t, r.addr)
	for range 4 {
		if _, err := client.EmptyCall(t.Context(), &testgrpc.Empty{}, grpc.WaitForReady(true)); err != nil {
			t.Fatal(err)
		}
	}
	var doc statusDoc
	ctx := testkit.Context(t, 10*time.Second)
	testkit.WaitFor(ctx, t, "4 successes in /status.json", func() bool {
		doc = getStatus(t, r.admin)
		return len(doc.Clusters) == 1 && len(doc.Clusters[0].Backends) == 1 && doc.Clusters[0].Backends[0].Successes == 4
	})
	b := doc.Clusters[0].Backends[0]
	if doc.Metrics || doc.Clusters[0].Name != "default" || b.Addr != a.Addr() || b.Started != 0 || b.Duration != nil {
		t.Errorf("status.json = %+v, want metrics off, cluster default, backend %s with no counters", doc, a.Addr())
	}
}

// TestStatusFileClusters checks /status.json lists each cluster of a
// configuration file with its own counters.
func TestStatusFileClusters(t *testing.T) {
	a, b, path := twoClusterFile(t)
	r := runFile(t, path, true)
	cc := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)
	for range 3 {
		if _, err := backendOf(ctx, cc, "x-tenant", "gold"); err != nil {
			t.Fatal(err)
		}
	}
	for range 2 {
		if _, err := backendOf(ctx, cc); err != nil {
			t.Fatal(err)
		}
	}
	want := map[string]float64{"gold/" + a.Addr(): 3, "rest/" + b.Addr(): 2}
	var got map[string]float64
	testkit.WaitFor(ctx, t, "per-cluster counts in /status.json", func() bool {
		got = map[string]float64{}
		for _, c := range getStatus(t, r.admin).Clusters {
			for _, be := range c.Backends {
				got[c.Name+"/"+be.Addr] = be.Finished["OK"]
			}
		}
		return fmt.Sprint(got) == fmt.Sprint(want)
	})
}
