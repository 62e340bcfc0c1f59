package resolver

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/go-zookeeper/zk"

	"github.com/streamlb/streamlb/internal/zktest"
)

// addAuth adds digest credentials to c's session.
func (c *zkClient) addAuth(user, password string) {
	c.t.Helper()
	if err := c.conn.AddAuth("digest", []byte(user+":"+password)); err != nil {
		c.t.Fatalf("addauth digest %s: %v", user, err)
	}
}

// createACL makes p with data and acl, creating missing parents with acl.
func (c *zkClient) createACL(p, data string, flags int32, acl []zk.ACL) {
	c.t.Helper()
	parts := strings.Split(strings.Trim(p, "/"), "/")
	for i := 1; i < len(parts); i++ {
		parent := "/" + strings.Join(parts[:i], "/")
		if _, err := c.conn.Create(parent, nil, 0, acl); err != nil && err != zk.ErrNodeExists {
			c.t.Fatalf("create %s: %v", parent, err)
		}
	}
	if _, err := c.conn.Create(p, []byte(data), flags, acl); err != nil {
		c.t.Fatalf("create %s: %v", p, err)
	}
}

func startZKResolverOpts(t *testing.T, target string, opts ZKOptions, dial zk.Dialer, u Updater) *syncBuffer {
	t.Helper()
	opts.SessionTimeout, opts.ConnectTimeout = 2*time.Second, time.Second
	opts.BackoffInitial, opts.BackoffMax = 100*time.Millisecond, 500*time.Millisecond
	var logs *syncBuffer
	opts.Logger, logs = logCapture()
	z, err := NewZK(mustTarget(t, target), opts)
	if err != nil {
		t.Fatal(err)
	}
	z.dialer = dial
	runResolver(t, z, u)
	return logs
}

// zkRefused checks what a resolver that ZooKeeper's ACL refuses did: it
// told u an error naming the reason, logged a warning, pushed no set and
// keeps trying.
func zkRefused(ctx context.Context, t *testing.T, u *recUpdater, logs *syncBuffer, reason string) {
	t.Helper()
	err := u.waitErr(ctx, t, reason)
	t.Logf("reported: %v", err)
	u.waitFor(ctx, t, "a second error (retried)", func() bool { return u.errorCount() >= 2 })
	if states, _ := u.snapshot(); len(states) != 0 {
		t.Errorf("sets pushed = %v, want none", states)
	}
	waitLog(ctx, t, logs, `level=WARN msg="zookeeper failed; keeping last set"`)
}

