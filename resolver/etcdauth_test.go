package resolver

import (
	"context"
	"crypto/tls"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/streamlb/streamlb/internal/etcdtest"
	"github.com/streamlb/streamlb/internal/testkit"
)

// waitErr waits until u was told an error containing want, and returns it.
func (u *recUpdater) waitErr(ctx context.Context, t *testing.T, want string) error {
	t.Helper()
	var found error
	u.waitFor(ctx, t, "an error containing "+want, func() bool {
		_, errs := u.snapshot()
		for _, err := range errs {
			if strings.Contains(err.Error(), want) {
				found = err
				return true
			}
		}
		return false
	})
	return found
}

// errorsSince returns how many errors u was told.
func (u *recUpdater) errorCount() int {
	_, errs := u.snapshot()
	return len(errs)
}

// refused checks what a resolver that etcd refuses did: it told u an
// error that names the reason, logged a warning, pushed no set, and keeps
// trying (a second error). Its Run returning nil on cancel is checked by
// runResolver.
func refused(ctx context.Context, t *testing.T, u *recUpdater, logs *syncBuffer, reason string) {
	t.Helper()
	err := u.waitErr(ctx, t, reason)
	t.Logf("reported: %v", err)
	u.waitFor(ctx, t, "a second error (retried)", func() bool { return u.errorCount() >= 2 })
	if states, _ := u.snapshot(); len(states) != 0 {
		t.Errorf("sets pushed = %v, want none", states)
	}
	waitLog(ctx, t, logs, `level=WARN msg="etcd failed; keeping last set"`)
	if !strings.Contains(logs.String(), reason) {
		t.Errorf("warning does not name %q; logs:\n%s", reason, logs)
	}
}

// TestEtcdServerTLS runs the resolver against an embedded etcd serving its
// clients over TLS with a certificate of a CA made here: with that CA it
// follows registrations; with another CA it reports why it cannot
// connect; and when the server's certificate changes to one it does not
// trust, it keeps its set, says why, and recovers once the certificate is
// trusted again.
func TestEtcdServerTLS(t *testing.T) {
	// Not parallel: it restarts a server on fixed ports (see
	// TestEtcdOutageKeepsSet).
	dir := t.TempDir()
	ca, other := testkit.NewCA(t, "etcd-ca"), testkit.NewCA(t, "other-ca")
	cert, key := ca.WriteIssued(t, dir, "etcd", true)
	srv := etcdtest.StartWith(t, etcdtest.Options{CertFile: cert, KeyFile: key, ClientTLS: &tls.Config{RootCAs: ca.Pool()}})
	cli := srv.Client()
	ctx := testContext(t)
	const prefix = "kitex/registry-etcd/echo/"
	srv.Put(cli, prefix+"10.0.0.1:1", `{"network":"tcp","address":"10.0.0.1:1","weight":10}`)

	u := newRecUpdater()
	_, logs := startEtcdResolver(t, "etcd://"+srv.Endpoint()+"/kitex/registry-etcd/echo", EtcdOptions{CAFile: ca.WriteCA(t, dir, "etcd")}, u)
	u.waitSet(ctx, t, "10.0.0.1:1;weight=10")

	lease, err := cli.Grant(ctx, 10)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	srv.Put(cli, prefix+"10.0.0.2:1", `{"network":"tcp","address":"10.0.0.2:1","weight":10}`, clientv3.WithLease(lease.ID))
	u.waitSet(within(t, time.Second), t, "10.0.0.1:1;weight=10", "10.0.0.2:1;weight=10")
	t.Logf("registration → set over TLS: %v", time.Since(start))

	t.Run("wrong CA", func(t *testing.T) {
		w := newRecUpdater()
		_, wlogs := startEtcdResolver(t, "etcd://"+srv.Endpoint()+"/kitex/registry-etcd/echo", EtcdOptions{CAFile: other.WriteCA(t, dir, "other")}, w)
		refused(ctx, t, w, wlogs, "x509: certificate signed by unknown authority")
	})

	// The server comes back with a certificate of another CA.
	srv.Stop()
	rogueCert, rogueKey := other.WriteIssued(t, dir, "rogue", true)
	srv.SetCert(rogueCert, rogueKey)
	srv.Start()
	before := u.errorCount()
	u.waitFor(ctx, t, "an error naming the certificate", func() bool {
		_, errs := u.snapshot()
		for _, err := range errs[before:] {
			if strings.Contains(err.Error(), "certificate signed by unknown authority") {
				return true
			}
		}
		return false
	})
	if got, _ := u.last(); len(got) != 2 {
		t.Errorf("set while the server is not trusted = %v, want the last one kept", got)
	}

	srv.Stop()
	srv.SetCert(cert, key)
	srv.Start()
	cli2 := srv.Client()
	srv.Put(cli2, prefix+"10.0.0.3:1", `{"network":"tcp","address":"10.0.0.3:1","weight":10}`)
	u.waitSet(ctx, t, "10.0.0.1:1;weight=10", "10.0.0.2:1;weight=10", "10.0.0.3:1;weight=10")
	waitLog(ctx, t, logs, "etcd recovered")
	for _, s := range func() []State { s, _ := u.snapshot(); return s }() {
		if len(s.Addresses) == 0 {
			t.Errorf("an empty set was pushed")
		}
	}
}

