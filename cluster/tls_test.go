package cluster_test

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// testCA is a certificate authority made for one test (testkit.CA, with
// the lower-case names this package's tests use).
type testCA struct {
	*testkit.CA
	pem []byte
}

func newCA(t testing.TB, name string) *testCA {
	t.Helper()
	ca := testkit.NewCA(t, name)
	return &testCA{CA: ca, pem: ca.PEM}
}

// issue returns a PEM certificate and key signed by ca: for a server on
// 127.0.0.1 and localhost, or for a client.
func (ca *testCA) issue(t testing.TB, name string, server bool) (certPEM, keyPEM []byte) {
	t.Helper()
	return ca.Issue(t, name, server)
}

func (ca *testCA) pool() *x509.CertPool { return ca.Pool() }

// keyPair returns ca.issue's files as a tls.Certificate.
func (ca *testCA) keyPair(t testing.TB, name string, server bool) tls.Certificate {
	t.Helper()
	c, err := tls.X509KeyPair(ca.issue(t, name, server))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func writeFile(t testing.TB, dir, name string, data []byte) string {
	t.Helper()
	return testkit.WriteFile(t, dir, name, data)
}

// dialTLS returns a client for addr over TLS with cfg; the connection is
// closed at cleanup.
func dialTLS(t testing.TB, addr string, cfg *tls.Config) testgrpc.TestServiceClient {
	t.Helper()
	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return testgrpc.NewTestServiceClient(cc)
}

// serverFiles writes a server certificate from ca into a new directory
// and returns the ServerTLS naming them.
func serverFiles(t testing.TB, ca *testCA) cluster.ServerTLS {
	t.Helper()
	dir := t.TempDir()
	cert, key := ca.issue(t, "proxy", true)
	return cluster.ServerTLS{CertFile: writeFile(t, dir, "tls.crt", cert), KeyFile: writeFile(t, dir, "tls.key", key)}
}

// TestTLSTermination runs calls over TLS through each engine to an h2c
// backend.
func TestTLSTermination(t *testing.T) {
	ca := newCA(t, "ca")
	st := serverFiles(t, ca)
	ts := startBackend(t, "a", "127.0.0.1:0")
	for _, engine := range cluster.Engines() {
		t.Run(engine, func(t *testing.T) {
			r := runServer(t, cluster.ServerConfig{Engine: engine, TLS: &st, Cluster: cluster.Config{Targets: []string{ts.Addr()}}})
			for _, name := range []string{"", "localhost"} { // IP SAN, DNS SAN
				client := dialTLS(t, r.addr, &tls.Config{RootCAs: ca.pool(), ServerName: name})
				if _, err := client.UnaryCall(t.Context(), &testgrpc.SimpleRequest{ResponseSize: 1 << 20}); err != nil {
					t.Fatalf("UnaryCall over TLS (server name %q): %v", name, err)
				}
			}
			client := dialTLS(t, r.addr, &tls.Config{RootCAs: newCA(t, "other").pool()})
			if _, err := client.EmptyCall(t.Context(), &testgrpc.Empty{}); status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "certificate") {
				t.Errorf("EmptyCall trusting another CA: %v, want UNAVAILABLE about the certificate", err)
			}
		})
	}
}

// TestMutualTLS checks that with a client CA, only clients with a
// certificate it signed get through.
func TestMutualTLS(t *testing.T) {
	ca, clientCA := newCA(t, "ca"), newCA(t, "client-ca")
	st := serverFiles(t, ca)
	st.ClientCAFile = writeFile(t, t.TempDir(), "ca.crt", clientCA.pem)
	ts := startBackend(t, "a", "127.0.0.1:0")
	r := runServer(t, cluster.ServerConfig{TLS: &st, Cluster: cluster.Config{Targets: []string{ts.Addr()}}})
	tests := []struct {
		name string
		cert []tls.Certificate
		ok   bool
	}{
		{name: "no certificate"},
		{name: "certificate of another CA", cert: []tls.Certificate{ca.keyPair(t, "client", false)}},
		{name: "certificate of the client CA", cert: []tls.Certificate{clientCA.keyPair(t, "client", false)}, ok: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			client := dialTLS(t, r.addr, &tls.Config{RootCAs: ca.pool(), Certificates: tc.cert})
			_, err := client.EmptyCall(t.Context(), &testgrpc.Empty{})
			if tc.ok && err != nil {
				t.Errorf("EmptyCall: %v, want success", err)
			}
			if !tc.ok && status.Code(err) != codes.Unavailable {
				t.Errorf("EmptyCall: %v, want UNAVAILABLE (handshake refused)", err)
			}
		})
	}
}

// kubeSecret lays files out as a Kubernetes Secret volume does: each file
// is a symlink through ..data, which points at a timestamped directory and
// is replaced atomically on an update.
type kubeSecret struct {
	dir string
	gen int
}

