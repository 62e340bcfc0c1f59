package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/testserver"
)

// TestMaxRetriesZero: a max_retries of 0, given as --max-retries 0, as
// the file's proxy.max_retries or as a cluster's retry.max_retries, means
// no retries, as Envoy's num_retries: 0 does. It meant the default (2):
// a call answered UNAVAILABLE by every backend was tried three times.
// Absent, the default still holds, and 1 is one retry.
func TestMaxRetriesZero(t *testing.T) {
	r := newRetryRig(t)
	r.run(t, []attemptCase{
		{"flag 0", r.flags("--max-retries", "0"), 1},
		{"flag 1", r.flags("--max-retries", "1"), 2},
		{"flag absent", r.flags(), 3},
		{"file proxy 0", r.conf(t, "  max_retries: 0", ""), 1},
		{"file absent", r.conf(t, "", ""), 3},
		{"file cluster 0 over proxy 2", r.conf(t, "  max_retries: 2", "    retry: {max_retries: 0}"), 1},
		{"file cluster 1 over proxy 0", r.conf(t, "  max_retries: 0", "    retry: {max_retries: 1}"), 2},
	})
}

// TestRetryBudgetZero: a retry budget of 0, given as --retry-budget 0, as
// the file's proxy.retry_budget or as a cluster's retry.budget, is a
// bucket of no tokens: an UNAVAILABLE answer of a --retry-on method is not
// retried (max_retries 2 notwithstanding). It meant the default (10
// tokens, so the call was tried three times), and a cluster's budget: 0
// took the proxy's. Absent, the default still holds (a negative budget
// is refused: TestUsage, TestParseFileErrors).
func TestRetryBudgetZero(t *testing.T) {
	r := newRetryRig(t)
	r.run(t, []attemptCase{
		{"flag 0", r.flags("--retry-budget", "0"), 1},
		{"flag 1", r.flags("--retry-budget", "1"), 3},
		{"flag absent", r.flags(), 3},
		{"file proxy 0", r.conf(t, "  retry_budget: 0", ""), 1},
		{"file absent", r.conf(t, "", ""), 3},
		{"file cluster 0 over proxy 10", r.conf(t, "  retry_budget: 10", "    retry: {budget: 0}"), 1},
		{"file cluster 4 over proxy 0", r.conf(t, "  retry_budget: 0", "    retry: {budget: 4}"), 3},
	})
}

// retryRig is two backends that answer UNAVAILABLE when asked
// (testserver.MetadataFailCode), for proxies started with retries on for
// the test service's methods and ejection off.
type retryRig struct {
	backends []*testserver.Server
}

func newRetryRig(t *testing.T) *retryRig {
	prev := slog.Default()
	t.Cleanup(func() { slog.SetDefault(prev) })
	r := &retryRig{}
	for _, name := range []string{"b1", "b2"} {
		ts, err := testserver.New(testserver.Config{Name: name, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		if err := ts.Start("127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(ts.Stop)
		r.backends = append(r.backends, ts)
	}
	return r
}

// conf is the proxy command with a configuration file of one cluster of
// the two backends, proxyExtra added to its proxy block and clusterExtra
// to its cluster.
func (r *retryRig) conf(t *testing.T, proxyExtra, clusterExtra string) []string {
	path := filepath.Join(t.TempDir(), "streamlb.yaml")
	data := fmt.Sprintf(`listen: 127.0.0.1:0
proxy:
  retry_on: ["/grpc.testing.TestService/"]
%s
clusters:
  - name: a
    targets: [%q, %q]
    ejection: {after: -1}
%s
routes:
  - cluster: a
`, proxyExtra, r.backends[0].Addr(), r.backends[1].Addr(), clusterExtra)
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	return []string{"proxy", "--config", path, "--log-format", "json"}
}

// flags is the proxy command with the two backends as flags, and extra.
func (r *retryRig) flags(extra ...string) []string {
	return append([]string{"proxy", "--listen", "127.0.0.1:0", "--backend", r.backends[0].Addr(), "--backend", r.backends[1].Addr(),
		"--retry-on", "/grpc.testing.TestService/", "--eject-after", "-1", "--log-format", "json"}, extra...)
}

// attemptCase is a proxy command and the attempts a call answered
// UNAVAILABLE by every backend must make through it.
type attemptCase struct {
	name     string
	args     []string
	attempts int64
}

// run starts each case's proxy, makes the call and counts its attempts.
func (r *retryRig) run(t *testing.T, cases []attemptCase) {
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			app := startApp(ctx, t, tc.args, "listening")
			addr := app.wait(ctx, t)["listening"].Addr
			cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				t.Fatal(err)
			}
			defer cc.Close()
			before := r.backends[0].Calls() + r.backends[1].Calls()
			cctx := metadata.AppendToOutgoingContext(ctx, testserver.MetadataFailCode, fmt.Sprint(int(codes.Unavailable)))
			_, err = testgrpc.NewTestServiceClient(cc).EmptyCall(cctx, &testgrpc.Empty{})
			if status.Code(err) != codes.Unavailable {
				t.Fatalf("call answered UNAVAILABLE by every backend: %v", err)
			}
			if got := r.backends[0].Calls() + r.backends[1].Calls() - before; got != tc.attempts {
				t.Errorf("the backends saw %d attempts, want %d", got, tc.attempts)
			}
			if err := app.shutdown(t); err != nil {
				t.Errorf("proxy command returned %v", err)
			}
		})
	}
}
