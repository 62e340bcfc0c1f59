package cluster_test

import (
	"crypto/tls"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/etcdtest"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// TestH1EtcdClientCertRotated: the proxy reaches etcd with a client
// certificate (etcd's --client-cert-auth). The certificate is rotated
// in place, as cert-manager or a Kubernetes Secret does, to one of a new
// client CA, which etcd then trusts alone (restarted to load it). The
// operator sends SIGHUP (here Reload). The cluster's registry client
// still presents the old certificate: read once when the cluster was
// built, and a reload keeps the cluster (its settings, the file paths,
// did not change), so it never reconnects and never sees the backend
// registered after the rotation; only a restart helps. The backend
// client certificate, by contrast, is read again when it changes
// (README, TLS).
func TestH1EtcdClientCertRotated(t *testing.T) {
	dir := t.TempDir()
	serverCA, ca1, ca2 := testkit.NewCA(t, "etcd-server-ca"), testkit.NewCA(t, "client-ca-1"), testkit.NewCA(t, "client-ca-2")
	serverCAFile := serverCA.WriteCA(t, dir, "server")
	trusted := testkit.WriteFile(t, dir, "trusted.pem", ca1.PEM)
	cert, key := serverCA.WriteIssued(t, dir, "etcd", true)
	serviceTLS := func(ca *testkit.CA) *tls.Config {
		pair, err := tls.X509KeyPair(ca.Issue(t, "echo-service", false))
		if err != nil {
			t.Fatal(err)
		}
		return &tls.Config{RootCAs: serverCA.Pool(), Certificates: []tls.Certificate{pair}}
	}
	etcd := etcdtest.StartWith(t, etcdtest.Options{CertFile: cert, KeyFile: key, ClientCertAuth: true, TrustedCAFile: trusted, ClientTLS: serviceTLS(ca1)})
	target := "etcd://" + etcd.Endpoint() + "/kitex/registry-etcd/echo"
	ctx := testkit.Context(t, 60*time.Second)
	register := func(ts *testserver.Server, tc *tls.Config) {
		t.Helper()
		reg, err := testserver.RegisterEtcd(ctx, target, ts.Addr(), testserver.RegisterOptions{TLS: tc, TTL: 30 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(reg.Abandon)
	}
	a, b := startBackend(t, "a", "127.0.0.1:0"), startBackend(t, "b", "127.0.0.1:0")
	register(a, serviceTLS(ca1))

	lbCert, lbKey := ca1.WriteIssued(t, dir, "streamlb", false)
	path := writeConfig(t, dir, fmt.Sprintf(`
clusters:
  - name: echo
    targets: [%q]
    etcd: {ca: %s, cert: %s, key: %s}
routes:
  - cluster: echo
`, target, serverCAFile, lbCert, lbKey))
	r := runFile(t, path, false)
	client := dial(t, r.addr)
	testkit.WaitFor(ctx, t, "calls on a", func() bool {
		got, err := backendOf(ctx, client)
		return err == nil && got == "a"
	})

	// The rotation: the proxy's files first, then etcd's trust, then
	// SIGHUP.
	c2, k2 := ca2.Issue(t, "streamlb", false)
	for p, data := range map[string][]byte{lbCert + ".tmp": c2, lbKey + ".tmp": k2} {
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []string{lbCert, lbKey} {
		if err := os.Rename(p+".tmp", p); err != nil {
			t.Fatal(err)
		}
	}
	etcd.Stop()
	if err := os.WriteFile(filepath.Join(dir, "trusted.pem"), ca2.PEM, 0o600); err != nil {
		t.Fatal(err)
	}
	etcd.Start()
	if err := r.srv.Reload(ctx); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	register(b, serviceTLS(ca2))
	seesB := func(client testgrpc.TestServiceClient) (string, bool, error) {
		deadline := time.Now().Add(15 * time.Second)
		for {
			got, err := backendOf(ctx, client)
			if err == nil && got == "b" {
				return got, true, err
			}
			if time.Now().After(deadline) {
				return got, false, err
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	if got, ok, err := seesB(client); !ok {
		t.Errorf("no call on b, registered after the client certificate's rotation and a reload, within 15s (last: %q, %v)", got, err)
	}
	// The files are right: a proxy started now from them sees b.
	if got, ok, err := seesB(dial(t, runFile(t, path, false).addr)); !ok {
		t.Fatalf("a proxy started after the rotation sees no b either (last: %q, %v): the test's rotation is wrong", got, err)
	}
}
