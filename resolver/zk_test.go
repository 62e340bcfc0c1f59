package resolver

import (
	"net"
	"path"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-zookeeper/zk"

	"github.com/streamlb/streamlb/internal/zktest"
)

func TestDecodeZKNode(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name       string
		path, data string
		format     string
		want       []string
		wantFormat string
		wantErr    string
	}{
		{name: "kitex", path: "/kitex/echo/10.0.0.1:8888", data: `{"Weight":25,"Tags":{"zone":"a"}}`, want: []string{"10.0.0.1:8888;weight=25"}, wantFormat: ZKFormatKitex},
		{name: "kitex default weight", path: "/kitex/echo/10.0.0.1:8888", data: `{"Weight":0,"Tags":{}}`, want: []string{"10.0.0.1:8888;weight=10"}, wantFormat: ZKFormatKitex},
		{name: "kitex no data", path: "/kitex/echo/10.0.0.1:8888", want: []string{"10.0.0.1:8888;weight=10"}, wantFormat: ZKFormatKitex},
		{name: "kratos", path: "/microservices/helloworld/b5a6c1", data: kratosValue, want: []string{"10.0.0.2:9000"}, wantFormat: ZKFormatKratos},
		{name: "dubbo", path: dubboKey, want: []string{"10.0.0.5:20000"}, wantFormat: ZKFormatDubbo},
		{name: "dubbo with curator data", path: dubboKey, data: "10.0.0.5", want: []string{"10.0.0.5:20000"}, wantFormat: ZKFormatDubbo},
		{name: "unknown", path: "/svc/some-id", data: "hello", wantErr: "not a known"},
		{name: "kitex bad name", path: "/svc/some-id", data: `{"Weight":1}`, format: ZKFormatKitex, wantErr: "missing port"},
		// Registered by mistake (a service that registers its listen
		// address): skipped with a warning, as DNS answers of it are.
		{name: "kitex unspecified ip", path: "/svc/0.0.0.0:8888", wantErr: "unspecified IP"},
		{name: "kitex unspecified ipv6", path: "/svc/[::]:8888", wantErr: "unspecified IP"},
		{name: "kitex unspecified mapped", path: "/svc/[::ffff:0.0.0.0]:8888", wantErr: "unspecified IP"},
		{name: "kitex bad json", path: "/svc/10.0.0.1:1", data: `{"Weight":`, wantErr: "kitex data"},
		{name: "kratos without grpc", path: "/m/x", data: `{"endpoints":["http://10.0.0.2:8000"]}`, wantErr: "grpc://"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, format, err := decodeZKNode(tc.path, path.Base(tc.path), []byte(tc.data), tc.format)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error = %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if format != tc.wantFormat {
				t.Errorf("format = %q, want %q", format, tc.wantFormat)
			}
			if g := strings.Join(addrStrings(got), ","); g != strings.Join(tc.want, ",") {
				t.Errorf("got %v, want %v", g, tc.want)
			}
		})
	}
}

// zkClient is a ZooKeeper session for a test, writing nodes as the
// frameworks do. cut drops its connection and refuses to reconnect, as if
// the process had died, so the server expires its session.
type zkClient struct {
	t    *testing.T
	conn *zk.Conn

	mu   sync.Mutex // guards the fields below
	dead bool
	nc   net.Conn
}

func newZKClient(t *testing.T, addr string, session time.Duration) *zkClient {
	t.Helper()
	c := &zkClient{t: t}
	dial := func(network, address string, timeout time.Duration) (net.Conn, error) {
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.dead {
			return nil, net.ErrClosed
		}
		nc, err := net.DialTimeout(network, address, timeout)
		c.nc = nc
		return nc, err
	}
	conn, _, err := zk.Connect([]string{addr}, session, zk.WithDialer(dial), zk.WithLogger(zkNopLogger{}), zk.WithLogInfo(false))
	if err != nil {
		t.Fatal(err)
	}
	c.conn = conn
	t.Cleanup(conn.Close)
	return c
}

