package cluster_test

import (
	"io"
	"net/http"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
	testpb "google.golang.org/grpc/interop/grpc_testing"
)

// sampleLine matches one record of a contention profile in pprof's text
// form (debug=1): "cycles count @ pc...".
var sampleLine = regexp.MustCompile(`(?m)^\d+ \d+ @ 0x`)

// TestContentionProfiles checks the off-by-default mutex and block
// profiles: off, /debug/pprof/mutex and /debug/pprof/block answer 404
// saying how to switch them on; on, they serve records, the block profile
// with the proxy's own frames, after calls through the proxy; and Run
// switches the runtime's rates off again when it returns. Not parallel:
// the rates are process-wide.
func TestContentionProfiles(t *testing.T) {
	b := startBackend(t, "b", "127.0.0.1:0")
	targets := []string{b.Addr()}

	off := runServer(t, cluster.ServerConfig{Cluster: cluster.Config{Targets: targets}})
	for _, name := range []string{"mutex", "block"} {
		code, body := get(t, off.admin+"/debug/pprof/"+name+"?debug=1")
		if code != http.StatusNotFound || !strings.Contains(body, name+" profile off") {
			t.Errorf("profiles off: /debug/pprof/%s = %d %q, want 404 saying it is off", name, code, body)
		}
	}

	t.Run("on", func(t *testing.T) {
		on := runServer(t, cluster.ServerConfig{Cluster: cluster.Config{Targets: targets}, MutexProfileFraction: 1, BlockProfileRate: 1})
		waitStatus(t, on.admin+"/readyz", http.StatusOK)
		if got := runtime.SetMutexProfileFraction(-1); got != 1 {
			t.Errorf("mutex profile fraction while Run runs = %d, want 1", got)
		}
		client := dial(t, on.addr)
		ctx := testkit.Context(t, 30*time.Second)
		profile := func(name string) string {
			code, body := get(t, on.admin+"/debug/pprof/"+name+"?debug=1")
			if code != http.StatusOK {
				t.Fatalf("/debug/pprof/%s = %d %q, want 200", name, code, body)
			}
			return body
		}
		// Concurrent calls over one connection until both profiles hold
		// records (bounded: 50 rounds of 16 × 20 calls).
		var mutex, block string
		for round := 0; round < 50; round++ {
			var wg sync.WaitGroup
			errs := make(chan error, 16)
			for range 16 {
				wg.Go(func() {
					for range 20 {
						if _, err := client.UnaryCall(ctx, &testpb.SimpleRequest{}); err != nil {
							errs <- err
							return
						}
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatalf("call through the proxy: %v", err)
			}
			mutex, block = profile("mutex"), profile("block")
			if sampleLine.MatchString(mutex) && sampleLine.MatchString(block) && strings.Contains(block, "streamlb/proxy.") {
				return
			}
		}
		t.Errorf("after 16,000 calls: mutex profile %q, block profile %q; want records in both, the block profile's with streamlb/proxy frames",
			head(mutex), head(block))
	})
	if got := runtime.SetMutexProfileFraction(-1); got != 0 {
		t.Errorf("mutex profile fraction after Run returned = %d, want 0", got)
	}
}

func head(s string) string {
	if len(s) > 600 {
		return s[:600] + "…"
	}
	return s
}

// TestAdminBoundsLongResponses: a profile or trace longer than a minute is
// refused rather than held for a client that may never read it (attack
// round 3: a never-read /debug/pprof/trace?seconds=600 grew the proxy by
// 0.4 MB/s); a short one is served.
func TestAdminBoundsLongResponses(t *testing.T) {
	b := startBackend(t, "b", "127.0.0.1:0")
	srv := runServer(t, cluster.ServerConfig{Cluster: cluster.Config{Targets: []string{b.Addr()}}})
	for _, path := range []string{"/debug/pprof/trace?seconds=600", "/debug/pprof/profile?seconds=600"} {
		code, body := get(t, srv.admin+path)
		if code != http.StatusBadRequest || !strings.Contains(body, "seconds must be at most 60") {
			t.Errorf("%s = %d %q, want 400: longer than a minute", path, code, head(body))
		}
	}
	if code, body := get(t, srv.admin+"/debug/pprof/trace?seconds=0.05"); code != http.StatusOK {
		t.Errorf("/debug/pprof/trace?seconds=0.05 = %d %q, want 200", code, head(body))
	}
}

// TestAdminRefusesBadProfileSeconds: a CPU profile or trace whose seconds
// is not a positive number (a whole one for the CPU profile, as
// net/http/pprof parses it) is refused with 400 at once. net/http/pprof
// takes such a value for its default: ?seconds=-5 ran a 30 s CPU profile
// (here it fails the 5 s client timeout). A valid one is served.
func TestAdminRefusesBadProfileSeconds(t *testing.T) {
	b := startBackend(t, "b", "127.0.0.1:0")
	srv := runServer(t, cluster.ServerConfig{Cluster: cluster.Config{Targets: []string{b.Addr()}}})
	client := &http.Client{Timeout: 5 * time.Second}
	for _, tc := range []struct {
		query string
		code  int
		body  string
	}{
		{"profile?seconds=-5", http.StatusBadRequest, `seconds must be a positive whole number, got "-5"`},
		{"profile?seconds=0", http.StatusBadRequest, "positive whole number"},
		{"profile?seconds=", http.StatusBadRequest, "positive whole number"},
		{"profile?seconds=soon", http.StatusBadRequest, "positive whole number"},
		{"profile?seconds=0.5", http.StatusBadRequest, "positive whole number"},
		{"trace?seconds=-1", http.StatusBadRequest, `seconds must be a positive number, got "-1"`},
		{"trace?seconds=NaN", http.StatusBadRequest, "positive number"},
		{"trace?seconds=x", http.StatusBadRequest, "positive number"},
		{"trace?seconds=0.05", http.StatusOK, ""},
		{"profile?seconds=1", http.StatusOK, ""},
	} {
		resp, err := client.Get(srv.admin + "/debug/pprof/" + tc.query)
		if err != nil {
			t.Errorf("/debug/pprof/%s: %v, want %d at once", tc.query, err, tc.code)
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.code || !strings.Contains(string(body), tc.body) {
			t.Errorf("/debug/pprof/%s = %d %q, want %d %q", tc.query, resp.StatusCode, head(string(body)), tc.code, tc.body)
		}
	}
}
