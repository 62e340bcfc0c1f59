package proxy_test

import (
	"fmt"
	"testing"
	"time"

	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
)

// TestAtk5ClusterDrainDuringReload: `streamlb proxy --config` under
// byte-exact load of every kind gets SIGTERM (Run's context ends) while
// a reload that retargets its cluster runs, and a backend restarts
// gracefully during the drain. Run returns nil within the drain timeout
// and a little; every call ends byte-exact or with a proper status; the
// reload returns; nothing leaks.
func TestAtk5ClusterDrainDuringReload(t *testing.T) {
	verifyNoLeaks(t)
	atk5Resources(t)
	ctx := testkit.Context(t, 60*time.Second)
	b0 := atk5Backend(t, "b0", "127.0.0.1:0")
	b1 := atk5Backend(t, "b1", "127.0.0.1:0")
	b2 := atk5Backend(t, "b2", "127.0.0.1:0")
	conf := func(targets string) string {
		return fmt.Sprintf(`
listen: 127.0.0.1:0
admin_listen: ""
drain_timeout: 600ms
proxy: {retry_on: [grpc.testing.TestService/]}
clusters:
  - {name: a, targets: [%s]}
routes:
  - {cluster: a}
`, targets)
	}
	path, write := atk5ConfigFile(t)
	write(conf(b0.Addr() + ", " + b1.Addr()))
	run := atk5StartFile(t, path)
	defer run.cancel()
	srv, addr, ran := run.srv, run.addr, run.ran
	var clients []testgrpc.TestServiceClient
	for _, w := range []int32{0, 64 << 10, 0} {
		clients = append(clients, atk5Dial(t, addr, w))
	}
	testkit.WaitFor(ctx, t, "the cluster to answer", func() bool {
		_, err := clients[0].EmptyCall(ctx, &testgrpc.Empty{})
		return err == nil
	})
	var tally atk5Tally
	stop := make(chan struct{})
	wg := atk5Load(ctx, stop, clients, 12, &tally)
	time.Sleep(400 * time.Millisecond)
	write(conf(b1.Addr() + ", " + b2.Addr()))
	reloaded := make(chan error, 1)
	go func() { reloaded <- srv.Reload(ctx) }()
	start := time.Now()
	run.cancel()
	go func() {
		time.Sleep(100 * time.Millisecond)
		b1.GracefulStop()
	}()
	select {
	case err := <-ran:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
		if took := time.Since(start); took > 5*time.Second {
			t.Errorf("Run returned %v after its context ended, drain_timeout 600ms", took)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Run did not return")
	}
	select {
	case err := <-reloaded:
		t.Logf("Reload: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("Reload did not return")
	}
	time.Sleep(100 * time.Millisecond)
	close(stop)
	wg.Wait()
	atk5Check(t, "cluster drain", tally.res, true, false)
}