// create makes p with data, creating missing parents as persistent nodes.
func (c *zkClient) create(p, data string, flags int32) {
	c.t.Helper()
	parts := strings.Split(strings.Trim(p, "/"), "/")
	for i := 1; i < len(parts); i++ {
		parent := "/" + strings.Join(parts[:i], "/")
		if _, err := c.conn.Create(parent, nil, 0, zk.WorldACL(zk.PermAll)); err != nil && err != zk.ErrNodeExists {
			c.t.Fatalf("create %s: %v", parent, err)
		}
	}
	if _, err := c.conn.Create(p, []byte(data), flags, zk.WorldACL(zk.PermAll)); err != nil {
		c.t.Fatalf("create %s: %v", p, err)
	}
}

func (c *zkClient) delete(p string) {
	c.t.Helper()
	if err := c.conn.Delete(p, -1); err != nil {
		c.t.Fatalf("delete %s: %v", p, err)
	}
}

// cut kills the connection for good without closing the session.
func (c *zkClient) cut() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.dead = true
	if c.nc != nil {
		c.nc.Close()
	}
}

func startZKResolver(t *testing.T, target string, u Updater) *syncBuffer {
	t.Helper()
	return startZKResolverDial(t, target, nil, u)
}

func startZKResolverDial(t *testing.T, target string, dial zk.Dialer, u Updater) *syncBuffer {
	t.Helper()
	opts := ZKOptions{
		SessionTimeout: 2 * time.Second,
		ConnectTimeout: time.Second,
		BackoffInitial: 100 * time.Millisecond,
		BackoffMax:     500 * time.Millisecond,
	}
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

func TestZKFormatsAndRegistrations(t *testing.T) {
	srv := zktest.Start(t)
	ctx := testContext(t)
	// c's nodes must outlive the test: its session is the longest the
	// server grants (20 ticks), so that a stall of the loaded machine
	// does not expire it. Only k's session is meant to expire.
	c := newZKClient(t, srv.Addr(), 20*zktest.TickTime)

	c.create("/kitex/echo/10.0.0.1:8888", `{"Weight":25,"Tags":{}}`, 0)
	c.create("/microservices/helloworld/b5a6c1", kratosValue, zk.FlagEphemeral)
	c.create(dubboKey, "", zk.FlagEphemeral)

	t.Run("formats", func(t *testing.T) {
		for _, tc := range []struct{ name, path, want string }{
			{"kitex", "/kitex/echo", "10.0.0.1:8888;weight=25"},
			{"kratos", "/microservices/helloworld", "10.0.0.2:9000"},
			{"dubbo", "/dubbo/com.foo.Greeter/providers", "10.0.0.5:20000"},
		} {
			u := newRecUpdater()
			startZKResolver(t, "zk://"+srv.Addr()+tc.path, u)
			u.waitSet(ctx, t, tc.want)
		}
	})

	u := newRecUpdater()
	logs := startZKResolver(t, "zk://"+srv.Addr()+"/kitex/echo", u)
	u.waitSet(ctx, t, "10.0.0.1:8888;weight=25")

	// Registration: an ephemeral node, as Kitex writes it.
	start := time.Now()
	c.create("/kitex/echo/10.0.0.2:1", `{"Weight":10,"Tags":{}}`, zk.FlagEphemeral)
	u.waitSet(within(t, time.Second), t, "10.0.0.1:8888;weight=25", "10.0.0.2:1;weight=10")
	t.Logf("registration → set: %v", time.Since(start))

	// The watch was re-armed: a second and third change are followed too.
	c.create("/kitex/echo/junk", "{not json", 0)
	c.create("/kitex/echo/0.0.0.0:1", `{"Weight":10,"Tags":{}}`, zk.FlagEphemeral)
	c.create("/kitex/echo/10.0.0.3:1", `{"Weight":10,"Tags":{}}`, zk.FlagEphemeral)
	u.waitSet(ctx, t, "10.0.0.1:8888;weight=25", "10.0.0.2:1;weight=10", "10.0.0.3:1;weight=10")
	if n := strings.Count(logs.String(), "node=/kitex/echo/junk"); n != 1 {
		t.Errorf("%d warnings for the junk node, want 1; logs:\n%s", n, logs)
	}
	// An unspecified address, which a dial takes to this host, is no
	// backend: skipped with a warning, as a static target of it is refused.
	if n := strings.Count(logs.String(), `node=/kitex/echo/0.0.0.0:1 format=kitex err="address \"0.0.0.0:1\": unspecified IP"`); n != 1 {
		t.Errorf("%d warnings for the unspecified address, want 1; logs:\n%s", n, logs)
	}
	c.delete("/kitex/echo/0.0.0.0:1")

	// Deregistration.
	start = time.Now()
	c.delete("/kitex/echo/10.0.0.3:1")
	u.waitSet(within(t, time.Second), t, "10.0.0.1:8888;weight=25", "10.0.0.2:1;weight=10")
	t.Logf("deregistration → set: %v", time.Since(start))

	// A session closed (graceful shutdown) takes its ephemeral nodes.
	g := newZKClient(t, srv.Addr(), 2*time.Second)
	g.create("/kitex/echo/10.0.0.4:1", `{"Weight":10,"Tags":{}}`, zk.FlagEphemeral)
	u.waitSet(ctx, t, "10.0.0.1:8888;weight=25", "10.0.0.2:1;weight=10", "10.0.0.4:1;weight=10")
	g.conn.Close()
	u.waitSet(within(t, time.Second), t, "10.0.0.1:8888;weight=25", "10.0.0.2:1;weight=10")

	// A session that expires (a killed instance) takes them too. When
	// ZooKeeper expires it is its own affair, late on a loaded machine;
	// the set must follow within a second of the node's deletion, as
	// another session sees it.
	k := newZKClient(t, srv.Addr(), 2*time.Second)
	k.create("/kitex/echo/10.0.0.5:1", `{"Weight":10,"Tags":{}}`, zk.FlagEphemeral)
	u.waitSet(ctx, t, "10.0.0.1:8888;weight=25", "10.0.0.2:1;weight=10", "10.0.0.5:1;weight=10")
	ok, _, gone, err := c.conn.ExistsW("/kitex/echo/10.0.0.5:1")
	if err != nil || !ok {
		t.Fatalf("watching the killed instance's node: exists %v, %v", ok, err)
	}
	killed := time.Now()
	k.cut()
	select {
	case ev := <-gone:
		if ev.Type != zk.EventNodeDeleted {
			t.Fatalf("watch on the killed instance's node: %+v, want its deletion", ev)
		}
	case <-ctx.Done():
		t.Fatal("the killed instance's node was never removed")
	}
	deleted := time.Now()
	u.waitSet(within(t, time.Second), t, "10.0.0.1:8888;weight=25", "10.0.0.2:1;weight=10")
	t.Logf("2s session expiry → node deleted after %v, set followed %v later", deleted.Sub(killed), time.Since(deleted))

	// An authoritative empty answer empties the set.
	c.delete("/kitex/echo/junk")
	c.delete("/kitex/echo/10.0.0.1:8888")
	c.delete("/kitex/echo/10.0.0.2:1")
	u.waitSet(ctx, t)
	// So does the node's removal; its creation is followed.
	c.delete("/kitex/echo")
	c.create("/kitex/echo/10.0.0.6:1", `{"Weight":10,"Tags":{}}`, 0)
	u.waitSet(ctx, t, "10.0.0.6:1;weight=10")
	if _, errs := u.snapshot(); len(errs) != 0 {
		t.Errorf("ReportError calls = %v, want none", errs)
	}
}

func TestZKOutageKeepsSet(t *testing.T) {
	if raceEnabled {
		// The client's session comes back with its watch when the server
		// does, and go-zookeeper v1.0.4 races with itself there: Conn.loop's
		// sendSetWatches reads lastZxid (conn.go:614) while recvLoop writes
		// it (conn.go:849); it failed a fresh-clone CI run. .ci/run runs
		// this test without the race detector.
		t.Skip("the reconnection with a watch races inside go-zookeeper v1.0.4 under -race; run without -race")
	}
	srv := zktest.Start(t)
	ctx := testContext(t)
	c := newZKClient(t, srv.Addr(), 2*time.Second)
	c.create("/svc/10.0.0.1:80", "", 0)

	u := newRecUpdater()
	logs := startZKResolver(t, "zk://"+srv.Addr()+"/svc", u)
	u.waitSet(ctx, t, "10.0.0.1:80;weight=10")

	srv.Stop()
	u.waitFor(ctx, t, "errors", func() bool { _, errs := u.snapshot(); return len(errs) >= 2 })
	if got, _ := u.last(); len(got) != 1 {
		t.Errorf("set during the outage = %v, want the last one kept", got)
	}
	waitLog(ctx, t, logs, `level=WARN msg="zookeeper failed; keeping last set"`)

	srv.Start()
	c2 := newZKClient(t, srv.Addr(), 2*time.Second)
	c2.create("/svc/10.0.0.2:80", "", 0)
	u.waitSet(ctx, t, "10.0.0.1:80;weight=10", "10.0.0.2:80;weight=10")
	waitLog(ctx, t, logs, "zookeeper recovered")
	states, _ := u.snapshot()
	for _, s := range states {
		if len(s.Addresses) == 0 {
			t.Errorf("an empty set was pushed: %v", states)
		}
	}
}

// cuttableDialer dials normally until cut, which closes the connection it
// made and refuses new ones until heal.
type cuttableDialer struct {
	mu   sync.Mutex // guards the fields below
	down bool
	nc   net.Conn
}

func (d *cuttableDialer) dial(network, address string, timeout time.Duration) (net.Conn, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.down {
		return nil, net.ErrClosed
	}
	nc, err := net.DialTimeout(network, address, timeout)
	if err == nil {
		d.nc = nc
	}
	return nc, err
}

func (d *cuttableDialer) cut() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.down = true
	if d.nc != nil {
		d.nc.Close()
	}
}

