package cluster_test

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/streamlb/streamlb/cluster"
)

const goodConfig = `
listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
drain_timeout: 5s
proxy:
  max_streams: 1000
  retry_on: [/grpc.testing.TestService/]
clusters:
  - name: users
    targets: [127.0.0.1:9001, 127.0.0.1:9002]
    policy: least_request
    slow_start: 10s
    health_check: {interval: 5s, timeout: 1s}
    ejection: {after: 5, base: 30s, max_percent: 50}
  - name: canary
    targets: [127.0.0.1:9003]
    dns_refresh: 10s
routes:
  - name: gold
    match:
      service: grpc.testing.TestService
      headers: [{name: X-Tenant, exact: gold}]
    cluster: canary
    rate_limit: {rate: 100, burst: 20}
  - match: {method_prefix: /grpc.testing.TestService/Unary}
    cluster: canary
  - cluster: users
`

func TestParseFileGood(t *testing.T) {
	t.Parallel()
	f, err := cluster.ParseFile("good.yaml", []byte(goodConfig))
	if err != nil {
		t.Fatalf("ParseFile: %v", err)
	}
	if len(f.Clusters) != 2 || len(f.Routes) != 3 || f.Listen != "127.0.0.1:0" {
		t.Errorf("got %d clusters, %d routes, listen %q; want 2, 3, 127.0.0.1:0", len(f.Clusters), len(f.Routes), f.Listen)
	}
	if _, err := cluster.NewServer(f.ServerConfig()); err != nil {
		t.Errorf("NewServer(ServerConfig()) = %v", err)
	}
}

// TestParseFileRouteSplitAndTimeout: a route with weighted clusters and
// a timeout parses, and builds with either engine.
func TestParseFileRouteSplitAndTimeout(t *testing.T) {
	t.Parallel()
	for _, engine := range cluster.Engines() {
		data := strings.Replace(goodConfig, "  - cluster: users", "  - clusters: [{name: users, weight: 9}, {name: canary, weight: 1}]\n    timeout: 2s", 1)
		f, err := cluster.ParseFile("good.yaml", []byte("engine: "+engine+"\n"+data))
		if err != nil {
			t.Fatalf("%s: ParseFile: %v", engine, err)
		}
		r := f.Routes[2]
		if len(r.Clusters) != 2 || r.Clusters[1].Name != "canary" || r.Timeout != 2*time.Second {
			t.Errorf("%s: route parsed as %+v, want two weighted clusters and timeout 2s", engine, r)
		}
		if _, err := cluster.NewServer(f.ServerConfig()); err != nil {
			t.Errorf("%s: NewServer(ServerConfig()) = %v", engine, err)
		}
	}
}

