package cluster_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// TestReadyzPerCluster runs two clusters, one of them with no usable
// backend: the aggregate /readyz is ready (some routed cluster can take
// calls), /readyz?cluster=NAME answers for each cluster alone, and a name
// no route uses is 404.
func TestReadyzPerCluster(t *testing.T) {
	good := startBackend(t, "good", "127.0.0.1:0")
	dead := testkit.DeadAddr(t)
	conf := `
clusters:
  - name: good
    targets: [%s]
  - name: dead
    targets: [%s]
    health_check: {interval: 50ms, timeout: 500ms, service: %s}
  - name: unrouted
    targets: [%s]
routes:
  - {match: {service: grpc.testing.ReconnectService}, cluster: dead}
  - {cluster: good}
`
	path := writeConfig(t, t.TempDir(), fmt.Sprintf(conf, good.Addr(), dead, testserver.ServiceName, good.Addr()))
	r := runFile(t, path, false)
	// Wait for the first health check to fail (a backend counts as
	// healthy once resolved, until its first check says otherwise).
	testkit.WaitFor(testkit.Context(t, 10*time.Second), t, "the dead backend's check to fail", func() bool {
		_, body := get(t, r.admin+"/backends")
		var bs map[string][]map[string]any
		return json.Unmarshal([]byte(body), &bs) == nil && len(bs["dead"]) == 1 && bs["dead"][0]["healthy"] == false &&
			len(bs["good"]) == 1
	})
	for _, tc := range []struct {
		query string
		code  int
		body  string
	}{
		{"", http.StatusOK, "ready"},
		{"?cluster=good", http.StatusOK, "ready"},
		{"?cluster=dead", http.StatusServiceUnavailable, "cluster dead: no usable backend"},
		{"?cluster=good&cluster=dead", http.StatusServiceUnavailable, "cluster dead: no usable backend"},
		{"?cluster=unrouted", http.StatusNotFound, `cluster "unrouted": no route uses it`},
		{"?cluster=nope", http.StatusNotFound, `cluster "nope": no route uses it`},
	} {
		if code, body := get(t, r.admin+"/readyz"+tc.query); code != tc.code || body != tc.body {
			t.Errorf("/readyz%s = %d %q, want %d %q", tc.query, code, body, tc.code, tc.body)
		}
	}
	// A server of one cluster knows it by its name.
	one := runServer(t, cluster.ServerConfig{Cluster: cluster.Config{Targets: []string{good.Addr()}}})
	waitStatus(t, one.admin+"/readyz?cluster=default", http.StatusOK)
	if code, body := get(t, one.admin+"/readyz?cluster=other"); code != http.StatusNotFound {
		t.Errorf("/readyz?cluster=other of a one-cluster server = %d %q, want 404", code, body)
	}
}

// TestReloadFollowsConfigMapSwap lays the configuration file out as the
// kubelet mounts a ConfigMap (streamlb.yaml -> ..data/streamlb.yaml, ..data
// -> a timestamped directory) and updates it as the kubelet does: a new
// directory, ..data swapped to it by an atomic rename, the old directory
// removed. The file watcher must follow the swap.
func TestReloadFollowsConfigMapSwap(t *testing.T) {
	a := startBackend(t, "a", "127.0.0.1:0")
	b := startBackend(t, "b", "127.0.0.1:0")
	conf := "clusters: [{name: x, targets: [%s]}]\nroutes: [{cluster: x}]\n"
	k := newKubeSecret(t, map[string][]byte{"streamlb.yaml": fmt.Appendf(nil, conf, a.Addr())})
	if target, err := os.Readlink(k.path("streamlb.yaml")); err != nil || target != filepath.Join("..data", "streamlb.yaml") {
		t.Fatalf("streamlb.yaml links to %q (%v), want ..data/streamlb.yaml", target, err)
	}
	r := runFile(t, k.path("streamlb.yaml"), false)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)
	if got, err := backendOf(ctx, client); got != "a" {
		t.Fatalf("first call went to %q (%v), want a", got, err)
	}
	k.update(t, map[string][]byte{"streamlb.yaml": fmt.Appendf(nil, conf, b.Addr())})
	if err := os.RemoveAll(filepath.Join(k.dir, "..gen1")); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(ctx, t, "calls to go to b after the ..data swap", func() bool {
		got, _ := backendOf(ctx, client)
		return got == "b"
	})
	// And a second swap, from the directory the first one made.
	k.update(t, map[string][]byte{"streamlb.yaml": fmt.Appendf(nil, conf, a.Addr())})
	if err := os.RemoveAll(filepath.Join(k.dir, "..gen2")); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(ctx, t, "calls to go to a after the second swap", func() bool {
		got, _ := backendOf(ctx, client)
		return got == "a"
	})
}

// TestReadyzWeightZeroCluster: a cluster a route lists with weight 0 gets
// no new calls, so its usable backend does not make the proxy ready while
// the clusters its calls do go to have none: /readyz is 503, and turns
// 200 once a reload gives the usable cluster a weight. Before, any routed
// cluster counted, and /readyz said ready while every call failed.
func TestReadyzWeightZeroCluster(t *testing.T) {
	good := startBackend(t, "good", "127.0.0.1:0")
	dead := testkit.DeadAddr(t)
	conf := `
clusters:
  - name: dead
    targets: [%s]
    health_check: {interval: 50ms, timeout: 500ms, service: %s}
  - name: idle
    targets: [%s]
routes:
  - clusters: [{name: dead, weight: 1}, {name: idle, weight: %d}]
`
	dir := t.TempDir()
	path := writeConfig(t, dir, fmt.Sprintf(conf, dead, testserver.ServiceName, good.Addr(), 0))
	r := runFile(t, path, false)
	testkit.WaitFor(testkit.Context(t, 10*time.Second), t, "the dead backend's check to fail", func() bool {
		_, body := get(t, r.admin+"/backends")
		var bs map[string][]map[string]any
		return json.Unmarshal([]byte(body), &bs) == nil && len(bs["dead"]) == 1 && bs["dead"][0]["healthy"] == false &&
			len(bs["idle"]) == 1
	})
	if code, body := get(t, r.admin+"/readyz"); code != http.StatusServiceUnavailable {
		t.Errorf("/readyz with the only cluster calls go to unusable = %d %q, want 503", code, body)
	}
	writeConfig(t, dir, fmt.Sprintf(conf, dead, testserver.ServiceName, good.Addr(), 1))
	if err := r.srv.Reload(testkit.Context(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, r.admin+"/readyz", http.StatusOK)
}
