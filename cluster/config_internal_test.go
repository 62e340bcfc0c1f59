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
