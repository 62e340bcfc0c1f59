package resolver

import (
	"context"
	"crypto/tls"
	"os"
	"os/exec"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/streamlb/streamlb/internal/etcdtest"
	"github.com/streamlb/streamlb/internal/testkit"
)

// TestEtcdDebianServer runs the resolver against the etcd server Debian
// ships (package etcd-server, an older 3.4 release), not only the embedded
// one of the client's own version: list, watch, a registration, a removal
// and a lease that runs out. It skips when etcd is not installed, unless
// STREAMLB_REQUIRE_ETCD=1 (as CI sets it).
func TestEtcdDebianServer(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	client, cli := startDebianEtcd(t, nil, nil)
	put := func(key, value string, opts ...clientv3.OpOption) {
		t.Helper()
		if _, err := cli.Put(ctx, key, value, opts...); err != nil {
			t.Fatal(err)
		}
	}
	put("kitex/registry-etcd/echo/10.0.0.1:8888", kitexValue)

	u := newRecUpdater()
	startEtcdResolver(t, "etcd://"+client+"/kitex/registry-etcd/echo", EtcdOptions{}, u)
	u.waitSet(ctx, t, "10.0.0.1:8888;weight=25")

	// A registration with a lease, as Kitex does, then the lease runs out.
	lease, err := cli.Grant(ctx, 2)
	if err != nil {
		t.Fatal(err)
	}
	put("kitex/registry-etcd/echo/10.0.0.2:8888", `{"network":"tcp","address":"10.0.0.2:8888","weight":10}`, clientv3.WithLease(lease.ID))
	u.waitSet(ctx, t, "10.0.0.1:8888;weight=25", "10.0.0.2:8888;weight=10")
	expiring := time.Now()
	u.waitSet(ctx, t, "10.0.0.1:8888;weight=25")
	t.Logf("lease of 2s: registration removed %v after it appeared", time.Since(expiring).Round(10*time.Millisecond))

	// A deregistration.
	if _, err := cli.Delete(ctx, "kitex/registry-etcd/echo/10.0.0.1:8888"); err != nil {
		t.Fatal(err)
	}
	u.waitSet(ctx, t)
}

// startDebianEtcd starts Debian's etcd (skipping t if it is not installed,
// unless STREAMLB_REQUIRE_ETCD=1) on two free loopback ports with the extra
// flags, waits until it answers a client with TLS configuration tc (nil:
// cleartext) and returns its client address and that client.
func startDebianEtcd(t *testing.T, tc *tls.Config, extra []string) (string, *clientv3.Client) {
	t.Helper()
	bin, err := exec.LookPath("etcd")
	if err != nil {
		if os.Getenv("STREAMLB_REQUIRE_ETCD") == "1" {
			t.Fatalf("etcd not found but STREAMLB_REQUIRE_ETCD=1: %v", err)
		}
		t.Skipf("etcd not installed (%v); apt-get install etcd-server, or set STREAMLB_REQUIRE_ETCD=1 to require it", err)
	}
	ctx := testContext(t)
	scheme := "http"
	if tc != nil {
		scheme = "https"
	}
	client, peer := testkit.FreeAddr(t), testkit.FreeAddr(t)
	args := append([]string{
		"--name", "streamlb-test",
		"--data-dir", t.TempDir(),
		"--listen-client-urls", scheme + "://" + client,
		"--advertise-client-urls", scheme + "://" + client,
		"--listen-peer-urls", "http://" + peer,
		"--initial-advertise-peer-urls", "http://" + peer,
		"--initial-cluster", "streamlb-test=http://" + peer,
		"--log-level", "error",
	}, extra...)
	cmd := exec.Command(bin, args...)
	var stderr syncBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{client}, TLS: tc, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	// Wait for the server to answer.
	for {
		rctx, cancel := context.WithTimeout(ctx, time.Second)
		_, err := cli.Get(rctx, "ping")
		cancel()
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("etcd at %s never answered: %v; its log:\n%s", client, err, &stderr)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return client, cli
}

// TestEtcdDebianServerTLSAuth runs the resolver against Debian's etcd 3.4
// with everything a production cluster turns on: TLS with a CA made here,
// client certificates required (--client-cert-auth) and authentication,
// the resolver logging in as a user that may only read the prefix. It
// follows a registration, and a wrong password or a missing client
// certificate is reported as such.
func TestEtcdDebianServerTLSAuth(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	ca := testkit.NewCA(t, "etcd-ca")
	caFile := ca.WriteCA(t, dir, "etcd")
	cert, key := ca.WriteIssued(t, dir, "etcd", true)
	adminPair, err := tls.X509KeyPair(ca.Issue(t, "admin", false))
	if err != nil {
		t.Fatal(err)
	}
	tc := &tls.Config{RootCAs: ca.Pool(), Certificates: []tls.Certificate{adminPair}}
	client, cli := startDebianEtcd(t, tc, []string{
		"--cert-file", cert, "--key-file", key,
		"--client-cert-auth", "--trusted-ca-file", caFile,
	})
	ctx := testContext(t)
	etcdtest.EnableAuth(t, cli, "rootpw", "lb", "s3cret", "svc/")
	root, err := clientv3.New(clientv3.Config{Endpoints: []string{client}, TLS: tc, Username: "root", Password: "rootpw", DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { root.Close() })
	if _, err := root.Put(ctx, "svc/1", "10.0.0.1:80"); err != nil {
		t.Fatal(err)
	}

	target := "etcd://" + client + "/svc?format=go-zero"
	lbCert, lbKey := ca.WriteIssued(t, dir, "streamlb", false)
	good := EtcdOptions{CAFile: caFile, CertFile: lbCert, KeyFile: lbKey, Username: "lb", Password: "s3cret"}
	u := newRecUpdater()
	startEtcdResolver(t, target, good, u)
	u.waitSet(ctx, t, "10.0.0.1:80")
	start := time.Now()
	if _, err := root.Put(ctx, "svc/2", "10.0.0.2:80"); err != nil {
		t.Fatal(err)
	}
	u.waitSet(within(t, time.Second), t, "10.0.0.1:80", "10.0.0.2:80")
	t.Logf("etcd 3.4, TLS + client certificate + password: registration → set: %v", time.Since(start))

	wrongPassword, noCert := good, good
	wrongPassword.Password = "hunter2"
	noCert.CertFile, noCert.KeyFile = "", ""
	for _, tc := range []struct {
		name   string
		opts   EtcdOptions
		reason string
	}{
		{"wrong password", wrongPassword, "authentication failed"},
		{"no client certificate", noCert, "remote error: tls:"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			w := newRecUpdater()
			_, wlogs := startEtcdResolver(t, target, tc.opts, w)
			refused(ctx, t, w, wlogs, tc.reason)
		})
	}
}
