package cluster_test

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var quiet = slog.New(slog.DiscardHandler)

// startBackend runs a testserver on addr ("127.0.0.1:0" for any port),
// stopped at cleanup.
func startBackend(t testing.TB, name, addr string) *testserver.Server {
	t.Helper()
	return startBackendConfig(t, testserver.Config{Name: name}, addr)
}

// startBackendConfig is startBackend for a testserver configured by cfg
// (its Logger quiet if nil).
func startBackendConfig(t testing.TB, cfg testserver.Config, addr string) *testserver.Server {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = quiet
	}
	ts, err := testserver.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := ts.Start(addr); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ts.Stop)
	return ts
}

// running is a Server under Run, with its addresses.
type running struct {
	srv   *cluster.Server
	addr  string // the proxy's
	admin string // the admin endpoints' base URL
}

// runServer runs a Server for cfg on loopback until cleanup, and checks
// that Run then returns nil. A nil cfg.Logger means no logs.
func runServer(t testing.TB, cfg cluster.ServerConfig) running {
	t.Helper()
	r, ran, cancel := runServerStop(t, cfg)
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-ran:
			if err != nil {
				t.Errorf("Run() = %v, want nil", err)
			}
		case <-time.After(20 * time.Second):
			t.Error("Run did not return within 20s of cancel")
		}
	})
	return r
}

// get returns the status code and body of an admin endpoint.
func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b))
}

// waitStatus polls url until it answers want, for up to 10s.
func waitStatus(t *testing.T, url string, want int) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		code, body := get(t, url)
		if code == want {
			return body
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s = %d %q, want %d within 10s", url, code, body, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func dial(t testing.TB, addr string) testgrpc.TestServiceClient {
	t.Helper()
	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return testgrpc.NewTestServiceClient(cc)
}

// TestServerBalancesEveryCall runs the wiring end to end: one client
// connection, calls spread over three backends.
func TestServerBalancesEveryCall(t *testing.T) {
	var targets []string
	var backends []*testserver.Server
	for _, name := range []string{"a", "b", "c"} {
		ts := startBackend(t, name, "127.0.0.1:0")
		backends = append(backends, ts)
		targets = append(targets, ts.Addr())
	}
	for _, engine := range cluster.Engines() {
		t.Run(engine, func(t *testing.T) {
			r := runServer(t, cluster.ServerConfig{Engine: engine, Cluster: cluster.Config{Targets: targets}})
			client := dial(t, r.addr)
			got := make(map[string]int)
			for range 30 {
				var hdr metadata.MD
				if _, err := client.EmptyCall(t.Context(), &testgrpc.Empty{}, grpc.Header(&hdr)); err != nil {
					t.Fatalf("EmptyCall: %v", err)
				}
				got[testserver.BackendFromHeader(hdr)]++
			}
			for _, b := range backends {
				if got[b.Name()] != 10 {
					t.Errorf("backend %s got %d of 30 calls, want 10 (round robin)", b.Name(), got[b.Name()])
				}
			}
			if code, body := get(t, r.admin+"/readyz"); code != http.StatusOK || body != "ready" {
				t.Errorf("/readyz = %d %q, want 200 ready", code, body)
			}
		})
	}
}

