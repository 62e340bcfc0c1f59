package resolver

import (
	"context"
	"net"
	"os"
	"os/exec"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// TestEtcdDebianServer runs the resolver against the etcd server Debian
// ships (package etcd-server, an older 3.4 release), not only the embedded
// one of the client's own version: list, watch, a registration, a removal
// and a lease that runs out. It skips when etcd is not installed, unless
// STREAMLB_REQUIRE_ETCD=1 (as CI sets it).
func TestEtcdDebianServer(t *testing.T) {
	t.Parallel()
	bin, err := exec.LookPath("etcd")
	if err != nil {
		if os.Getenv("STREAMLB_REQUIRE_ETCD") == "1" {
			t.Fatalf("etcd not found but STREAMLB_REQUIRE_ETCD=1: %v", err)
		}
		t.Skipf("etcd not installed (%v); apt-get install etcd-server, or set STREAMLB_REQUIRE_ETCD=1 to require it", err)
	}
	ctx := testContext(t)
	client, peer := freeTCPAddr(t), freeTCPAddr(t)
	cmd := exec.Command(bin,
		"--name", "streamlb-test",
		"--data-dir", t.TempDir(),
		"--listen-client-urls", "http://"+client,
		"--advertise-client-urls", "http://"+client,
		"--listen-peer-urls", "http://"+peer,
		"--initial-advertise-peer-urls", "http://"+peer,
		"--initial-cluster", "streamlb-test=http://"+peer,
		"--log-level", "error",
	)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{client}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
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
			t.Fatalf("etcd at %s never answered: %v", client, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
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

// freeTCPAddr returns a loopback address that was free a moment ago.
func freeTCPAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}