func newKubeSecret(t *testing.T, files map[string][]byte) *kubeSecret {
	t.Helper()
	k := &kubeSecret{dir: t.TempDir()}
	k.update(t, files)
	for name := range files {
		if err := os.Symlink(filepath.Join("..data", name), filepath.Join(k.dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	return k
}

func (k *kubeSecret) update(t *testing.T, files map[string][]byte) {
	t.Helper()
	k.gen++
	gen := "..gen" + string(rune('0'+k.gen))
	if err := os.Mkdir(filepath.Join(k.dir, gen), 0o700); err != nil {
		t.Fatal(err)
	}
	for name, data := range files {
		writeFile(t, filepath.Join(k.dir, gen), name, data)
	}
	tmp := filepath.Join(k.dir, "..data_tmp")
	if err := os.Symlink(gen, tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(k.dir, "..data")); err != nil {
		t.Fatal(err)
	}
}

func (k *kubeSecret) path(name string) string { return filepath.Join(k.dir, name) }

// TestCertificateRotation swaps the certificate files as Kubernetes does
// and checks that new connections get the new certificate while a
// connection opened before keeps working, and that files that do not load
// leave the certificate in use.
func TestCertificateRotation(t *testing.T) {
	oldCA, newCA_ := newCA(t, "old"), newCA(t, "new")
	cert, key := oldCA.issue(t, "proxy", true)
	secret := newKubeSecret(t, map[string][]byte{"tls.crt": cert, "tls.key": key})
	ts := startBackend(t, "a", "127.0.0.1:0")
	var logs syncBuffer
	r := runServer(t, cluster.ServerConfig{
		TLS:     &cluster.ServerTLS{CertFile: secret.path("tls.crt"), KeyFile: secret.path("tls.key")},
		Cluster: cluster.Config{Targets: []string{ts.Addr()}},
		Logger:  slog.New(slog.NewTextHandler(&logs, nil)),
	})
	ctx := testkit.Context(t, 30*time.Second)

	before := dialTLS(t, r.addr, &tls.Config{RootCAs: oldCA.pool()})
	stream, err := before.FullDuplexCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	roundTrip := func() {
		t.Helper()
		if err := stream.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 10}}}); err != nil {
			t.Fatalf("Send on the old connection: %v", err)
		}
		if _, err := stream.Recv(); err != nil {
			t.Fatalf("Recv on the old connection: %v", err)
		}
	}
	roundTrip()

	cert, key = newCA_.issue(t, "proxy", true)
	secret.update(t, map[string][]byte{"tls.crt": cert, "tls.key": key})
	// Each try is a new connection: only the new certificate passes.
	testkit.WaitFor(ctx, t, "the new certificate", func() bool {
		cc, err := grpc.NewClient("passthrough:///"+r.addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: newCA_.pool()})))
		if err != nil {
			t.Fatal(err)
		}
		defer cc.Close()
		_, err = testgrpc.NewTestServiceClient(cc).EmptyCall(ctx, &testgrpc.Empty{})
		return err == nil
	})
	// The old connection still works: it did not reconnect, for it
	// trusts only the old CA.
	roundTrip()
	if _, err := before.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Errorf("EmptyCall on the old connection: %v", err)
	}

	// A certificate that does not match its key is logged and not used.
	other, _ := newCA_.issue(t, "proxy", true)
	secret.update(t, map[string][]byte{"tls.crt": other, "tls.key": key})
	testkit.WaitFor(ctx, t, "the failed reload to be logged", func() bool {
		dialTLS(t, r.addr, &tls.Config{RootCAs: newCA_.pool()}).EmptyCall(ctx, &testgrpc.Empty{})
		return strings.Contains(logs.String(), "do not load")
	})
	if _, err := dialTLS(t, r.addr, &tls.Config{RootCAs: newCA_.pool()}).EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Errorf("EmptyCall after a bad update: %v, want the previous certificate served", err)
	}
	stream.CloseSend()
}

