package cluster_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// silentServer accepts TCP connections and reads them, but never speaks
// HTTP/2 (no SETTINGS), until the test ends. It returns its address.
func silentServer(t *testing.T) string {
	t.Helper()
	return testkit.ServeTCP(t, func(c net.Conn) { io.Copy(io.Discard, c) })
}

// failedOn returns the backend of bad that err, a call's UNAVAILABLE,
// names, or "" when it names none of them.
func failedOn(err error, bad ...string) string {
	if status.Code(err) != codes.Unavailable {
		return ""
	}
	for _, b := range bad {
		if strings.Contains(status.Convert(err).Message(), b) {
			return b
		}
	}
	return ""
}

// TestBackendConnectFailuresMetric: the flags' one cluster has a backend
// whose port refuses connections, one that accepts TCP but never speaks
// HTTP/2, and a working one, picked in turn, each call making one attempt
// (no retries, no ejection). streamlb_backend_connect_failures_total
// counts, per backend, the connections that could not be opened (Envoy's
// upstream_cx_connect_fail): one for every call that failed on the
// refusing or the silent backend, none for the working one, whose calls
// all succeed. No call was sent to the two that failed, so
// streamlb_calls_started_total shows nothing there (before, nothing
// showed their failed dials per backend at all).
func TestBackendConnectFailuresMetric(t *testing.T) {
	refusing := testkit.RefusingAddr(t)
	silent := silentServer(t)
	good := startBackend(t, "good", "127.0.0.1:0")
	r := runServer(t, cluster.ServerConfig{Metrics: prometheus.NewRegistry(),
		Proxy: proxy.Config{MaxRetries: -1, HandshakeTimeout: 200 * time.Millisecond},
		Cluster: cluster.Config{Name: "echo", Targets: []string{refusing, silent, good.Addr()},
			Director: director.Config{Policy: director.RoundRobin, EjectAfter: -1}}})
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)
	failed := map[string]int{}
	ok := 0
	for i := range 9 {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err := client.EmptyCall(cctx, &testgrpc.Empty{})
		cancel()
		if err == nil {
			ok++
			continue
		}
		b := failedOn(err, refusing, silent)
		if b == "" {
			t.Fatalf("call %d: %v, want OK or UNAVAILABLE naming a failing backend", i, err)
		}
		failed[b]++
	}
	if failed[refusing] == 0 || failed[silent] == 0 || ok == 0 {
		t.Fatalf("calls failed on the refusing backend %d, on the silent one %d, succeeded %d: want some of each (round robin)",
			failed[refusing], failed[silent], ok)
	}
	if n := good.Calls(); int(n) != ok {
		t.Errorf("the good backend served %d calls, want the %d that succeeded", n, ok)
	}
	// Each counted before its call failed; the scrape comes after.
	fails := scrape(t, r.admin, "streamlb_backend_connect_failures_total")
	for _, b := range []string{refusing, silent} {
		if got := fails["backend="+b]; got != float64(failed[b]) {
			t.Errorf("connect failures of %s = %v, want %d (a connection per call that failed on it)", b, got, failed[b])
		}
	}
	if got, ok := fails["backend="+good.Addr()]; !ok || got != 0 {
		t.Errorf("connect failures of the working backend = %v (exported %v), want 0", got, ok)
	}
	started := scrape(t, r.admin, "streamlb_calls_started_total")
	for _, b := range []string{refusing, silent} {
		if v := started["backend="+b]; v != 0 {
			t.Errorf("calls started on %s = %v, want 0: none was sent", b, v)
		}
	}
}

// TestBackendConnectFailuresTLS: a cluster with backend TLS whose backend
// speaks cleartext: every connection fails its TLS handshake, which
// streamlb_backend_connect_failures_total counts, a connection per call.
func TestBackendConnectFailuresTLS(t *testing.T) {
	plain := startBackend(t, "plain", "127.0.0.1:0")
	ca := testkit.NewCA(t, "backend-ca")
	bt := cluster.BackendTLS{CAFile: ca.WriteCA(t, t.TempDir(), "ca.crt")}
	r := runServer(t, cluster.ServerConfig{Metrics: prometheus.NewRegistry(),
		Proxy: proxy.Config{MaxRetries: -1},
		Cluster: cluster.Config{Name: "echo", Targets: []string{plain.Addr()}, BackendTLS: &bt,
			Director: director.Config{EjectAfter: -1}}})
	client := dial(t, r.addr)
	const calls = 3
	for i := range calls {
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		_, err := client.EmptyCall(ctx, &testgrpc.Empty{})
		cancel()
		if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "TLS handshake") {
			t.Fatalf("call %d: %v, want UNAVAILABLE, the TLS handshake failed", i, err)
		}
	}
	if got := scrape(t, r.admin, "streamlb_backend_connect_failures_total")["backend="+plain.Addr()]; got != calls {
		t.Errorf("connect failures = %v, want %d", got, calls)
	}
}

