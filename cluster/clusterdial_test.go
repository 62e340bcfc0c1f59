package cluster_test

import (
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// countingListener counts the connections a backend accepted (n), and
// those it has open (open: accepted and not yet closed; grpc-go closes
// its side once the proxy closes its own).
type countingListener struct {
	net.Listener
	n, open atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.n.Add(1)
	l.open.Add(1)
	return &countedConn{Conn: c, l: l}, nil
}

type countedConn struct {
	net.Conn
	l    *countingListener
	once sync.Once
}

func (c *countedConn) Close() error {
	c.once.Do(func() { c.l.open.Add(-1) })
	return c.Conn.Close()
}

// serveBackend serves ts on a counting loopback listener.
func serveBackend(t *testing.T, ts *testserver.Server) *countingListener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cl := &countingListener{Listener: ln}
	go ts.Serve(cl)
	t.Cleanup(ts.Stop)
	return cl
}

// TestClusterBackendTLSReload runs two clusters from one file, one over
// mutual TLS to its backend (certificates generated here) and one in
// cleartext, then reloads the file with a new client certificate for the
// TLS cluster: new calls handshake with the new certificate, a stream in
// flight finishes on its old connection, and the cleartext cluster keeps
// its Cluster (director, health state) and its one connection.
func TestClusterBackendTLSReload(t *testing.T) {
	ca, clientCA := newCA(t, "backend-ca"), newCA(t, "proxy-client-ca")
	var mu sync.Mutex
	var clientCNs []string // the client certificate of each handshake the TLS backend saw
	backendCfg := &tls.Config{
		Certificates: []tls.Certificate{ca.keyPair(t, "backend", true)},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    clientCA.pool(),
		VerifyConnection: func(cs tls.ConnectionState) error {
			mu.Lock()
			defer mu.Unlock()
			clientCNs = append(clientCNs, cs.PeerCertificates[0].Subject.CommonName)
			return nil
		},
	}
	cns := func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), clientCNs...)
	}
	secure, err := testserver.New(testserver.Config{Name: "secure", Logger: quiet,
		ServerOptions: []grpc.ServerOption{grpc.Creds(credentials.NewTLS(backendCfg))}})
	if err != nil {
		t.Fatal(err)
	}
	secureLn := serveBackend(t, secure)
	plain, err := testserver.New(testserver.Config{Name: "plain", Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	plainLn := serveBackend(t, plain)

	dir := t.TempDir()
	caFile := writeFile(t, dir, "ca.crt", ca.pem)
	cert1, key1 := clientCA.issue(t, "proxy-1", false)
	cert2, key2 := clientCA.issue(t, "proxy-2", false)
	writeFile(t, dir, "c1.crt", cert1)
	writeFile(t, dir, "c1.key", key1)
	writeFile(t, dir, "c2.crt", cert2)
	writeFile(t, dir, "c2.key", key2)
	conf := `
clusters:
  - name: secure
    targets: [%s]
    backend_tls: {ca: %s, server_name: localhost, cert: %s/%s.crt, key: %s/%s.key}
  - name: plain
    targets: [%s]
routes:
  - {match: {headers: [{name: x-cluster, exact: secure}]}, cluster: secure}
  - {cluster: plain}
`
	write := func(cert string) string {
		return writeConfig(t, dir, fmt.Sprintf(conf, secureLn.Addr(), caFile, dir, cert, dir, cert, plainLn.Addr()))
	}
	r := runFile(t, write("c1"), true)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)
	for range 3 {
		if got, err := backendOf(ctx, client, "x-cluster", "secure"); err != nil || got != "secure" {
			t.Fatalf("call to the TLS cluster went to %q (%v), want secure", got, err)
		}
		if got, err := backendOf(ctx, client); err != nil || got != "plain" {
			t.Fatalf("call to the cleartext cluster went to %q (%v), want plain", got, err)
		}
	}
	if got := cns(); len(got) != 1 || got[0] != "proxy-1" {
		t.Fatalf("TLS handshakes with client certificates %v, want one with proxy-1", got)
	}
	if got := scrapeAll(t, r.admin, "streamlb_backend_connections"); got["cluster=secure"] != 1 || got["cluster=plain"] != 1 {
		t.Errorf("streamlb_backend_connections = %v, want 1 for each cluster", got)
	}
	var plainBefore *cluster.Cluster
	for _, c := range r.srv.Clusters() {
		if c.Name() == "plain" {
			plainBefore = c
		}
	}

	// A stream in flight on the TLS cluster across the reload.
	sctx := metadata.AppendToOutgoingContext(ctx, "x-cluster", "secure")
	stream, err := client.FullDuplexCall(sctx)
	if err != nil {
		t.Fatal(err)
	}
	ping := func() {
		t.Helper()
		if err := stream.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 10}}}); err != nil {
			t.Fatalf("Send: %v", err)
		}
		if _, err := stream.Recv(); err != nil {
			t.Fatalf("Recv: %v", err)
		}
	}
	ping()

	// Calls to the TLS cluster back to back over the one client connection
	// while it reloads (bounded: at most 5000 calls), none of which may fail.
	stop := make(chan struct{})
	loadDone := make(chan error, 1)
	var loadCalls atomic.Int64
	go func() {
		for range 5000 {
			select {
			case <-stop:
				loadDone <- nil
				return
			default:
			}
			if _, err := client.EmptyCall(sctx, &testgrpc.Empty{}); err != nil {
				loadDone <- err
				return
			}
			loadCalls.Add(1)
		}
		loadDone <- nil
	}()
	testkit.WaitFor(ctx, t, "load before the reload", func() bool { return loadCalls.Load() >= 20 })
	write("c2")
	if err := r.srv.Reload(ctx); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	before := loadCalls.Load()
	testkit.WaitFor(ctx, t, "load after the reload", func() bool { return loadCalls.Load() >= before+20 })
	close(stop)
	if err := <-loadDone; err != nil {
		t.Fatalf("a call under load failed across the reload: %v", err)
	}
	t.Logf("%d calls under load across the reload, none failed", loadCalls.Load())
	if got, err := backendOf(ctx, client, "x-cluster", "secure"); err != nil || got != "secure" {
		t.Fatalf("call to the TLS cluster after the reload went to %q (%v), want secure", got, err)
	}
	if got := cns(); len(got) != 2 || got[1] != "proxy-2" {
		t.Errorf("TLS handshakes with client certificates %v, want a second one with proxy-2", got)
	}
	ping() // the old connection still carries the stream
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != io.EOF {
		t.Errorf("stream in flight across the reload ended with %v, want io.EOF (OK)", err)
	}
	// The old connection, drained, closes once its stream is done.
	testkit.WaitFor(ctx, t, "the TLS cluster's old connection to close", func() bool {
		return scrapeAll(t, r.admin, "streamlb_backend_connections")["cluster=secure"] == 1
	})

	var plainAfter *cluster.Cluster
	for _, c := range r.srv.Clusters() {
		if c.Name() == "plain" {
			plainAfter = c
		}
	}
	if plainAfter != plainBefore {
		t.Error("the cleartext cluster, unchanged, was rebuilt by the reload")
	}
	if got, err := backendOf(ctx, client); err != nil || got != "plain" {
		t.Errorf("call to the cleartext cluster after the reload went to %q (%v), want plain", got, err)
	}
	if n := plainLn.n.Load(); n != 1 {
		t.Errorf("the cleartext backend accepted %d connections, want 1: the reload dropped its connection", n)
	}
	if n := secureLn.n.Load(); n != 2 {
		t.Errorf("the TLS backend accepted %d connections, want 2 (one per client certificate)", n)
	}
}