// TestParseFileErrors checks that each error names the line and the field.
func TestParseFileErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		replace [2]string // in goodConfig
		want    []string  // substrings of the error
	}{
		{name: "unknown top-level field", replace: [2]string{"drain_timeout: 5s", "drain_timeout: 5s\nlisten_addr: x"}, want: []string{"line 5:", "field listen_addr not found"}},
		{name: "unknown cluster field", replace: [2]string{"    slow_start: 10s", "    slowstart: 10s"}, want: []string{"line 12:", "field slowstart not found"}},
		{name: "bad duration", replace: [2]string{"dns_refresh: 10s", "dns_refresh: often"}, want: []string{"line 17:", "clusters[1].dns_refresh", "duration"}},
		{name: "bad int", replace: [2]string{"max_streams: 1000", "max_streams: many"}, want: []string{"line 6:", "proxy.max_streams"}},
		{name: "unknown cluster in route", replace: [2]string{"  - cluster: users", "  - cluster: user"}, want: []string{"line 27:", "routes[2].cluster", `unknown cluster "user"`}},
		{name: "unknown policy", replace: [2]string{"policy: least_request", "policy: fastest"}, want: []string{"line 11:", "clusters[0].policy", "fastest"}},
		{name: "bad target", replace: [2]string{"[127.0.0.1:9003]", "[\"dns:///\"]"}, want: []string{"line 16:", "clusters[1].targets"}},
		{name: "duplicate cluster", replace: [2]string{"name: canary", "name: users"}, want: []string{"line 15:", "clusters[1].name", "twice"}},
		{name: "two header matchers", replace: [2]string{"exact: gold}", "exact: gold, present: true}"}, want: []string{"line 22:", "routes[0].match.headers[0]", "exactly one"}},
		{name: "zero rate", replace: [2]string{"rate: 100", "rate: 0"}, want: []string{"line 24:", "routes[0].rate_limit.rate"}},
		{name: "service with method", replace: [2]string{"service: grpc.testing.TestService", "service: grpc.testing.TestService/EmptyCall"}, want: []string{"line 21:", "routes[0].match.service"}},
		{name: "bad proxy limit", replace: [2]string{"max_streams: 1000", "max_streams: -1"}, want: []string{"line 5:", "proxy:", "MaxStreams"}},
		{name: "negative backend_pending_timeout", replace: [2]string{"  max_streams: 1000", "  max_streams: 1000\n  backend_pending_timeout: -1s"}, want: []string{"line 7:", "proxy.backend_pending_timeout", "must not be negative"}},
		{name: "negative connect_timeout", replace: [2]string{"  max_streams: 1000", "  max_streams: 1000\n  connect_timeout: -1s"}, want: []string{"line 7:", "proxy.connect_timeout", "must not be negative"}},
		{name: "negative handshake_timeout", replace: [2]string{"  max_streams: 1000", "  max_streams: 1000\n  handshake_timeout: -1s"}, want: []string{"line 7:", "proxy.handshake_timeout", "must not be negative"}},
		{name: "negative backend_keepalive_timeout", replace: [2]string{"  max_streams: 1000", "  max_streams: 1000\n  backend_keepalive_timeout: -1s"}, want: []string{"line 7:", "proxy.backend_keepalive_timeout", "must not be negative"}},
		{name: "negative retry_budget", replace: [2]string{"  max_streams: 1000", "  max_streams: 1000\n  retry_budget: -1"}, want: []string{"line 7:", "proxy.retry_budget", "must not be negative"}},
		{name: "negative cluster retry budget", replace: [2]string{"    dns_refresh: 10s", "    dns_refresh: 10s\n    retry: {budget: -1}"}, want: []string{"line 18:", "clusters[1].retry.budget", "must not be negative"}},
		{name: "etcd user without password_env", replace: [2]string{"    dns_refresh: 10s", "    dns_refresh: 10s\n    etcd: {username: lb}"}, want: []string{"line 18:", "clusters[1].etcd.password_env", "required with username"}},
		{name: "etcd password_env unset", replace: [2]string{"    dns_refresh: 10s", "    dns_refresh: 10s\n    etcd: {username: lb, password_env: STREAMLB_TEST_SURELY_UNSET}"}, want: []string{"line 18:", "clusters[1].etcd.password_env", "STREAMLB_TEST_SURELY_UNSET is not set"}},
		{name: "zookeeper cert without key", replace: [2]string{"    dns_refresh: 10s", "    dns_refresh: 10s\n    zookeeper: {cert: a.pem}"}, want: []string{"line 18:", "clusters[1].zookeeper", "cert and key go together"}},
		{name: "etcd CA missing", replace: [2]string{"[127.0.0.1:9003]", "[\"etcd://127.0.0.1:1/svc\"]\n    etcd: {ca: /nonexistent/ca.pem}"}, want: []string{"clusters[1]", "/nonexistent/ca.pem"}},
		{name: "cluster and clusters", replace: [2]string{"  - cluster: users", "  - cluster: users\n    clusters: [{name: users, weight: 1}]"}, want: []string{"line 28:", "routes[2].clusters", "not both"}},
		{name: "neither cluster nor clusters", replace: [2]string{"  - cluster: users", "  - name: last"}, want: []string{"line 27:", "routes[2].cluster", "required"}},
		{name: "empty clusters", replace: [2]string{"  - cluster: users", "  - clusters: []"}, want: []string{"line 27:", "routes[2].clusters", "at least one"}},
		{name: "zero total weight", replace: [2]string{"  - cluster: users", "  - clusters: [{name: users, weight: 0}, {name: canary, weight: 0}]"}, want: []string{"line 27:", "routes[2].clusters", "add up to 0"}},
		{name: "unknown weighted cluster", replace: [2]string{"  - cluster: users", "  - clusters: [{name: users, weight: 9}, {name: canry, weight: 1}]"}, want: []string{"line 27:", "routes[2].clusters[1].name", `unknown cluster "canry"`}},
		{name: "weighted cluster twice", replace: [2]string{"  - cluster: users", "  - clusters: [{name: users, weight: 9}, {name: users, weight: 1}]"}, want: []string{"routes[2].clusters[1].name", `"users" is listed twice`}},
		{name: "negative weight", replace: [2]string{"  - cluster: users", "  - clusters: [{name: users, weight: -1}, {name: canary, weight: 1}]"}, want: []string{"line 27:", "routes[2].clusters[0].weight", "negative"}},
		{name: "weight left out", replace: [2]string{"  - cluster: users", "  - clusters:\n      - {name: users, weight: 1}\n      - {name: canary}"}, want: []string{"line 29:", "routes[2].clusters[1].weight", "required"}},
		{name: "weights over the total", replace: [2]string{"  - cluster: users", "  - clusters: [{name: users, weight: 2147483647}, {name: canary, weight: 1}]"}, want: []string{"routes[2].clusters[1].weight", "at most 2147483647"}},
		{name: "fractional weight", replace: [2]string{"  - cluster: users", "  - clusters: [{name: users, weight: 0.5}]"}, want: []string{"line 27:", "routes[2].clusters[0].weight"}},
		{name: "negative timeout", replace: [2]string{"  - cluster: users", "  - cluster: users\n    timeout: -1s"}, want: []string{"line 28:", "routes[2].timeout", "negative"}},
		{name: "bad timeout", replace: [2]string{"  - cluster: users", "  - cluster: users\n    timeout: soon"}, want: []string{"line 28:", "routes[2].timeout", "duration"}},
		{name: "bad timeout in flow style", replace: [2]string{"  - cluster: users", "  - {cluster: users, timeout: soon}"}, want: []string{"line 27:", "routes[2].timeout", "duration"}},
		// yaml.v3 quotes a value of more than 10 bytes cut to its first
		// 7 and "...": the field is still the one whose value starts so,
		// not the line's first (routes[2].cluster, routes[2].clusters[0].name).
		{name: "long bad timeout in flow style", replace: [2]string{"  - cluster: users", "  - {cluster: users, timeout: 3000000000h}"}, want: []string{"line 27:", "routes[2].timeout:", "duration"}},
		{name: "weight over int64 in flow style", replace: [2]string{"  - cluster: users", "  - clusters: [{name: users, weight: 9223372036854775808}]"}, want: []string{"line 27:", "routes[2].clusters[0].weight:", "cannot unmarshal"}},
		{name: "bad value in flow style", replace: [2]string{"  - cluster: users", "  - {cluster: users, rate_limit: {rate: fast}}"}, want: []string{"line 27:", "routes[2].rate_limit.rate", "cannot unmarshal"}},
		{name: "syntax", replace: [2]string{"listen: 127.0.0.1:0", "listen: [127.0.0.1:0"}, want: []string{"line"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			data := strings.Replace(goodConfig, tc.replace[0], tc.replace[1], 1)
			if data == goodConfig {
				t.Fatalf("replacement %q not found", tc.replace[0])
			}
			_, err := cluster.ParseFile("f.yaml", []byte(data))
			if err == nil {
				t.Fatal("ParseFile = nil, want an error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("ParseFile error = %q, want it to contain %q", err, w)
				}
			}
		})
	}
}

