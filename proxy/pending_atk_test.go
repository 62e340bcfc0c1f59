package proxy_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// oneSlotEnv is n backends that take one stream at a time
// (MAX_CONCURRENT_STREAMS 1) behind one backend connection each
// (MaxBackendConns 1), calls waiting up to wait for a slot.
func oneSlotEnv(t *testing.T, n int, wait time.Duration, pcfg func(*proxy.Config)) *env {
	return newEnv(t, envOpts{backends: n,
		tscfg: func(i int, c *testserver.Config) {
			c.ServerOptions = append(c.ServerOptions, grpc.MaxConcurrentStreams(1))
		},
		pcfg: func(c *proxy.Config) {
			c.MaxBackendConns = 1
			c.MaxBackendPending = 8
			c.BackendPendingTimeout = wait
			if pcfg != nil {
				pcfg(c)
			}
		},
	})
}

// hangOn starts a call that hangs on the backend until the returned
// cancel, and waits until it is on ts.
func hangOn(ctx context.Context, t *testing.T, e *env, ts *testserver.Server) (cancel func(), done *sync.WaitGroup) {
	t.Helper()
	hang, cancel := context.WithCancel(metadata.AppendToOutgoingContext(ctx, testserver.MetadataHang, "1"))
	done = new(sync.WaitGroup)
	want := ts.InFlight() + 1
	done.Add(1)
	go func() { defer done.Done(); e.client.EmptyCall(hang, &testgrpc.Empty{}) }()
	testkit.WaitFor(ctx, t, "the hanging call on its backend", func() bool { return ts.InFlight() == want })
	return cancel, done
}

// TestWaitingCallLeavesRemovedBackend: a call waiting for a slot on a
// backend that leaves the set (RetainBackends) goes to a backend of the
// new set, as a call waiting for a GOAWAY'd connection does, rather than
// wait for a slot on the removed backend (or fail when
// BackendPendingTimeout passes while it still carries its long calls).
func TestWaitingCallLeavesRemovedBackend(t *testing.T) {
	verifyNoLeaks(t)
	e := oneSlotEnv(t, 2, 2*time.Second, nil)
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	gone, kept := e.backends[0], e.backends[1]
	e.setBackends(gone.Addr())
	srv.RetainBackends([]string{gone.Addr()})
	if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil { // learns its SETTINGS
		t.Fatal(err)
	}
	release, hung := hangOn(ctx, t, e, gone)
	defer hung.Wait()
	defer release()

	res := make(chan error, 1)
	go func() {
		_, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
		res <- err
	}()
	testkit.WaitFor(ctx, t, "a call waiting", func() bool { return srv.Waiting() == 1 })
	before := gone.Calls()
	e.setBackends(kept.Addr())
	srv.RetainBackends([]string{kept.Addr()})
	if err := <-res; err != nil {
		t.Errorf("call waiting on a backend that left the set: %v, want OK on the new set's backend", err)
	}
	if gone.Calls() != before {
		t.Errorf("the removed backend got %d calls after it left the set", gone.Calls()-before)
	}
	if n := srv.Waiting(); n != 0 {
		t.Errorf("%d calls still counted waiting", n)
	}
}