// TestClusterRetryReload gives a cluster of one failing and one good
// backend no retries, then, by reload, retries of UNAVAILABLE: the calls
// that failed then succeed, and the other cluster is kept.
func TestClusterRetryReload(t *testing.T) {
	bad, err := testserver.New(testserver.Config{Name: "bad", Logger: quiet, ErrorRate: 1, ErrorCode: codes.Unavailable})
	if err != nil {
		t.Fatal(err)
	}
	badLn := serveBackend(t, bad)
	good := startBackend(t, "good", "127.0.0.1:0")
	other := startBackend(t, "other", "127.0.0.1:0")
	dir := t.TempDir()
	conf := `
proxy: {retry_on: [grpc.testing.TestService]}
clusters:
  - name: flaky
    targets: [%s, %s]
    ejection: {after: -1}
    retry: {retry_on: %s, max_retries: 1}
  - name: other
    targets: [%s]
routes:
  - {match: {method_prefix: grpc.testing.TestService/Empty}, cluster: flaky}
  - {cluster: other}
`
	write := func(retryOn string) string {
		return writeConfig(t, dir, fmt.Sprintf(conf, badLn.Addr(), good.Addr(), retryOn, other.Addr()))
	}
	r := runFile(t, write("[]"), false)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)
	calls := func() (failed int) {
		for range 10 {
			_, err := client.EmptyCall(ctx, &testgrpc.Empty{})
			switch status.Code(err) {
			case codes.OK:
			case codes.Unavailable:
				failed++
			default:
				t.Fatalf("EmptyCall: %v, want OK or UNAVAILABLE", err)
			}
		}
		return failed
	}
	if failed := calls(); failed != 5 {
		t.Errorf("with retry_on: [] %d of 10 calls failed, want 5 (round robin over one failing backend)", failed)
	}
	if _, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{}); err != nil {
		t.Fatal(err)
	}
	otherBefore := r.srv.Clusters()[1]
	write("[grpc.testing.TestService/EmptyCall]")
	if err := r.srv.Reload(ctx); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	if failed := calls(); failed != 0 {
		t.Errorf("with EmptyCall retried %d of 10 calls failed, want 0", failed)
	}
	if got := r.srv.Clusters()[1]; got != otherBefore || got.Name() != "other" {
		t.Error("the unchanged cluster was rebuilt by the reload")
	}
	// Retry settings changed, but not the backend TLS: the replaced
	// cluster gets a new retry policy and so new connections; none of
	// that touches the failing backend beyond them.
	if n := badLn.n.Load(); n > 2 {
		t.Errorf("the failing backend accepted %d connections, want at most 2 (one per retry policy)", n)
	}
}