// TestReadyzFollowsHealth checks that /readyz is 503 while no backend would
// take a stream (every backend failing its health checks, whether it says
// NOT_SERVING or refuses connections) and 200 again once one recovers.
func TestReadyzFollowsHealth(t *testing.T) {
	hc := director.Config{
		HealthCheckInterval: 50 * time.Millisecond,
		HealthCheckTimeout:  500 * time.Millisecond,
		HealthCheckService:  testserver.ServiceName,
	}
	t.Run("not serving", func(t *testing.T) {
		ts := startBackend(t, "a", "127.0.0.1:0")
		r := runServer(t, cluster.ServerConfig{Cluster: cluster.Config{Targets: []string{ts.Addr()}, Director: hc}})
		waitStatus(t, r.admin+"/readyz", http.StatusOK)
		ts.SetServing(false)
		if body := waitStatus(t, r.admin+"/readyz", http.StatusServiceUnavailable); body != "no usable backend" {
			t.Errorf("/readyz body = %q, want the reason", body)
		}
		ts.SetServing(true)
		waitStatus(t, r.admin+"/readyz", http.StatusOK)
	})
	t.Run("refused, then back", func(t *testing.T) {
		addr := testkit.DeadAddr(t)
		r := runServer(t, cluster.ServerConfig{Cluster: cluster.Config{Targets: []string{addr}, Director: hc}})
		waitStatus(t, r.admin+"/readyz", http.StatusServiceUnavailable)
		// /backends says why, in snake_case as the loadtest report. The
		// admin endpoints answer from before the first set is resolved
		// (/readyz is 503 then too), so wait for the backend to be listed.
		var body string
		var bs []map[string]any
		testkit.WaitFor(testkit.Context(t, 10*time.Second), t, "/backends to list the backend", func() bool {
			_, body = get(t, r.admin+"/backends")
			bs = nil
			return json.Unmarshal([]byte(body), &bs) == nil && len(bs) == 1 && bs[0]["reason"] != nil
		})
		if bs[0]["addr"] != addr || bs[0]["healthy"] != false || !strings.Contains(fmt.Sprint(bs[0]["reason"]), "health check failed") {
			t.Errorf("/backends = %s, want %s unhealthy with the failing check as its reason", body, addr)
		}
		startBackend(t, "a", addr) // the port was free a moment ago
		waitStatus(t, r.admin+"/readyz", http.StatusOK)
		if _, err := dial(t, r.addr).EmptyCall(t.Context(), &testgrpc.Empty{}); err != nil {
			t.Errorf("EmptyCall after recovery: %v", err)
		}
	})
}

func TestNewServerErrors(t *testing.T) {
	tests := []struct {
		name string
		cfg  cluster.ServerConfig
		want string
	}{
		{name: "no targets", cfg: cluster.ServerConfig{}, want: "no backend target"},
		{name: "bad target", cfg: cluster.ServerConfig{Cluster: cluster.Config{Targets: []string{"no-port"}}}, want: "backend targets"},
		{name: "bad policy", cfg: cluster.ServerConfig{Cluster: cluster.Config{Targets: []string{"a:1"}, Director: director.Config{Policy: "nope"}}}, want: "unknown policy"},
		{name: "bad engine", cfg: cluster.ServerConfig{Engine: "nope", Cluster: cluster.Config{Targets: []string{"a:1"}}}, want: "unknown engine"},
		{name: "negative drain", cfg: cluster.ServerConfig{DrainTimeout: -1, Cluster: cluster.Config{Targets: []string{"a:1"}}}, want: "must not be negative"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := cluster.NewServer(tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("NewServer() error = %v, want one containing %q", err, tc.want)
			}
		})
	}
}

// TestWarnings checks the startup warnings for settings that are accepted
// but likely do not do what was meant.
func TestWarnings(t *testing.T) {
	tests := []struct {
		name    string
		cfg     cluster.Config
		want    []string
		wantNot []string
	}{
		{name: "weight under round robin", cfg: cluster.Config{Targets: []string{"10.0.0.1:80;weight=5", "10.0.0.2:80"}},
			want: []string{"target weight ignored", `target="10.0.0.1:80;weight=5"`}},
		{name: "weight under weighted round robin", cfg: cluster.Config{Targets: []string{"10.0.0.1:80;weight=5"}, Director: director.Config{Policy: director.WeightedRoundRobin}},
			wantNot: []string{"weight ignored"}},
		{name: "host name", cfg: cluster.Config{Targets: []string{"echo.default.svc.cluster.local:50051"}},
			want: []string{"target is a host name", "instead=dns:///echo.default.svc.cluster.local:50051"}},
		{name: "IP literals and localhost", cfg: cluster.Config{Targets: []string{"10.0.0.1:80", "[fd00::1]:80", "localhost:80"}},
			wantNot: []string{"WARN"}},
		{name: "DNS target", cfg: cluster.Config{Targets: []string{"dns:///echo.default.svc.cluster.local:50051"}},
			wantNot: []string{"WARN"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var logs strings.Builder
			tc.cfg.Logger = slog.New(slog.NewTextHandler(&logs, nil))
			if _, err := cluster.New(tc.cfg); err != nil {
				t.Fatal(err)
			}
			for _, w := range tc.want {
				if !strings.Contains(logs.String(), w) {
					t.Errorf("logs lack %q:\n%s", w, logs.String())
				}
			}
			for _, w := range tc.wantNot {
				if strings.Contains(logs.String(), w) {
					t.Errorf("logs have %q:\n%s", w, logs.String())
				}
			}
		})
	}
}