// TestBackendConnectFailuresFile: with a configuration file, a
// connection that could not be opened counts in the cluster it was
// dialed for: the refusing backend's cluster, not the working one's.
func TestBackendConnectFailuresFile(t *testing.T) {
	refusing := testkit.RefusingAddr(t)
	good := startBackend(t, "good", "127.0.0.1:0")
	path := writeConfig(t, t.TempDir(), fmt.Sprintf(`
clusters:
  - {name: down, targets: [%s], retry: {max_retries: -1}, ejection: {after: -1}}
  - {name: up, targets: [%s]}
routes:
  - match: {headers: [{name: x-down, present: true}]}
    cluster: down
  - cluster: up
`, refusing, good.Addr()))
	r := runFile(t, path, true)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)
	const calls = 3
	for i := range calls {
		down := metadata.AppendToOutgoingContext(ctx, "x-down", "1")
		if _, err := client.EmptyCall(down, &testgrpc.Empty{}); failedOn(err, refusing) == "" {
			t.Fatalf("call %d to the down cluster: %v, want UNAVAILABLE naming %s", i, err, refusing)
		}
		if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
			t.Fatalf("call %d to the up cluster: %v", i, err)
		}
	}
	fails := scrapeAll(t, r.admin, "streamlb_backend_connect_failures_total")
	if got := fails["backend="+refusing+",cluster=down"]; got != calls {
		t.Errorf("connect failures of the down cluster's backend = %v, want %d (all: %v)", got, calls, fails)
	}
	if got, ok := fails["backend="+good.Addr()+",cluster=up"]; !ok || got != 0 {
		t.Errorf("connect failures of the up cluster's backend = %v (exported %v), want 0 (all: %v)", got, ok, fails)
	}
}

// TestBackendConnectFailuresReference: streamlb_backend_connect_failures_total
// with the grpc-proxy engine, which counted nothing before (its grpc-go
// clients dialed out of sight): a refusing backend's failed dials, and a
// cleartext backend's failed TLS handshakes, count on that backend; a
// working one's count stays 0. grpc-go fails calls at once while it waits
// to dial again, so a failed call does not always mean a dial: at least
// one each is counted.
func TestBackendConnectFailuresReference(t *testing.T) {
	t.Run("refused", func(t *testing.T) {
		refusing := testkit.RefusingAddr(t)
		good := startBackend(t, "good", "127.0.0.1:0")
		r := runServer(t, cluster.ServerConfig{Metrics: prometheus.NewRegistry(), Engine: cluster.EngineGRPCProxy,
			Cluster: cluster.Config{Name: "echo", Targets: []string{refusing, good.Addr()},
				Director: director.Config{Policy: director.RoundRobin, EjectAfter: -1}}})
		client := dial(t, r.addr)
		ctx := testkit.Context(t, 30*time.Second)
		failed, ok := 0, 0
		for i := range 6 {
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			_, err := client.EmptyCall(cctx, &testgrpc.Empty{})
			cancel()
			switch {
			case err == nil:
				ok++
			case status.Code(err) == codes.Unavailable:
				failed++
			default:
				t.Fatalf("call %d: %v, want OK or UNAVAILABLE", i, err)
			}
		}
		if failed == 0 || ok == 0 {
			t.Fatalf("%d calls failed, %d succeeded: want some of each (round robin over a refusing and a working backend)", failed, ok)
		}
		fails := scrape(t, r.admin, "streamlb_backend_connect_failures_total")
		if got := fails["backend="+refusing]; got < 1 {
			t.Errorf("connect failures of the refusing backend = %v, want at least 1 (%d calls failed on it)", got, failed)
		}
		if got, ok := fails["backend="+good.Addr()]; !ok || got != 0 {
			t.Errorf("connect failures of the working backend = %v (exported %v), want 0", got, ok)
		}
	})
	t.Run("tls", func(t *testing.T) {
		plain := startBackend(t, "plain", "127.0.0.1:0")
		ca := testkit.NewCA(t, "backend-ca")
		bt := cluster.BackendTLS{CAFile: ca.WriteCA(t, t.TempDir(), "ca.crt")}
		r := runServer(t, cluster.ServerConfig{Metrics: prometheus.NewRegistry(), Engine: cluster.EngineGRPCProxy,
			Cluster: cluster.Config{Name: "echo", Targets: []string{plain.Addr()}, BackendTLS: &bt,
				Director: director.Config{EjectAfter: -1}}})
		client := dial(t, r.addr)
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		_, err := client.EmptyCall(ctx, &testgrpc.Empty{})
		cancel()
		if status.Code(err) != codes.Unavailable {
			t.Fatalf("call: %v, want UNAVAILABLE (the backend does not speak TLS)", err)
		}
		if got := scrape(t, r.admin, "streamlb_backend_connect_failures_total")["backend="+plain.Addr()]; got < 1 {
			t.Errorf("connect failures = %v, want at least 1: the TLS handshake failed", got)
		}
	})
}
