package proxy_test

import (
	"testing"
	"time"

	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestRestartingForgottenWhenGone: a backend whose server stops gracefully
// (GOAWAY NO_ERROR, as a grpc-go pod sends when it is told to stop) is noted
// as restarting, so that its refused connections do not count towards its
// ejection for Config.RestartGrace. In a rolling restart the pod then
// leaves the set for good and its address is never dialed again. The note
// must go with it: before, it stayed for the life of the process, one
// entry per address ever stopped gracefully (the chaos soak's rolling
// restarts left one per pod). A backend still in the set keeps its note.
func TestRestartingForgottenWhenGone(t *testing.T) {
	e := newEnv(t, envOpts{backends: 3})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 20*time.Second)
	testkit.WaitFor(ctx, t, "a call on every backend", func() bool {
		if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
			t.Fatal(err)
		}
		return e.backends[0].Calls() > 0 && e.backends[1].Calls() > 0 && e.backends[2].Calls() > 0
	})
	// Two pods stop gracefully; one of them (b2) is still in the set, as
	// while discovery has not caught up.
	e.backends[0].GracefulStop()
	e.backends[2].GracefulStop()
	testkit.WaitFor(ctx, t, "both GOAWAYs noted", func() bool { return srv.RestartingBackends() == 2 })

	keep := []string{e.backends[1].Addr(), e.backends[2].Addr()}
	e.setBackends(keep...)
	srv.RetainBackends(keep)
	if n := srv.RestartingBackends(); n != 1 {
		t.Errorf("%d backends noted as restarting after b0 left the set, want 1 (b2, still in it)", n)
	}
	keep = keep[:1]
	e.setBackends(keep...)
	srv.RetainBackends(keep)
	if n := srv.RestartingBackends(); n != 0 {
		t.Errorf("%d backends noted as restarting after both left the set, want 0", n)
	}
	if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatal(err)
	}
}
