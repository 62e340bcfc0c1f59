package testserver

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/go-zookeeper/zk"

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
