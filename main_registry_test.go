package main

import (
	"context"
	"crypto/tls"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/go-zookeeper/zk"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"

	"github.com/streamlb/streamlb/internal/etcdtest"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/internal/zktest"
	"github.com/streamlb/streamlb/testserver"
)

// registryProxyRun runs `streamlb proxy` with args on a registry into
// which register puts backends, and checks the story end to end: calls
// reach the first backend, a second one registered gets calls within a
// second, and once deregistered it gets none, with no call failing.
func registryProxyRun(t *testing.T, args []string, register func(ctx context.Context, addr string) (*testserver.Registration, error)) {
	t.Helper()
	quiet := slog.New(slog.DiscardHandler)
	ctx := testkit.Context(t, 60*time.Second)
	backend := func(name string) *testserver.Server {
		ts, err := testserver.New(testserver.Config{Name: name, Logger: quiet})
		if err != nil {
			t.Fatal(err)
		}
		if err := ts.Start("127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(ts.Stop)
		return ts
	}
	a, b := backend("a"), backend("b")
	regA, err := register(ctx, a.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(regA.Abandon)

	app := startApp(ctx, t, append([]string{"proxy", "--listen", "127.0.0.1:0",
		"--drain-timeout", "5s", "--log-format", "json"}, args...), "listening")
	addr := app.wait(ctx, t)["listening"].Addr
	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	client := testgrpc.NewTestServiceClient(cc)

	var failed []error
	// call makes one call and returns the backend it landed on.
	call := func() string {
		var hdr metadata.MD
		if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}, grpc.Header(&hdr)); err != nil {
			failed = append(failed, err)
			return ""
		}
		return testserver.BackendFromHeader(hdr)
	}
	// until calls until one lands on want, at most 100000 calls.
	until := func(want string) {
		t.Helper()
		for range 100000 {
			if call() == want || ctx.Err() != nil {
				return
			}
		}
	}
	until("a")

	regAt := time.Now()
	regB, err := register(ctx, b.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(regB.Abandon)
	until("b")
	if ctx.Err() != nil {
		t.Fatal("no call reached b")
	}
	d := time.Since(regAt)
	t.Logf("registration → first call through the proxy: %v", d)
	// The watch delivers in milliseconds (7-39 ms measured, README); the
	// bound is loose because this runs beside the whole suite under -race
	// (1.65 s at a load average of 20), and a registry that is only
	// listed again later, or never, fails it all the same.
	if d > 5*time.Second {
		t.Errorf("first call on b %v after its registration, want within 5s", d)
	}

	deregAt := time.Now()
	if err := regB.Deregister(ctx); err != nil {
		t.Fatal(err)
	}
	// b is drained: after a while only a gets calls.
	lastB := deregAt
	for i := 0; i < 100000 && ctx.Err() == nil && time.Since(lastB) < 500*time.Millisecond; i++ {
		if call() == "b" {
			lastB = time.Now()
		}
	}
	if lastB.Equal(deregAt) {
		t.Logf("deregistration → no call on b after it")
	} else {
		t.Logf("deregistration → last call on b: %v", lastB.Sub(deregAt))
	}
	if ctx.Err() != nil {
		t.Fatal("b kept getting calls after its deregistration")
	}
	if len(failed) != 0 {
		t.Errorf("%d calls failed, want 0; first: %v", len(failed), failed[0])
	}

	if err := app.shutdown(t); err != nil {
		t.Errorf("proxy command returned %v, want nil", err)
	}
}

// TestProxyCommandEtcdTLSAuth runs `streamlb proxy` on an etcd that takes
// clients only over TLS, with a client certificate, and with a password
// (--etcd-ca, --etcd-cert, --etcd-key, --etcd-username and
// STREAMLB_ETCD_PASSWORD), as a read-only user, while backends register as
// Kitex does with the same TLS and an account that may write.
func TestProxyCommandEtcdTLSAuth(t *testing.T) {
	// Not parallel: the command sets the slog default logger and
	// urfave/cli/v2 mutates package globals; t.Setenv.
	prev := slog.Default()
	t.Cleanup(func() { slog.SetDefault(prev) })
	dir := t.TempDir()
	ca := testkit.NewCA(t, "etcd-ca")
	caFile := ca.WriteCA(t, dir, "etcd")
	cert, key := ca.WriteIssued(t, dir, "etcd", true)
	servicePair, err := tls.X509KeyPair(ca.Issue(t, "echo-service", false))
	if err != nil {
		t.Fatal(err)
	}
	serviceTLS := &tls.Config{RootCAs: ca.Pool(), Certificates: []tls.Certificate{servicePair}}
	srv := etcdtest.StartWith(t, etcdtest.Options{CertFile: cert, KeyFile: key, ClientCertAuth: true, TrustedCAFile: caFile, ClientTLS: serviceTLS})
	const prefix = "kitex/registry-etcd/echo"
	etcdtest.EnableAuth(t, srv.Client(), "rootpw", "streamlb", "s3cret", prefix+"/")
	lbCert, lbKey := ca.WriteIssued(t, dir, "streamlb", false)
	target := "etcd://" + srv.Endpoint() + "/" + prefix

	t.Setenv("STREAMLB_ETCD_PASSWORD", "s3cret")
	registryProxyRun(t, []string{"--backend", target,
		"--etcd-ca", caFile, "--etcd-cert", lbCert, "--etcd-key", lbKey, "--etcd-username", "streamlb"},
		func(ctx context.Context, addr string) (*testserver.Registration, error) {
			return testserver.RegisterEtcd(ctx, target, addr, testserver.RegisterOptions{
				TTL: 10 * time.Second, TLS: serviceTLS, Username: "root", Password: "rootpw",
			})
		})
}

// TestProxyCommandZKTLSDigest runs `streamlb proxy` on the TLS port of a
// real ZooKeeper that requires client certificates (--zk-ca, --zk-cert,
// --zk-key), on a path whose nodes only digest user svc may read
// (--zk-username and STREAMLB_ZK_PASSWORD), while backends register over
// the same TLS with the same credentials, which put that digest ACL on
// their nodes.
func TestProxyCommandZKTLSDigest(t *testing.T) {
	prev := slog.Default()
	t.Cleanup(func() { slog.SetDefault(prev) })
	dir := t.TempDir()
	ca := testkit.NewCA(t, "zk-ca")
	caFile := ca.WriteCA(t, dir, "zk")
	zks := zktest.StartWith(t, zktest.Options{Keystore: ca.WriteKeystore(t, dir, "zk"), Truststore: caFile, ClientAuth: "need"})
	servicePair, err := tls.X509KeyPair(ca.Issue(t, "echo-service", false))
	if err != nil {
		t.Fatal(err)
	}
	target := "zk://" + zks.SecureAddr() + "/secure/kitex/echo"
	creds := testserver.RegisterOptions{
		TTL: 4 * time.Second, Username: "svc", Password: "s3cret",
		TLS: &tls.Config{RootCAs: ca.Pool(), Certificates: []tls.Certificate{servicePair}},
	}

	// The registration's node is indeed closed to a session without
	// the credentials.
	ctx := testkit.Context(t, 30*time.Second)
	probe, err := testserver.RegisterZK(ctx, target, "127.0.0.1:1", creds)
	if err != nil {
		t.Fatal(err)
	}
	conn, _, err := zk.Connect([]string{zks.Addr()}, 4*time.Second, zk.WithLogInfo(false), zk.WithLogger(nopLogger{}))
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = conn.Children("/secure/kitex/echo")
	conn.Close()
	if err != zk.ErrNoAuth {
		t.Errorf("listing the registry without credentials: err = %v, want %v", err, zk.ErrNoAuth)
	}
	if err := probe.Deregister(ctx); err != nil {
		t.Fatal(err)
	}

	cert, key := ca.WriteIssued(t, dir, "streamlb", false)
	t.Setenv("STREAMLB_ZK_PASSWORD", "s3cret")
	registryProxyRun(t, []string{"--backend", target, "--zk-username", "svc",
		"--zk-ca", caFile, "--zk-cert", cert, "--zk-key", key},
		func(ctx context.Context, addr string) (*testserver.Registration, error) {
			return testserver.RegisterZK(ctx, target, addr, creds)
		})
}

type nopLogger struct{}

func (nopLogger) Printf(string, ...any) {}

// TestTestserverRegisterZKTLSDigest runs `streamlb testserver --register
// zk://...` with the registry flags, as a demo of an ACL-protected registry
// would: over ZooKeeper's TLS port with a client certificate, with digest
// credentials. The node it registers is readable with those credentials
// only, and is gone once the command is stopped.
func TestTestserverRegisterZKTLSDigest(t *testing.T) {
	prev := slog.Default()
	t.Cleanup(func() { slog.SetDefault(prev) })
	dir := t.TempDir()
	ca := testkit.NewCA(t, "zk-ca")
	caFile := ca.WriteCA(t, dir, "zk")
	zks := zktest.StartWith(t, zktest.Options{Keystore: ca.WriteKeystore(t, dir, "zk"), Truststore: caFile, ClientAuth: "need"})
	cert, key := ca.WriteIssued(t, dir, "echo-service", false)
	ctx := testkit.Context(t, 60*time.Second)

	t.Setenv("STREAMLB_ZK_PASSWORD", "s3cret")
	app := startApp(ctx, t, []string{"testserver", "--name", "t1", "--listen", "127.0.0.1:0",
		"--register", "zk://" + zks.SecureAddr() + "/secure/echo", "--register-ttl", "4s",
		"--zk-username", "svc", "--zk-ca", caFile, "--zk-cert", cert, "--zk-key", key, "--log-format", "json"}, "registered")
	node := app.wait(ctx, t)["registered"].Key

	conn, _, err := zk.Connect([]string{zks.Addr()}, 4*time.Second, zk.WithLogInfo(false), zk.WithLogger(nopLogger{}))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, _, err := conn.Get(node); err != zk.ErrNoAuth {
		t.Errorf("get %s without credentials: err = %v, want %v", node, err, zk.ErrNoAuth)
	}
	if err := conn.AddAuth("digest", []byte("svc:s3cret")); err != nil {
		t.Fatal(err)
	}
	data, _, err := conn.Get(node)
	if err != nil || !strings.Contains(string(data), `"Weight":10`) {
		t.Errorf("get %s with svc's credentials = %q, %v; want Kitex's data", node, data, err)
	}

	// As SIGTERM would: deregisters, then drains.
	if err := app.shutdown(t); err != nil {
		t.Errorf("testserver returned %v, want nil", err)
	}
	if ok, _, err := conn.Exists(node); err != nil || ok {
		t.Errorf("%s exists = %v, %v after the testserver stopped; want gone", node, ok, err)
	}
}