// TestZKDigestAuth runs the resolver against a real ZooKeeper whose
// service nodes are protected by a digest ACL (only user svc may read
// them): with svc's credentials it lists and follows them; with a wrong
// password or none it reports NOAUTH and what it means, and keeps trying;
// when the ACL changes under a running resolver it keeps its set (once it
// lists again); a child
// locked away from it is skipped with a warning, not the whole list.
func TestZKDigestAuth(t *testing.T) {
	srv := zktest.Start(t)
	ctx := testContext(t)
	acl := zk.DigestACL(zk.PermAll, "svc", "s3cret")
	c := newZKClient(t, srv.Addr(), 2*time.Second)
	c.addAuth("svc", "s3cret")
	c.addAuth("admin", "adminpw") // for the nodes the test locks away from svc
	c.createACL("/secure/echo/10.0.0.1:80", `{"Weight":10,"Tags":{}}`, 0, acl)
	target := "zk://" + srv.Addr() + "/secure/echo"

	d := &cuttableDialer{}
	u := newRecUpdater()
	logs := startZKResolverOpts(t, target, ZKOptions{Username: "svc", Password: "s3cret"}, d.dial, u)
	u.waitSet(ctx, t, "10.0.0.1:80;weight=10")
	start := time.Now()
	c.createACL("/secure/echo/10.0.0.2:80", `{"Weight":10,"Tags":{}}`, zk.FlagEphemeral, acl)
	u.waitSet(within(t, time.Second), t, "10.0.0.1:80;weight=10", "10.0.0.2:80;weight=10")
	t.Logf("registration → set with digest auth: %v", time.Since(start))

	t.Run("wrong password", func(t *testing.T) {
		w := newRecUpdater()
		wlogs := startZKResolverOpts(t, target, ZKOptions{Username: "svc", Password: "hunter2"}, nil, w)
		zkRefused(ctx, t, w, wlogs, `zk: not authenticated (the ACL does not grant READ to digest user "svc"`)
	})
	t.Run("no credentials", func(t *testing.T) {
		w := newRecUpdater()
		wlogs := startZKResolverOpts(t, target, ZKOptions{}, nil, w)
		zkRefused(ctx, t, w, wlogs, "zk: not authenticated (the ACL requires credentials and none were given)")
	})

	// A child only admin may read: skipped with one warning, the rest
	// followed.
	c.createACL("/secure/echo/10.0.0.9:80", `{"Weight":10,"Tags":{}}`, 0, zk.DigestACL(zk.PermAll, "admin", "adminpw"))
	c.createACL("/secure/echo/10.0.0.3:80", `{"Weight":10,"Tags":{}}`, 0, acl)
	u.waitSet(ctx, t, "10.0.0.1:80;weight=10", "10.0.0.2:80;weight=10", "10.0.0.3:80;weight=10")
	waitLog(ctx, t, logs, "skipping zookeeper node: its ACL does not let this session read it")
	if n := strings.Count(logs.String(), "node=/secure/echo/10.0.0.9:80"); n != 1 {
		t.Errorf("%d warnings for the locked node, want 1; logs:\n%s", n, logs)
	}

	if raceEnabled {
		// go-zookeeper v1.0.4 (the newest release) races with itself when
		// a session with credentials and watches reconnects: Conn.loop's
		// sendSetWatches reads lastZxid (conn.go:614) while recvLoop
		// writes it for the re-sent auth's answer (conn.go:849). The rest
		// runs without the race detector (.ci/run runs it so).
		t.Log("skipping the reconnection with credentials under -race: a data race inside go-zookeeper v1.0.4")
		return
	}
	// The service node's ACL changes to admin only. Debian's ZooKeeper
	// (3.8.0-11+deb12u2) then no longer delivers the node's child watch to
	// a session that may not read it (seen here; newer ZooKeepers check
	// the ACL before delivering watches since CVE-2024-23944), so the
	// resolver learns of it at its next list: here after its connection
	// is cut and comes back. That list is refused, and the set is kept.
	if _, err := c.conn.SetACL("/secure/echo", zk.DigestACL(zk.PermAll, "admin", "adminpw"), -1); err != nil {
		t.Fatal(err)
	}
	c.delete("/secure/echo/10.0.0.3:80")
	d.cut()
	d.heal()
	u.waitErr(ctx, t, "zk: not authenticated")
	if got, _ := u.last(); len(got) != 3 {
		t.Errorf("set after the ACL change = %v, want the last one kept", got)
	}
	waitLog(ctx, t, logs, `level=WARN msg="zookeeper failed; keeping last set"`)
	// Granted again: the retried list succeeds.
	if _, err := c.conn.SetACL("/secure/echo", acl, -1); err != nil {
		t.Fatal(err)
	}
	u.waitSet(ctx, t, "10.0.0.1:80;weight=10", "10.0.0.2:80;weight=10")
	waitLog(ctx, t, logs, "zookeeper recovered")
}

// TestZKResyncSeesRefusedNode: ZooKeeper delivers no watch to a session
// the node's ACL shuts out, so a resolver without credentials that waits
// for a missing node (an empty set) never heard of its creation with such
// an ACL: no NOAUTH error, no warning, until a reconnection. The resync
// (ZKOptions.Resync) lists it and reports the refusal, and an ACL later
// granting the resolver READ is followed by the next resync too.
func TestZKResyncSeesRefusedNode(t *testing.T) {
	srv := zktest.Start(t)
	ctx := testContext(t)
	c := newZKClient(t, srv.Addr(), 2*time.Second)
	c.addAuth("svc", "s3cret")
	u := newRecUpdater()
	logs := startZKResolverOpts(t, "zk://"+srv.Addr()+"/late/echo", ZKOptions{Resync: 200 * time.Millisecond}, nil, u)
	u.waitFor(ctx, t, "the empty set of the missing node", func() bool { s, _ := u.snapshot(); return len(s) > 0 })
	time.Sleep(300 * time.Millisecond) // past a resync with no node: nothing to report
	if n := u.errorCount(); n != 0 {
		t.Fatalf("%d errors before the node exists, want 0", n)
	}
	c.createACL("/late/echo/10.0.0.1:80", `{"Weight":10,"Tags":{}}`, 0, zk.DigestACL(zk.PermAll, "svc", "s3cret"))
	start := time.Now()
	u.waitErr(ctx, t, "zk: not authenticated (the ACL requires credentials and none were given)")
	t.Logf("node created with a refusing ACL → NOAUTH reported: %v", time.Since(start))
	waitLog(ctx, t, logs, `level=WARN msg="zookeeper failed; keeping last set"`)
	// Opened to anyone: listed at a retry, the node's child followed.
	for _, p := range []string{"/late/echo/10.0.0.1:80", "/late/echo"} {
		if _, err := c.conn.SetACL(p, zk.WorldACL(zk.PermAll), -1); err != nil {
			t.Fatal(err)
		}
	}
	u.waitSet(ctx, t, "10.0.0.1:80;weight=10")
}
