package resolver

import (
	"testing"
	"time"

	"github.com/go-zookeeper/zk"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/internal/zktest"
)

// TestZKTLS runs the resolver against the real ZooKeeper's TLS port
// (secureClientPort, Netty) with a certificate of a CA made here, client
// certificates required (ssl.clientAuth=need) and digest credentials on
// top: it follows registrations; with another CA, or without a client
// certificate, it reports why it cannot connect and keeps trying.
func TestZKTLS(t *testing.T) {
	dir := t.TempDir()
	ca, other := testkit.NewCA(t, "zk-ca"), testkit.NewCA(t, "other-ca")
	caFile := ca.WriteCA(t, dir, "zk")
	srv := zktest.StartWith(t, zktest.Options{Keystore: ca.WriteKeystore(t, dir, "zk"), Truststore: caFile, ClientAuth: "need"})
	ctx := testContext(t)
	acl := zk.DigestACL(zk.PermAll, "svc", "s3cret")
	c := newZKClient(t, srv.Addr(), 2*time.Second) // the cleartext port, for the test's writes
	c.addAuth("svc", "s3cret")
	c.createACL("/tls/echo/10.0.0.1:80", `{"Weight":10,"Tags":{}}`, 0, acl)
	target := "zk://" + srv.SecureAddr() + "/tls/echo"
	cert, key := ca.WriteIssued(t, dir, "streamlb", false)

	u := newRecUpdater()
	startZKResolverOpts(t, target, ZKOptions{CAFile: caFile, CertFile: cert, KeyFile: key, Username: "svc", Password: "s3cret"}, nil, u)
	u.waitSet(ctx, t, "10.0.0.1:80;weight=10")
	start := time.Now()
	c.createACL("/tls/echo/10.0.0.2:80", `{"Weight":10,"Tags":{}}`, zk.FlagEphemeral, acl)
	u.waitSet(within(t, time.Second), t, "10.0.0.1:80;weight=10", "10.0.0.2:80;weight=10")
	t.Logf("registration → set over TLS: %v", time.Since(start))

	for _, tc := range []struct {
		name   string
		opts   ZKOptions
		reason string
	}{
		{"wrong CA", ZKOptions{CAFile: other.WriteCA(t, dir, "other"), CertFile: cert, KeyFile: key}, "x509: certificate signed by unknown authority"},
		{"no client certificate", ZKOptions{CAFile: caFile}, "remote error: tls:"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newRecUpdater()
			wlogs := startZKResolverOpts(t, target, tc.opts, nil, w)
			zkRefused(ctx, t, w, wlogs, tc.reason)
		})
	}
}