// TestEtcdClientCertAuth runs the resolver against an embedded etcd that
// requires client certificates (--client-cert-auth): with a certificate of
// the trusted CA it follows the prefix; without one, or with one of
// another CA, it reports the server's refusal.
func TestEtcdClientCertAuth(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	ca, other := testkit.NewCA(t, "etcd-ca"), testkit.NewCA(t, "other-ca")
	caFile := ca.WriteCA(t, dir, "etcd")
	cert, key := ca.WriteIssued(t, dir, "etcd", true)
	adminPair, err := tls.X509KeyPair(ca.Issue(t, "admin", false))
	if err != nil {
		t.Fatal(err)
	}
	srv := etcdtest.StartWith(t, etcdtest.Options{
		CertFile: cert, KeyFile: key, ClientCertAuth: true, TrustedCAFile: caFile,
		ClientTLS: &tls.Config{RootCAs: ca.Pool(), Certificates: []tls.Certificate{adminPair}},
	})
	cli := srv.Client()
	ctx := testContext(t)
	srv.Put(cli, "svc/1", "10.0.0.1:80")
	target := "etcd://" + srv.Endpoint() + "/svc?format=go-zero"

	lbCert, lbKey := ca.WriteIssued(t, dir, "streamlb", false)
	u := newRecUpdater()
	startEtcdResolver(t, target, EtcdOptions{CAFile: caFile, CertFile: lbCert, KeyFile: lbKey}, u)
	u.waitSet(ctx, t, "10.0.0.1:80")
	start := time.Now()
	srv.Put(cli, "svc/2", "10.0.0.2:80")
	u.waitSet(within(t, time.Second), t, "10.0.0.1:80", "10.0.0.2:80")
	t.Logf("registration → set over mutual TLS: %v", time.Since(start))

	strangerCert, strangerKey := other.WriteIssued(t, dir, "stranger", false)
	for _, tc := range []struct {
		name   string
		opts   EtcdOptions
		reason string
	}{
		{"no client certificate", EtcdOptions{CAFile: caFile}, "remote error: tls: certificate required"},
		{"certificate of another CA", EtcdOptions{CAFile: caFile, CertFile: strangerCert, KeyFile: strangerKey}, "remote error: tls:"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			w := newRecUpdater()
			_, wlogs := startEtcdResolver(t, target, tc.opts, w)
			refused(ctx, t, w, wlogs, tc.reason)
		})
	}
}

// TestEtcdUserPassword runs the resolver against an embedded etcd with
// authentication on, as a user that may only read the service's prefix:
// the right password follows registrations; a wrong one is reported as
// such, retried, and never stops the resolver (it follows once the
// password is changed to the one it has); a resolver whose password was
// changed under it keeps its set and says why; a prefix the user may not
// read is reported as denied.
func TestEtcdUserPassword(t *testing.T) {
	t.Parallel()
	srv := etcdtest.Start(t)
	etcdtest.EnableAuth(t, srv.Client(), "rootpw", "lb", "s3cret", "svc/")
	root := srv.ClientAs("root", "rootpw")
	ctx := testContext(t)
	srv.Put(root, "svc/1", "10.0.0.1:80")
	target := "etcd://" + srv.Endpoint() + "/svc?format=go-zero"

	u := newRecUpdater()
	_, logs := startEtcdResolver(t, target, EtcdOptions{Username: "lb", Password: "s3cret"}, u)
	u.waitSet(ctx, t, "10.0.0.1:80")
	start := time.Now()
	srv.Put(root, "svc/2", "10.0.0.2:80")
	u.waitSet(within(t, time.Second), t, "10.0.0.1:80", "10.0.0.2:80")
	t.Logf("registration → set with a password: %v", time.Since(start))

	denied := newRecUpdater()
	_, dlogs := startEtcdResolver(t, "etcd://"+srv.Endpoint()+"/other", EtcdOptions{Username: "lb", Password: "s3cret"}, denied)
	refused(ctx, t, denied, dlogs, "permission denied")

	w := newRecUpdater()
	_, wlogs := startEtcdResolver(t, target, EtcdOptions{Username: "lb", Password: "hunter2"}, w)
	refused(ctx, t, w, wlogs, "authentication failed")

	// The operator changes lb's password to the one w has: w follows,
	// and u, whose password no longer works, keeps its set.
	if _, err := root.UserChangePassword(ctx, "lb", "hunter2"); err != nil {
		t.Fatal(err)
	}
	w.waitSet(ctx, t, "10.0.0.1:80", "10.0.0.2:80")
	waitLog(ctx, t, wlogs, "etcd recovered")
	u.waitErr(ctx, t, "authentication failed")
	srv.Put(root, "svc/3", "10.0.0.3:80")
	w.waitSet(ctx, t, "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80")
	if got, _ := u.last(); len(got) != 2 {
		t.Errorf("set of the resolver whose password is wrong now = %v, want the last one kept", got)
	}
	waitLog(ctx, t, logs, `level=WARN msg="etcd failed; keeping last set"`)
}
