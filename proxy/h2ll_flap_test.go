package proxy_test

import (
	"testing"
	"time"

	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestH2llBackendBackInSetNotCut: a long bidi stream runs on a backend
// that leaves the set (a DNS answer without it, a registry blip) and is
// back in the next set, well within the drain timeout. The backend is in
// the set when the drain timeout passes, so the stream has no reason to
// be cut "because the backend left the set": it must run on to its end.
func TestH2llBackendBackInSetNotCut(t *testing.T) {
	verifyNoLeaks(t)
	const drainTimeout = 300 * time.Millisecond
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.DrainTimeout = drainTimeout }})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 20*time.Second)
	b0 := e.backends[0].Addr()

	st, err := e.client.FullDuplexCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ping := func(i int) error {
		if err := st.Send(&testgrpc.StreamingOutputCallRequest{
			ResponseParameters: []*testgrpc.ResponseParameters{{Size: 100}},
		}); err != nil {
			_, err = st.Recv() // the call's status
			return err
		}
		_, err := st.Recv()
		return err
	}
	if err := ping(0); err != nil {
		t.Fatal(err)
	}
	// The backend leaves the set, and is back 50ms later.
	srv.RetainBackends(nil)
	time.Sleep(50 * time.Millisecond)
	srv.RetainBackends([]string{b0})
	// The stream goes on for three drain timeouts.
	end := time.Now().Add(3 * drainTimeout)
	for i := 1; time.Now().Before(end); i++ {
		if err := ping(i); err != nil {
			t.Fatalf("message %d, %v after the backend came back: %v", i, time.Since(end.Add(-3*drainTimeout)).Round(time.Millisecond), err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := st.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); err == nil {
		t.Fatal("an answer after CloseSend")
	}
}
