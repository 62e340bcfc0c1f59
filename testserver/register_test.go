package testserver

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/streamlb/streamlb/internal/etcdtest"
)

func TestRegisterEtcd(t *testing.T) {
	t.Parallel()
	srv := etcdtest.Start(t)
	cli := srv.Client()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	target := "etcd://" + srv.Endpoint() + "/kitex/registry-etcd/echo/"

	get := func(key string) []byte {
		t.Helper()
		resp, err := cli.Get(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Kvs) == 0 {
			return nil
		}
		return resp.Kvs[0].Value
	}

	r, err := RegisterEtcd(ctx, target, "127.0.0.1:9001", RegisterOptions{TTL: 2 * time.Second, Tags: map[string]string{"cluster": "a"}})
	if err != nil {
		t.Fatal(err)
	}
	if r.Key() != "kitex/registry-etcd/echo/127.0.0.1:9001" {
		t.Errorf("Key() = %q", r.Key())
	}
	var v kitexValue
	if err := json.Unmarshal(get(r.Key()), &v); err != nil {
		t.Fatal(err)
	}
	if want := (kitexValue{Network: "tcp", Address: "127.0.0.1:9001", Weight: 10, Tags: map[string]string{"cluster": "a"}}); v.Network != want.Network || v.Address != want.Address || v.Weight != want.Weight || v.Tags["cluster"] != "a" {
		t.Errorf("value = %+v, want %+v", v, want)
	}
	// The keep-alive outlives the TTL.
	resp, err := cli.Get(ctx, r.Key())
	if err != nil {
		t.Fatal(err)
	}
	lease := clientv3.LeaseID(resp.Kvs[0].Lease)
	for range 3 {
		ttl, err := cli.TimeToLive(ctx, lease)
		if err != nil || ttl.TTL < 0 { // -1: expired; 0: under a second left
			t.Fatalf("lease TTL = %v, %v; want kept alive", ttl, err)
		}
		select {
		case <-time.After(time.Second):
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		}
	}
	if err := r.Deregister(ctx); err != nil {
		t.Fatal(err)
	}
	if got := get(r.Key()); got != nil {
		t.Errorf("key still there after Deregister: %s", got)
	}

	// Abandoned, the key lapses with its lease.
	r2, err := RegisterEtcd(ctx, target, "127.0.0.1:9002", RegisterOptions{TTL: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	r2.Abandon()
	start := time.Now()
	for get(r2.Key()) != nil {
		if time.Since(start) > 4*time.Second {
			t.Fatal("abandoned registration still there after 4s")
		}
		select {
		case <-time.After(50 * time.Millisecond):
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		}
	}
	t.Logf("abandoned 2s lease gone after %v", time.Since(start))
}

func TestRegisterEtcdBadTarget(t *testing.T) {
	t.Parallel()
	for _, target := range []string{"dns:///x:1", "etcd://h:1", "etcd:///svc", "etcd://h:1/"} {
		if _, err := RegisterEtcd(t.Context(), target, "127.0.0.1:1", RegisterOptions{}); err == nil || !strings.Contains(err.Error(), "want etcd://") {
			t.Errorf("RegisterEtcd(%q) error = %v, want a usage error", target, err)
		}
	}
}