// TestBackendTLS runs calls from an h2c client through each engine to
// backends that require TLS with a client certificate, with health checks
// over the same TLS.
func TestBackendTLS(t *testing.T) {
	ca, clientCA := newCA(t, "backend-ca"), newCA(t, "proxy-client-ca")
	var hellos atomic.Int64 // TLS handshakes the backends saw begin
	backendTLS := &tls.Config{
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			hellos.Add(1)
			return nil, nil
		},
		Certificates: []tls.Certificate{ca.keyPair(t, "backend", true)},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    clientCA.pool(),
	}
	var targets []string
	for _, name := range []string{"a", "b"} {
		ts, err := testserver.New(testserver.Config{Name: name, Logger: quiet,
			ServerOptions: []grpc.ServerOption{grpc.Creds(credentials.NewTLS(backendTLS))}})
		if err != nil {
			t.Fatal(err)
		}
		if err := ts.Start("127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(ts.Stop)
		targets = append(targets, ts.Addr())
	}
	dir := t.TempDir()
	clientCert, clientKey := clientCA.issue(t, "proxy", false)
	bt := cluster.BackendTLS{
		CAFile:   writeFile(t, dir, "ca.crt", ca.pem),
		CertFile: writeFile(t, dir, "tls.crt", clientCert),
		KeyFile:  writeFile(t, dir, "tls.key", clientKey),
	}
	hc := director.Config{HealthCheckInterval: 50 * time.Millisecond, HealthCheckService: testserver.ServiceName, UnhealthyThreshold: 1}
	for _, engine := range cluster.Engines() {
		for _, serverName := range []string{"", "localhost"} {
			t.Run(engine+"/server name "+serverName, func(t *testing.T) {
				bt := bt
				bt.ServerName = serverName
				start := hellos.Load()
				r := runServer(t, cluster.ServerConfig{Engine: engine, Cluster: cluster.Config{Targets: targets, BackendTLS: &bt, Director: hc}})
				client := dial(t, r.addr)
				for range 4 {
					if _, err := client.UnaryCall(t.Context(), &testgrpc.SimpleRequest{ResponseSize: 100}); err != nil {
						t.Fatalf("UnaryCall: %v", err)
					}
				}
				// A connection per backend for the calls, and one for the
				// health checks: a check in cleartext would make no TLS
				// handshake, and fail.
				testkit.WaitFor(testkit.Context(t, 10*time.Second), t, "health checks over TLS", func() bool { return hellos.Load()-start >= 4 })
				for _, b := range r.srv.Cluster().Backends() {
					if !b.Healthy {
						t.Errorf("backend %s unhealthy: the health checks do not use TLS", b.Addr)
					}
				}
			})
		}
	}
	t.Run("wrong server name", func(t *testing.T) {
		bt := bt
		bt.ServerName = "elsewhere"
		r := runServer(t, cluster.ServerConfig{Cluster: cluster.Config{Targets: targets, BackendTLS: &bt}})
		_, err := dial(t, r.addr).EmptyCall(t.Context(), &testgrpc.Empty{})
		if status.Code(err) != codes.Unavailable {
			t.Errorf("EmptyCall: %v, want UNAVAILABLE", err)
		}
	})
	t.Run("no client certificate", func(t *testing.T) {
		bt := cluster.BackendTLS{CAFile: bt.CAFile}
		r := runServer(t, cluster.ServerConfig{Cluster: cluster.Config{Targets: targets, BackendTLS: &bt}})
		_, err := dial(t, r.addr).EmptyCall(t.Context(), &testgrpc.Empty{})
		if status.Code(err) != codes.Unavailable {
			t.Errorf("EmptyCall: %v, want UNAVAILABLE", err)
		}
	})
}

// TestTLSMismatch checks the answers to a TLS client on the h2c port and
// an h2c client on the TLS port, and the Debug lines logged for them.
func TestTLSMismatch(t *testing.T) {
	ca := newCA(t, "ca")
	st := serverFiles(t, ca)
	ts := startBackend(t, "a", "127.0.0.1:0")
	var logs syncBuffer
	logger := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	plain := runServer(t, cluster.ServerConfig{Logger: logger, Cluster: cluster.Config{Targets: []string{ts.Addr()}}})
	secure := runServer(t, cluster.ServerConfig{Logger: logger, TLS: &st, Cluster: cluster.Config{Targets: []string{ts.Addr()}}})

	t.Run("TLS to h2c", func(t *testing.T) {
		_, err := dialTLS(t, plain.addr, &tls.Config{RootCAs: ca.pool()}).EmptyCall(t.Context(), &testgrpc.Empty{})
		if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "does not look like a TLS handshake") {
			t.Errorf("EmptyCall: %v, want UNAVAILABLE saying the server does not speak TLS", err)
		}
		// The client may see the answer before the proxy logs.
		testkit.WaitFor(testkit.Context(t, 10*time.Second), t, "a Debug line", func() bool {
			return strings.Contains(logs.String(), `level=DEBUG msg="connection rejected" component=proxy`) &&
				strings.Contains(logs.String(), "TLS handshake on a cleartext (h2c) port")
		})
	})
	t.Run("h2c to TLS", func(t *testing.T) {
		cc, err := grpc.NewClient("passthrough:///"+secure.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer cc.Close()
		_, err = testgrpc.NewTestServiceClient(cc).EmptyCall(t.Context(), &testgrpc.Empty{})
		if status.Code(err) != codes.Unavailable {
			t.Errorf("EmptyCall: %v, want UNAVAILABLE", err)
		}
		testkit.WaitFor(testkit.Context(t, 10*time.Second), t, "a Debug line", func() bool {
			return strings.Contains(logs.String(), "cleartext HTTP/2 (h2c) on a TLS port")
		})
	})
	t.Run("HTTP/1 to TLS", func(t *testing.T) {
		resp, err := http.Get("http://" + secure.addr + "/")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("GET over cleartext: %d, want 400", resp.StatusCode)
		}
	})
	t.Run("HTTP/1 over TLS", func(t *testing.T) {
		// No ALPN: the handshake succeeds, and the proxy reads an
		// HTTP/1.1 request where the HTTP/2 preface should be.
		conn, err := tls.Dial("tcp", secure.addr, &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(conn, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusHTTPVersionNotSupported || !strings.Contains(string(body), "h2 over TLS") {
			t.Errorf("GET over TLS: %d %q, want 505 naming h2 over TLS", resp.StatusCode, body)
		}
	})
}

// syncBuffer is a bytes.Buffer safe for the concurrent writes of a logger.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
