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

	// A 3s lease: the keep-alive renews it every second, so only a stall
	// of 3s on a loaded machine, not one of 2s, lets it lapse.
	r, err := RegisterEtcd(ctx, target, "127.0.0.1:9001", RegisterOptions{TTL: 3 * time.Second, Tags: map[string]string{"cluster": "a"}})
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
	for range 4 {
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

	// Abandoned, the key stays, as a killed process's would, until it
	// lapses with its lease. etcd expires leases on its own schedule, slow
	// on a loaded machine, so the lapse is waited for (bounded by ctx)
	// rather than given the TTL plus a margin; a keep-alive that Abandon
	// failed to stop never lets it go.
	r2, err := RegisterEtcd(ctx, target, "127.0.0.1:9002", RegisterOptions{TTL: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	r2.Abandon()
	start := time.Now()
	resp, err = cli.Get(ctx, r2.Key())
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) == 0 {
		t.Fatal("key gone at once after Abandon, want it left to its lease")
	}
	lease2 := clientv3.LeaseID(resp.Kvs[0].Lease)
	for get(r2.Key()) != nil {
		select {
		case <-time.After(50 * time.Millisecond):
		case <-ctx.Done():
			t.Fatalf("abandoned registration still there after %v: %v", time.Since(start), ctx.Err())
		}
	}
	t.Logf("abandoned 2s lease gone after %v", time.Since(start))
	if ttl, err := cli.TimeToLive(ctx, lease2); err != nil || ttl.TTL != -1 {
		t.Errorf("key gone, lease TTL = %v, %v; want the lease expired (-1) with it", ttl, err)
	}
}

func TestRegisterEtcdBadTarget(t *testing.T) {
	t.Parallel()
	for _, target := range []string{"dns:///x:1", "etcd://h:1", "etcd:///svc", "etcd://h:1/"} {
		if _, err := RegisterEtcd(t.Context(), target, "127.0.0.1:1", RegisterOptions{}); err == nil || !strings.Contains(err.Error(), "want etcd://") {
			t.Errorf("RegisterEtcd(%q) error = %v, want a usage error", target, err)
		}
	}
}
