package cluster_test

import (
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// TestH1ReloadStormWaitingCalls: backends that take 2 streams per
// connection, one connection per backend (max_backend_conns: 1), so most
// calls wait for a slot (max_backend_pending); 100 reloads alternate the
// retry policy (a new Upstream each time: the waiting calls of the
// retired one are moved, DrainUpstream) and the route between two
// clusters over the same backends. Every call must end OK: a call that
// waits across three reloads is moved three times, and each move counts
// as an attempt (max_retries 2), so it fails UNAVAILABLE "draining
// because its cluster was removed or reloaded" though it never reached a
// backend.
func TestH1ReloadStormWaitingCalls(t *testing.T) {
	var addrs []string
	for _, n := range []string{"p", "q"} {
		ts := startBackendConfig(t, testserver.Config{Name: n, ServerOptions: []grpc.ServerOption{grpc.MaxConcurrentStreams(2)}}, "127.0.0.1:0")
		addrs = append(addrs, ts.Addr())
	}
	conf := func(gen int) string {
		to := []string{"c1", "c2"}[gen%2]
		retryOn := []string{"[grpc.testing.TestService/EmptyCall]", "[grpc.testing.TestService/EmptyCall, grpc.testing.TestService/UnaryCall]"}[gen%2]
		return fmt.Sprintf(`proxy: {max_backend_conns: 1, max_backend_pending: 1000, backend_pending_timeout: 20s, max_retries: 2, retry_on: %s}
clusters:
  - {name: c1, targets: [%s, %s]}
  - {name: c2, targets: [%s, %s]}
routes: [{cluster: %s}]
`, retryOn, addrs[0], addrs[1], addrs[0], addrs[1], to)
	}
	dir := t.TempDir()
	r := runFile(t, writeConfig(t, dir, conf(0)), false)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 60*time.Second)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var calls, fails atomic.Int64
	var firstErr atomic.Value
	var msgMu sync.Mutex
	msgs := map[string]int{}
	for range 24 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx := metadata.AppendToOutgoingContext(ctx, testserver.MetadataDelay, "3ms")
			for i := 0; i < 3000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				calls.Add(1)
				if _, err := client.EmptyCall(cctx, &testgrpc.Empty{}); err != nil {
					fails.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					msgMu.Lock()
					msgs[err.Error()]++
					msgMu.Unlock()
				}
			}
		}()
	}
	time.Sleep(100 * time.Millisecond)
	start := time.Now()
	for gen := 1; gen <= 100 && time.Since(start) < 30*time.Second; gen++ {
		writeConfig(t, dir, conf(gen))
		if err := r.srv.Reload(ctx); err != nil {
			t.Fatalf("Reload %d: %v", gen, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	t.Logf("100 reloads in %v; %d calls, %d failed", time.Since(start), calls.Load(), fails.Load())
	for m, n := range msgs {
		t.Logf("%d× %s", n, m)
	}
	if fails.Load() != 0 {
		t.Errorf("%d of %d calls failed, want 0; first: %v", fails.Load(), calls.Load(), firstErr.Load())
	}
}

// TestH1ReloadMovesWaitingCallsNoRetries: cluster c does not retry
// (retry: {max_retries: -1}); its two backends take one stream each on
// their one connection (max_backend_conns: 1), held by a long call, so
// four more calls wait for a slot. A single reload changes c's retry_on
// (still no retries): c gets a new Upstream and the old one is retired,
// and its waiting calls, which never reached a backend, are moved to be
// picked again (README: a call waiting on a connection of a cluster
// reloaded away waits on, or goes to, another). They are instead failed
// UNAVAILABLE "draining because its cluster was removed or reloaded": the
// move counts as an attempt (retryOrFail's s.attempts <= s.maxRetries),
// which a call without retries does not have. A GOAWAY's move is not
// counted (up to 16 times); with max_retries 2, the third reload during a
// wait fails a call the same way.
func TestH1ReloadMovesWaitingCallsNoRetries(t *testing.T) {
	var addrs []string
	for _, n := range []string{"p", "q"} {
		ts := startBackendConfig(t, testserver.Config{Name: n, ServerOptions: []grpc.ServerOption{grpc.MaxConcurrentStreams(1)}}, "127.0.0.1:0")
		addrs = append(addrs, ts.Addr())
	}
	conf := func(retryOn string) string {
		return fmt.Sprintf(`proxy: {max_backend_conns: 1, max_backend_pending: 100, backend_pending_timeout: 20s}
clusters:
  - {name: c, targets: [%s, %s], retry: {max_retries: -1, retry_on: [%s]}}
routes: [{cluster: c}]
`, addrs[0], addrs[1], retryOn)
	}
	dir := t.TempDir()
	r := runFile(t, writeConfig(t, dir, conf("grpc.testing.TestService/EmptyCall")), false)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)
	call := func(delay string, res chan<- error) {
		_, err := client.EmptyCall(metadata.AppendToOutgoingContext(ctx, testserver.MetadataDelay, delay), &testgrpc.Empty{})
		res <- err
	}
	long := make(chan error, 2)
	for range 2 {
		go call("1500ms", long)
	}
	time.Sleep(300 * time.Millisecond) // both slots taken
	waiting := make(chan error, 4)
	for range 4 {
		go call("10ms", waiting)
	}
	time.Sleep(300 * time.Millisecond) // the four wait
	writeConfig(t, dir, conf("grpc.testing.TestService/UnaryCall"))
	if err := r.srv.Reload(ctx); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	for i := range 4 {
		if err := <-waiting; err != nil {
			t.Errorf("waiting call %d across the reload: %v; want OK", i, err)
		}
	}
	for i := range 2 {
		if err := <-long; err != nil {
			t.Errorf("long call %d across the reload: %v; want OK", i, err)
		}
	}
}

// TestH1ReloadRemovesRouteOfWaitingCalls: calls wait for a slot on
// cluster c when a reload removes c and the only route to it. They cannot
// be placed again anywhere; they fail UNAVAILABLE, "draining because its
// cluster was removed or reloaded" (retryable: they reached no backend),
// not UNIMPLEMENTED "no route" as if they had never been routed. The
// long calls that hold the slots run to their end.
func TestH1ReloadRemovesRouteOfWaitingCalls(t *testing.T) {
	var addrs []string
	for _, n := range []string{"p", "q"} {
		ts := startBackendConfig(t, testserver.Config{Name: n, ServerOptions: []grpc.ServerOption{grpc.MaxConcurrentStreams(1)}}, "127.0.0.1:0")
		addrs = append(addrs, ts.Addr())
	}
	const limits = "proxy: {max_backend_conns: 1, max_backend_pending: 100, backend_pending_timeout: 20s}\n"
	dir := t.TempDir()
	r := runFile(t, writeConfig(t, dir, limits+fmt.Sprintf(`clusters:
  - {name: c, targets: [%s, %s]}
  - {name: d, targets: [%s]}
routes: [{match: {service: grpc.testing.TestService}, cluster: c}, {match: {service: other.v1.Other}, cluster: d}]
`, addrs[0], addrs[1], addrs[0])), false)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)
	call := func(delay string, res chan<- error) {
		_, err := client.EmptyCall(metadata.AppendToOutgoingContext(ctx, testserver.MetadataDelay, delay), &testgrpc.Empty{})
		res <- err
	}
	long := make(chan error, 2)
	for range 2 {
		go call("1500ms", long)
	}
	time.Sleep(300 * time.Millisecond)
	waiting := make(chan error, 4)
	for range 4 {
		go call("10ms", waiting)
	}
	time.Sleep(300 * time.Millisecond)
	writeConfig(t, dir, limits+fmt.Sprintf("clusters: [{name: d, targets: [%s]}]\nroutes: [{match: {service: other.v1.Other}, cluster: d}]\n", addrs[0]))
	if err := r.srv.Reload(ctx); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	for i := range 4 {
		err := <-waiting
		if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "removed or reloaded") {
			t.Errorf("waiting call %d: %v; want UNAVAILABLE draining because its cluster was removed or reloaded", i, err)
		}
	}
	for i := range 2 {
		if err := <-long; err != nil {
			t.Errorf("long call %d across the reload: %v; want OK", i, err)
		}
	}
}
