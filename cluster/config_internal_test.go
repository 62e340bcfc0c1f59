package cluster

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// TestRestartOnlyAndInheritance checks which changes a reload applies and
// what a cluster inherits: backend_tls and the proxy's retry policy are
// the clusters' (reloadable, inherited unless a cluster has its own), the
// other proxy limits need a restart.
func TestRestartOnlyAndInheritance(t *testing.T) {
	t.Parallel()
	const base = `
backend_tls: {ca: /a.crt}
proxy: {retry_on: [a.S], max_retries: 3, retry_budget: 7, retry_budget_ratio: 0.5, max_streams: 10}
clusters:
  - {name: inherits, targets: [127.0.0.1:1]}
  - name: own
    targets: [127.0.0.1:2]
    backend_tls: {ca: /own.crt, server_name: own}
    retry: {retry_on: [], max_retries: -1}
routes: [{cluster: inherits}]
`
	parse := func(data string) *File {
		t.Helper()
		f, err := ParseFile("f.yaml", []byte(data))
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	f := parse(base)
	if got, want := f.retryOf(f.Clusters[0]), (Retry{On: []string{"a.S"}, MaxRetries: 3, Budget: 7, BudgetRatio: 0.5}); !cmp.Equal(got, want) {
		t.Errorf("inherited retry policy: %s", cmp.Diff(want, got))
	}
	if got, want := f.retryOf(f.Clusters[1]), (Retry{On: []string{}, MaxRetries: -1, Budget: 7, BudgetRatio: 0.5}); !cmp.Equal(got, want) {
		t.Errorf("own retry policy: %s", cmp.Diff(want, got))
	}
	if got := f.backendTLSOf(f.Clusters[0]); got == nil || got.CA != "/a.crt" {
		t.Errorf("inherited backend_tls = %+v, want the file's", got)
	}
	if got := f.backendTLSOf(f.Clusters[1]); got == nil || got.CA != "/own.crt" || got.ServerName != "own" {
		t.Errorf("own backend_tls = %+v, want its own", got)
	}
	for _, tc := range []struct {
		name    string
		from    string
		to      string
		restart []string
	}{
		{"backend_tls", "ca: /a.crt", "ca: /b.crt", nil},
		{"proxy retry policy", "retry_on: [a.S], max_retries: 3", "retry_on: [b.S], max_retries: 1", nil},
		{"proxy limit", "max_streams: 10", "max_streams: 20", []string{"proxy"}},
	} {
		g := parse(replaceOnce(t, base, tc.from, tc.to))
		if got := f.restartOnly(g); !slices.Equal(got, tc.restart) {
			t.Errorf("%s: restartOnly = %q, want %q", tc.name, got, tc.restart)
		}
	}
}

// TestRetryBudgetZeroFromFile: a retry budget of 0, as the file's
// proxy.retry_budget or a cluster's retry.budget, is a bucket of no
// tokens (proxy.Config's -1: no UNAVAILABLE answer is retried), as
// max_retries: 0 is no retries. It meant the default (10 tokens), and a
// cluster's budget: 0 took the proxy's. Absent, the default still holds
// (0) or the proxy's is inherited.
func TestRetryBudgetZeroFromFile(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name        string
		proxy       string // proxy's fields
		retry       string // the cluster's retry fields
		wantProxy   int    // proxy.Config.RetryBudget
		wantCluster int    // the cluster's Retry.Budget
	}{
		{name: "absent", wantProxy: 0, wantCluster: 0},
		{name: "proxy 0", proxy: "retry_budget: 0", wantProxy: -1, wantCluster: -1},
		{name: "proxy 5", proxy: "retry_budget: 5", wantProxy: 5, wantCluster: 5},
		{name: "cluster 0 over proxy 5", proxy: "retry_budget: 5", retry: "budget: 0", wantProxy: 5, wantCluster: -1},
		{name: "cluster 3 over proxy 0", proxy: "retry_budget: 0", retry: "budget: 3", wantProxy: -1, wantCluster: 3},
		{name: "cluster absent over proxy 0", proxy: "retry_budget: 0", retry: "max_retries: 1", wantProxy: -1, wantCluster: -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			data := "proxy: {" + tc.proxy + "}\nclusters:\n  - name: a\n    targets: [127.0.0.1:1]\n"
			if tc.retry != "" {
				data += "    retry: {" + tc.retry + "}\n"
			}
			data += "routes: [{cluster: a}]\n"
			f, err := ParseFile("f.yaml", []byte(data))
			if err != nil {
				t.Fatal(err)
			}
			if got := f.proxyConfig().RetryBudget; got != tc.wantProxy {
				t.Errorf("proxy.Config.RetryBudget = %d, want %d", got, tc.wantProxy)
			}
			if got := f.retryOf(f.Clusters[0]).Budget; got != tc.wantCluster {
				t.Errorf("cluster's Retry.Budget = %d, want %d", got, tc.wantCluster)
			}
		})
	}
}

func replaceOnce(t *testing.T, s, old, new string) string {
	t.Helper()
	if !strings.Contains(s, old) {
		t.Fatalf("%q not found", old)
	}
	return strings.Replace(s, old, new, 1)
}

// TestProxyTimeoutsFromFile checks that the file's proxy timeouts reach
// the data plane's settings, request_idle_timeout among them.
func TestProxyTimeoutsFromFile(t *testing.T) {
	t.Parallel()
	f, err := ParseFile("t.yaml", []byte(`
proxy: {idle_timeout: 7s, request_idle_timeout: 3s, write_timeout: 9s}
clusters:
  - name: a
    targets: [127.0.0.1:1]
routes: [{cluster: a}]
`))
	if err != nil {
		t.Fatal(err)
	}
	p := f.proxyConfig()
	if p.IdleTimeout != 7*time.Second || p.RequestIdleTimeout != 3*time.Second || p.WriteTimeout != 9*time.Second {
		t.Errorf("idle %v, request idle %v, write %v; want 7s, 3s, 9s", p.IdleTimeout, p.RequestIdleTimeout, p.WriteTimeout)
	}
}