func FuzzParseFile(f *testing.F) {
	f.Add([]byte(goodConfig))
	f.Add([]byte("clusters: [{name: a, targets: [1.2.3.4:5]}]\nroutes: [{cluster: a}]"))
	f.Add([]byte("clusters: [{name: a, targets: [1.2.3.4:5], backend_tls: {ca: x}, retry: {retry_on: [a.B/C], max_retries: -1, budget: 3, budget_ratio: 0.2}}]\nroutes: [{cluster: a}]"))
	if data, err := os.ReadFile("../examples/streamlb.yaml"); err == nil {
		f.Add(data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cluster.ParseFile("fuzz.yaml", data) // must not panic
	})
}

// TestREADMEExample checks that the README's configuration example parses.
func TestREADMEExample(t *testing.T) {
	t.Parallel()
	data, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(data), "### Configuration file")
	_, rest, ok2 := strings.Cut(rest, "```yaml\n")
	example, _, ok3 := strings.Cut(rest, "```")
	if !ok || !ok2 || !ok3 {
		t.Fatal("README has no configuration example")
	}
	if _, err := cluster.ParseFile("README.md", []byte(example)); err != nil {
		t.Errorf("README example: %v", err)
	}
}

// TestExampleFile checks that examples/streamlb.yaml parses and that its
// clusters and routes build (its TLS files, which exist where it is
// deployed, are left out).
func TestExampleFile(t *testing.T) {
	t.Parallel()
	data, err := os.ReadFile("../examples/streamlb.yaml")
	if err != nil {
		t.Fatal(err)
	}
	f, err := cluster.ParseFile("examples/streamlb.yaml", data)
	if err != nil {
		t.Fatalf("examples/streamlb.yaml: %v", err)
	}
	if len(f.Clusters) != 3 || len(f.Routes) != 3 {
		t.Errorf("got %d clusters and %d routes, want 3 and 3", len(f.Clusters), len(f.Routes))
	}
	// LoadFile reads the backend TLS files, and names the setting of the
	// first that does not load.
	if _, err := cluster.LoadFile("../examples/streamlb.yaml"); err == nil || !strings.Contains(err.Error(), "clusters[0].backend_tls") {
		t.Errorf("LoadFile of the example without its TLS files = %v, want an error naming clusters[0].backend_tls", err)
	}
}