// TestClusterDialSettingsErrors checks that validate's checks name the
// line and the field of the per-cluster settings.
func TestClusterDialSettingsErrors(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	ca := newCA(t, "ca")
	caFile := writeFile(t, dir, "ca.crt", ca.pem)
	junk := writeFile(t, dir, "junk.crt", []byte("not PEM"))
	base := `clusters:
  - name: a
    targets: [127.0.0.1:9001]
    %s
routes: [{cluster: a}]
`
	for _, tc := range []struct {
		name    string
		setting string
		want    []string
	}{
		{"no ca", "backend_tls: {server_name: x}", []string{"line 4:", "clusters[0].backend_tls.ca", "required"}},
		{"cert without key", "backend_tls: {ca: " + caFile + ", cert: x.crt}", []string{"line 4:", "clusters[0].backend_tls.cert", "go together"}},
		{"missing ca file", "backend_tls: {ca: " + dir + "/nope.crt}", []string{"line 4:", "clusters[0].backend_tls", "nope.crt"}},
		{"bad ca file", "backend_tls: {ca: " + junk + "}", []string{"line 4:", "clusters[0].backend_tls"}},
		{"bad retry_on", "retry: {retry_on: [grpc.testing.TestService, /a/b/c]}", []string{"line 4:", "clusters[0].retry.retry_on[1]", "/a/b/c"}},
		{"negative budget", "retry: {budget: -1}", []string{"line 4:", "clusters[0].retry.budget", "negative"}},
		{"negative ratio", "retry: {budget_ratio: -0.5}", []string{"line 4:", "clusters[0].retry.budget_ratio", "positive"}},
		{"zero ratio", "retry: {budget_ratio: 0}", []string{"line 4:", "clusters[0].retry.budget_ratio", "positive"}},
		{"unknown retry field", "retry: {on: [x]}", []string{"line 4:", "field on not found"}},
		{"bad max_retries", "retry: {max_retries: many}", []string{"line 4:", "clusters[0].retry.max_retries"}},
		{"grpc-proxy with own tls", "backend_tls: {ca: " + caFile + "}\nengine: grpc-proxy", []string{"clusters[0].backend_tls", "frame engine"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			path := writeFile(t, t.TempDir(), "f.yaml", []byte(fmt.Sprintf(base, tc.setting)))
			_, err := cluster.LoadFile(path)
			if err == nil {
				t.Fatal("LoadFile = nil, want an error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("LoadFile error = %q, want it to contain %q", err, w)
				}
			}
		})
	}
	ok := fmt.Sprintf(base, "backend_tls: {ca: "+caFile+"}\n    retry: {retry_on: [grpc.testing.TestService], max_retries: -1, budget: 5, budget_ratio: 0.5}")
	if _, err := cluster.LoadFile(writeFile(t, dir, "ok.yaml", []byte(ok))); err != nil {
		t.Errorf("LoadFile of good per-cluster settings: %v", err)
	}
}

