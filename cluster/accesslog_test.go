package cluster_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// accessLine is one JSON access-log line.
type accessLine struct {
	Msg         string `json:"msg"`
	Method      string `json:"method"`
	Cluster     string `json:"cluster"`
	Backend     string `json:"backend"`
	Code        string `json:"code"`
	Duration    int64  `json:"duration"` // nanoseconds
	BytesIn     int64  `json:"bytes_in"`
	BytesOut    int64  `json:"bytes_out"`
	Retries     int    `json:"retries"`
	Client      string `json:"client"`
	Message     string `json:"message"`
	ProxyStatus bool   `json:"proxy_status"`
}

// readAccessLog parses every line of the JSON access log at path.
func readAccessLog(t *testing.T, path string) []accessLine {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []accessLine
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		var l accessLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			t.Fatalf("access-log line %q: %v", sc.Text(), err)
		}
		out = append(out, l)
	}
	return out
}

// TestAccessLogAndCallMetrics runs calls through the wiring with a JSON
// access log in a file and metrics on: one line per call, naming the
// backend that answered (as its own x-backend says), the status, the bytes
// and the retries; the byte, retry and connection metrics agree.
func TestAccessLogAndCallMetrics(t *testing.T) {
	names := map[string]string{}
	var targets []string
	for i, name := range []string{"bad", "b", "c"} {
		cfg := testserver.Config{Name: name, Logger: quiet}
		if i == 0 {
			cfg.ErrorRate = 1 // UNAVAILABLE, retried on another backend
		}
		ts, err := testserver.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if err := ts.Start("127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(ts.Stop)
		names[ts.Addr()] = name
		targets = append(targets, ts.Addr())
	}
	path := filepath.Join(t.TempDir(), "access.log")
	al, err := cluster.OpenAccessLog(path, "json", os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { al.Close() })
	r := runServer(t, cluster.ServerConfig{
		Metrics:   prometheus.NewRegistry(),
		AccessLog: al,
		Cluster: cluster.Config{Name: "echo", Targets: targets,
			Director: director.Config{EjectAfter: -1}},
		Proxy: proxy.Config{RetryOn: []string{"grpc.testing.TestService/UnaryCall"}},
	})
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)

	const calls, failing = 30, 3
	req := &testgrpc.SimpleRequest{Payload: &testgrpc.Payload{Body: make([]byte, 100)}, ResponseSize: 200}
	var want []string // x-backend of each call, "" for the failing ones
	for i := range calls {
		cctx := ctx
		if i%10 == 0 {
			cctx = metadata.AppendToOutgoingContext(ctx, testserver.MetadataFailCode, "5")
		}
		var hdr metadata.MD
		_, err := client.UnaryCall(cctx, req, grpc.Header(&hdr), grpc.WaitForReady(true))
		if i%10 == 0 {
			if status.Code(err) != codes.NotFound {
				t.Fatalf("call %d: %v, want NOT_FOUND", i, err)
			}
			want = append(want, "")
			continue
		}
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		want = append(want, testserver.BackendFromHeader(hdr))
	}

	var lines []accessLine
	testkit.WaitFor(ctx, t, "an access-log line per call", func() bool {
		lines = readAccessLog(t, path)
		return len(lines) >= calls
	})
	if len(lines) != calls {
		t.Fatalf("%d access-log lines, want %d", len(lines), calls)
	}
	bytesIn, bytesOut := map[string]float64{}, map[string]float64{}
	retries := 0
	for i, l := range lines {
		if l.Msg != "call" || l.Method != "/grpc.testing.TestService/UnaryCall" || l.Cluster != "echo" || l.Client == "" || l.Duration <= 0 {
			t.Errorf("line %d: %+v", i, l)
		}
		bytesIn[l.Backend] += float64(l.BytesIn)
		bytesOut[l.Backend] += float64(l.BytesOut)
		retries += l.Retries
		if want[i] == "" {
			if l.Code != "NotFound" || l.ProxyStatus {
				t.Errorf("line %d: code %s (proxy %v), want the backend's NotFound", i, l.Code, l.ProxyStatus)
			}
			continue
		}
		if l.Code != "OK" || names[l.Backend] != want[i] {
			t.Errorf("line %d: %s from %s (%s), want OK from %s", i, l.Code, l.Backend, names[l.Backend], want[i])
		}
		if l.BytesIn < 100 || l.BytesOut < 200 {
			t.Errorf("line %d: bytes in %d, out %d, want at least the payloads 100 and 200", i, l.BytesIn, l.BytesOut)
		}
	}
	if retries == 0 {
		t.Error("no line shows a retry; round robin must have sent some calls to the failing backend first")
	}

	for _, m := range []struct {
		name string
		want map[string]float64
	}{
		{"streamlb_request_bytes_total", bytesIn},
		{"streamlb_response_bytes_total", bytesOut},
	} {
		got := scrape(t, r.admin, m.name)
		for backend, v := range m.want {
			if got["backend="+backend] != v {
				t.Errorf("%s{backend=%s} = %v, want %v (the access log's sum)", m.name, backend, got["backend="+backend], v)
			}
		}
	}
	if got := scrape(t, r.admin, "streamlb_retries_total"); got["outcome=ok"] != float64(retries) {
		t.Errorf("streamlb_retries_total = %v, want outcome=ok %d", got, retries)
	}
	if got := scrape(t, r.admin, "streamlb_client_connections"); got[""] != 1 {
		t.Errorf("streamlb_client_connections = %v, want 1", got)
	}
	if got := scrape(t, r.admin, "streamlb_client_connections_parked"); len(got) != 1 || got[""] > 1 {
		// 0, or 1 if the connection was quiet long enough to park.
		t.Errorf("streamlb_client_connections_parked = %v, want one value, 0 or 1", got)
	}
	if got := scrape(t, r.admin, "streamlb_client_connections_accepted_total"); got[""] != 1 {
		t.Errorf("streamlb_client_connections_accepted_total = %v, want 1", got)
	}
	if got := scrape(t, r.admin, "streamlb_backend_connections"); got[""] != 3 {
		t.Errorf("streamlb_backend_connections = %v, want 3", got)
	}
}

// openJSONLog opens a JSON access log in a temporary directory, closed at
// cleanup, and returns it with its path.
func openJSONLog(t *testing.T) (*cluster.AccessLog, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "access.log")
	al, err := cluster.OpenAccessLog(path, "json", os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { al.Close() })
	return al, path
}

// jsonAccessLog gives cfg an access log of openJSONLog's and returns its
// path.
func jsonAccessLog(t *testing.T, cfg *cluster.ServerConfig) string {
	t.Helper()
	al, path := openJSONLog(t)
	cfg.AccessLog = al
	return path
}
