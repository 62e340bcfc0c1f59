package testserver

import (
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/go-zookeeper/zk"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/internal/zktest"
)

func TestRegisterZK(t *testing.T) {
	srv := zktest.Start(t)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	conn, _, err := zk.Connect([]string{srv.Addr()}, 2*time.Second, zk.WithLogger(zkNopLogger{}), zk.WithLogInfo(false))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(conn.Close)
	target := "zk://" + srv.Addr() + "/kitex/echo/"

	// waitGone polls until p no longer exists.
	waitGone := func(p string) time.Duration {
		t.Helper()
		start := time.Now()
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			ok, _, err := conn.Exists(p)
			if err != nil {
				t.Fatal(err)
			}
			if !ok {
				return time.Since(start)
			}
			select {
			case <-ctx.Done():
				t.Fatalf("%s still registered", p)
			case <-tick.C:
			}
		}
	}

	r, err := RegisterZK(ctx, target, "127.0.0.1:9001", RegisterOptions{TTL: 2 * time.Second, Weight: 7, Tags: map[string]string{"cluster": "a"}})
	if err != nil {
		t.Fatal(err)
	}
	if r.Key() != "/kitex/echo/127.0.0.1:9001" {
		t.Errorf("Key() = %q", r.Key())
	}
	data, stat, err := conn.Get(r.Key())
	if err != nil {
		t.Fatal(err)
	}
	if stat.EphemeralOwner == 0 {
		t.Errorf("node %s is not ephemeral", r.Key())
	}
	var v zkKitexData
	if err := json.Unmarshal(data, &v); err != nil || v.Weight != 7 || v.Tags["cluster"] != "a" {
		t.Errorf("data = %s (%v), want Weight 7 and Tags cluster=a", data, err)
	}
	if err := r.Deregister(ctx); err != nil {
		t.Fatal(err)
	}
	waitGone(r.Key())

	// Abandoned: the node goes when the session expires.
	r2, err := RegisterZK(ctx, target, "127.0.0.1:9002", RegisterOptions{TTL: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	r2.Abandon()
	t.Logf("abandoned 2s session: node gone after %v more", waitGone(r2.Key()))
}

func TestRegisterZKBadTarget(t *testing.T) {
	t.Parallel()
	for _, target := range []string{"zk://h:1", "zk://h:1/", "zk:///svc", "etcd://h:1/svc", "zk://h:1/a//b"} {
		if _, err := RegisterZK(t.Context(), target, "127.0.0.1:1", RegisterOptions{}); err == nil || !strings.Contains(err.Error(), "want zk://") {
			t.Errorf("RegisterZK(%q) error = %v, want a usage error", target, err)
		}
	}
}

// TestRegisterZKServerMovesInDNS: the ZooKeeper server of a registration
// is given by a DNS name (a real DNS server's), and moves: the name points
// at a new address and the old one goes away. The registration's client
// looks the name up again once the addresses it knows fail
// (zkhosts.Provider, as the resolver's), reconnects at the new address
// within its session timeout, and the node stays. Before, go-zookeeper's
// provider looked the name up once and dialled the old address for ever:
// the session expired and the backend was deregistered.
func TestRegisterZKServerMovesInDNS(t *testing.T) {
	srv := zktest.Start(t)
	ctx := testkit.Context(t, 30*time.Second)
	dns := NewDNSServer(DNSConfig{DefaultTTL: 1, Logger: slog.New(slog.DiscardHandler)})
	if err := dns.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(dns.Stop)
	old := testkit.StartForwarder(t, "127.0.0.2:0", srv.Addr())
	_, port, _ := net.SplitHostPort(old.Addr())
	moved := testkit.StartForwarder(t, net.JoinHostPort("127.0.0.3", port), srv.Addr())
	const name = "zk-0.zk.test.svc.cluster.local"
	dns.SetA(name, "127.0.0.2")
	resolver := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, dns.Addr())
	}}

	const ttl = 2 * time.Second
	target := "zk://" + net.JoinHostPort(name, port) + "/svc"
	r, err := RegisterZK(ctx, target, "10.0.0.1:80", RegisterOptions{TTL: ttl, lookupHost: resolver.LookupHost})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Deregister(context.Background()) })
	conn, _, err := zk.Connect([]string{srv.Addr()}, ttl, zk.WithLogger(zkNopLogger{}), zk.WithLogInfo(false))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(conn.Close)
	_, stat, err := conn.Get(r.Key())
	if err != nil {
		t.Fatal(err)
	}
	owner := stat.EphemeralOwner

	dns.SetA(name, "127.0.0.3")
	moveAt := time.Now()
	old.Close()
	// Within the session timeout, or the session is gone: the client
	// notices the lost connection, tries the old address, looks the
	// name up again and connects at the new one in about a second.
	wctx, cancel := context.WithDeadline(ctx, moveAt.Add(ttl))
	defer cancel()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for moved.Accepted() == 0 {
		select {
		case <-wctx.Done():
			t.Fatalf("no connection at the new address %v after the move: the name was not looked up again", time.Since(moveAt).Round(time.Millisecond))
		case <-tick.C:
		}
	}
	// Past the session timeout since the move: the session, and so the
	// node, lived on.
	select {
	case <-ctx.Done():
		t.Fatal(ctx.Err())
	case <-time.After(time.Until(moveAt.Add(2 * ttl))):
	}
	_, stat, err = conn.Get(r.Key())
	if err != nil {
		t.Fatalf("%s after the move: %v (the session expired)", r.Key(), err)
	}
	if stat.EphemeralOwner != owner {
		t.Errorf("node owned by session %#x, want %#x (registered again, not kept)", stat.EphemeralOwner, owner)
	}
}
