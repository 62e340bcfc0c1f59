package proxy_test

import (
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestS25MovedCallFailingCountsItsAttempt: a call waits for a slot on its
// backend (one stream, held by a hanging call). Its connection then goes:
// the backend leaves the set (drain) or sends GOAWAY (a graceful stop).
// The waiting call is moved and picked again, which is not counted as an
// attempt of its own; but no backend can be picked now (the set is
// empty), so it fails. It was given to a backend once: its CallInfo must
// say Attempts 1 (it said 0, with the backend it waited on named).
func TestS25MovedCallFailingCountsItsAttempt(t *testing.T) {
	for _, how := range []string{"drain", "goaway"} {
		t.Run(how, func(t *testing.T) {
			verifyNoLeaks(t)
			ends := make(chan proxy.CallInfo, 16)
			e := oneSlotEnv(t, 1, 10*time.Second, func(c *proxy.Config) {
				c.OnCallEnd = func(ci proxy.CallInfo) {
					if ci.Method == "/grpc.testing.TestService/UnaryCall" {
						ends <- ci
					}
				}
			})
			srv := e.srv.(*proxy.Server)
			ctx := testkit.Context(t, 30*time.Second)
			ts := e.backends[0]
			mustEmptyCalls(ctx, t, e, 1) // learns the backend's SETTINGS
			release, hung := hangOn(ctx, t, e, ts)
			res := make(chan error, 1)
			go func() {
				_, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
				res <- err
			}()
			testkit.WaitFor(ctx, t, "a call waiting", func() bool { return srv.Waiting() == 1 })
			e.setBackends() // nothing to pick any more
			stopped := make(chan error, 1)
			switch how {
			case "drain":
				srv.RetainBackends(nil)
			case "goaway":
				go func() { stopped <- ts.Shutdown(ctx) }()
			}
			err := <-res
			if status.Code(err) != codes.Unavailable {
				t.Errorf("moved call with nothing to pick: %v, want UNAVAILABLE", err)
			}
			release()
			hung.Wait()
			if how == "goaway" {
				if err := <-stopped; err != nil {
					t.Errorf("graceful stop: %v", err)
				}
			}
			var ci proxy.CallInfo
			select {
			case ci = <-ends:
			case <-ctx.Done():
				t.Fatal("no CallInfo for the moved call")
			}
			if ci.Attempts != 1 {
				t.Errorf("moved call failing its new pick: CallInfo.Attempts %d (backend %q, %v %q), want 1", ci.Attempts, ci.Backend, ci.Code, ci.Message)
			}
		})
	}
}