func (d *cuttableDialer) heal() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.down = false
}

// TestZKSessionExpiryRelists cuts the resolver off from ZooKeeper for
// longer than its session: ZooKeeper expires the session and its watch,
// and on reconnecting the resolver lists again on a new session, seeing
// what changed meanwhile. While cut off it keeps the last set.
func TestZKSessionExpiryRelists(t *testing.T) {
	srv := zktest.Start(t)
	ctx := testContext(t)
	c := newZKClient(t, srv.Addr(), 2*time.Second)
	c.create("/svc/10.0.0.1:80", "", 0)

	d := &cuttableDialer{}
	u := newRecUpdater()
	logs := startZKResolverDial(t, "zk://"+srv.Addr()+"/svc", d.dial, u)
	u.waitSet(ctx, t, "10.0.0.1:80;weight=10")

	d.cut()
	waitLog(ctx, t, logs, "zookeeper failed; keeping last set")
	c.create("/svc/10.0.0.2:80", "", 0)
	c.delete("/svc/10.0.0.1:80")
	// Wait past the 2 s session timeout, so that ZooKeeper expires it.
	expired := time.NewTimer(3 * time.Second)
	defer expired.Stop()
	select {
	case <-ctx.Done():
		t.Fatal(ctx.Err())
	case <-expired.C:
	}
	if got, _ := u.last(); len(got) != 1 || got[0] != "10.0.0.1:80;weight=10" {
		t.Errorf("set while cut off = %v, want the last one kept", got)
	}
	d.heal()
	u.waitSet(ctx, t, "10.0.0.2:80;weight=10")
	waitLog(ctx, t, logs, "session expired")
	// The watch was re-armed on the new session.
	c.create("/svc/10.0.0.3:80", "", 0)
	u.waitSet(ctx, t, "10.0.0.2:80;weight=10", "10.0.0.3:80;weight=10")
}