// TestSharedBackendAttribution runs two clusters over the same backend:
// what the call-end hook counts (bytes here) goes to the cluster each call
// was routed to, which the data plane names (it pools connections per
// cluster), not to the first routed cluster that lists the address.
func TestSharedBackendAttribution(t *testing.T) {
	b := startBackend(t, "b", "127.0.0.1:0")
	conf := `
clusters:
  - {name: x, targets: [%s]}
  - {name: y, targets: [%s]}
routes:
  - {match: {headers: [{name: x-cluster, exact: y}]}, cluster: y}
  - {cluster: x}
`
	r := runFile(t, writeConfig(t, t.TempDir(), fmt.Sprintf(conf, b.Addr(), b.Addr())), true)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)
	// y, the first routed cluster, is called first: from then on both
	// clusters list the backend.
	for range 5 {
		if _, err := backendOf(ctx, client, "x-cluster", "y"); err != nil {
			t.Fatal(err)
		}
	}
	for range 3 {
		if _, err := backendOf(ctx, client); err != nil {
			t.Fatal(err)
		}
	}
	// Every EmptyCall carries the same request bytes: x has 3 calls' worth,
	// y 5.
	testkit.WaitFor(ctx, t, "the call-end hook to count 3 calls' bytes for x and 5 for y", func() bool {
		got := map[string]float64{}
		for k, v := range scrapeAll(t, r.admin, "streamlb_request_bytes_total") {
			for _, l := range strings.Split(k, ",") {
				if name, ok := strings.CutPrefix(l, "cluster="); ok {
					got[name] += v
				}
			}
		}
		return got["x"] > 0 && got["x"]*5 == got["y"]*3
	})
	if got := scrapeAll(t, r.admin, "streamlb_backend_connections"); got["cluster=x"] != 1 || got["cluster=y"] != 1 {
		t.Errorf("streamlb_backend_connections = %v, want one per cluster", got)
	}
}

// TestClusterRetainsItsOwnBackends removes a backend from one of two
// clusters that share it: that cluster's connection to it drains (it
// would otherwise stay open and idle, since the other cluster still lists
// the address), and the other cluster's stays.
func TestClusterRetainsItsOwnBackends(t *testing.T) {
	shared := startBackend(t, "shared", "127.0.0.1:0")
	own := startBackend(t, "own", "127.0.0.1:0")
	dir := t.TempDir()
	conf := `
clusters:
  - {name: x, targets: [%s]}
  - {name: y, targets: [%s]}
routes:
  - {match: {headers: [{name: x-cluster, exact: y}]}, cluster: y}
  - {cluster: x}
`
	r := runFile(t, writeConfig(t, dir, fmt.Sprintf(conf, shared.Addr()+", "+own.Addr(), shared.Addr())), true)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)
	seen := map[string]bool{}
	for range 4 {
		got, err := backendOf(ctx, client)
		if err != nil {
			t.Fatal(err)
		}
		seen[got] = true
	}
	if !seen["shared"] || !seen["own"] {
		t.Fatalf("cluster x's calls went to %v, want both backends", seen)
	}
	if _, err := backendOf(ctx, client, "x-cluster", "y"); err != nil {
		t.Fatal(err)
	}
	conns := func() map[string]float64 { return scrapeAll(t, r.admin, "streamlb_backend_connections") }
	if got := conns(); got["cluster=x"] != 2 || got["cluster=y"] != 1 {
		t.Fatalf("streamlb_backend_connections = %v, want x:2 y:1", got)
	}
	writeConfig(t, dir, fmt.Sprintf(conf, own.Addr(), shared.Addr()))
	if err := r.srv.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(ctx, t, "x's connection to the shared backend to close", func() bool { return conns()["cluster=x"] == 1 })
	if got, err := backendOf(ctx, client); err != nil || got != "own" {
		t.Errorf("cluster x's call after the reload went to %q (%v), want own", got, err)
	}
	if got, err := backendOf(ctx, client, "x-cluster", "y"); err != nil || got != "shared" {
		t.Errorf("cluster y's call after the reload went to %q (%v), want shared", got, err)
	}
	if got := conns(); got["cluster=x"] != 1 || got["cluster=y"] != 1 {
		t.Errorf("streamlb_backend_connections = %v, want x:1 y:1 (y's connection kept)", got)
	}
}
