package cluster_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/streamlb/streamlb/internal/etcdtest"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// TestEtcdRegistrationEndToEnd runs the registry story on an etcd://
// target: the killed backend's lease lapses and etcd deletes its key; its
// last call comes within a second of that.
func TestEtcdRegistrationEndToEnd(t *testing.T) {
	etcd := etcdtest.Start(t)
	cli := etcd.Client()
	registryStory{
		target:   "etcd://" + etcd.Endpoint() + "/kitex/registry-etcd/echo",
		register: testserver.RegisterEtcd,
		ttl:      10 * time.Second,
		gone: func(ctx context.Context, t *testing.T, reg *testserver.Registration) time.Time {
			wch := cli.Watch(ctx, reg.Key())
			reg.Abandon()
			for resp := range wch {
				if len(resp.Events) > 0 && resp.Events[0].Type == clientv3.EventTypeDelete {
					return time.Now()
				}
			}
			t.Fatal("the abandoned key was never deleted")
			return time.Time{}
		},
		within: time.Second,
	}.run(t)
}

// TestEtcdConfigFileTLSAuth runs a configuration file whose cluster
// follows an etcd that takes clients only over TLS with a client
// certificate and a password: the cluster's etcd block names the files and
// the user, and password_env the environment variable with the password.
func TestEtcdConfigFileTLSAuth(t *testing.T) {
	// Not parallel: t.Setenv.
	dir := t.TempDir()
	ca := testkit.NewCA(t, "etcd-ca")
	caFile := ca.WriteCA(t, dir, "etcd")
	cert, key := ca.WriteIssued(t, dir, "etcd", true)
	pair, err := tls.X509KeyPair(ca.Issue(t, "echo-service", false))
	if err != nil {
		t.Fatal(err)
	}
	serviceTLS := &tls.Config{RootCAs: ca.Pool(), Certificates: []tls.Certificate{pair}}
	etcd := etcdtest.StartWith(t, etcdtest.Options{CertFile: cert, KeyFile: key, ClientCertAuth: true, TrustedCAFile: caFile, ClientTLS: serviceTLS})
	const prefix = "kitex/registry-etcd/echo"
	etcdtest.EnableAuth(t, etcd.Client(), "rootpw", "streamlb", "s3cret", prefix+"/")
	target := "etcd://" + etcd.Endpoint() + "/" + prefix
	ctx := testkit.Context(t, 30*time.Second)
	register := func(ts *testserver.Server) {
		t.Helper()
		reg, err := testserver.RegisterEtcd(ctx, target, ts.Addr(), testserver.RegisterOptions{TLS: serviceTLS, Username: "root", Password: "rootpw"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(reg.Abandon)
	}
	a, b := startBackend(t, "a", "127.0.0.1:0"), startBackend(t, "b", "127.0.0.1:0")
	register(a)

	lbCert, lbKey := ca.WriteIssued(t, dir, "streamlb", false)
	t.Setenv("STREAMLB_TEST_ETCD_PASSWORD", "s3cret")
	path := writeConfig(t, dir, fmt.Sprintf(`
clusters:
  - name: echo
    targets: [%q]
    etcd: {ca: %s, cert: %s, key: %s, username: streamlb, password_env: STREAMLB_TEST_ETCD_PASSWORD}
routes:
  - cluster: echo
`, target, caFile, lbCert, lbKey))
	r := runFile(t, path, false)
	client := dial(t, r.addr)
	seen := map[string]bool{}
	testkit.WaitFor(ctx, t, "calls on a", func() bool {
		got, err := backendOf(ctx, client)
		if err != nil {
			t.Fatalf("call: %v", err)
		}
		seen[got] = true
		return seen["a"]
	})
	register(b)
	testkit.WaitFor(ctx, t, "calls on b", func() bool {
		got, err := backendOf(ctx, client)
		if err != nil {
			t.Fatalf("call: %v", err)
		}
		return got == "b"
	})
}
