package proxy_test

import (
	"fmt"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestAtk25GrownStartsOfRetriedAttempts: on a client connection that has
// drained, backend streams start with the grown window
// (startWindowLocked); calls to a --retry-on method whose first backend
// answers UNAVAILABLE after a while (their first attempts' grown windows
// counted meanwhile) go to the second backend. Once every call ends, the
// connection must count no window and no growth: a discarded attempt
// that kept its growth would shrink the connection's budget for good, and
// in the end refuse its every new call.
func TestAtk25GrownStartsOfRetriedAttempts(t *testing.T) {
	verifyNoLeaks(t)
	bad := startTestserver(t, testserver.Config{Name: "bad", Logger: quietLog,
		StreamingOutputCallF: func(_ *testgrpc.StreamingOutputCallRequest, st testgrpc.TestService_StreamingOutputCallServer) error {
			time.Sleep(100 * time.Millisecond)
			return status.Error(codes.Unavailable, "bad")
		}})
	good := startTestserver(t, testserver.Config{Name: "good", Logger: quietLog})
	srv, err := proxy.New(proxy.Config{Picker: firstThenOthers{bad.Addr(), good.Addr()}, Logger: quietLog,
		RetryOn: []string{"/grpc.testing.TestService/StreamingOutputCall"}})
	if err != nil {
		t.Fatal(err)
	}
	ln := serveProxy(t, srv)
	client := testgrpc.NewTestServiceClient(e2eConn(t, ln.Addr().String()))
	ctx := testkit.Context(t, 60*time.Second)
	const size = 64 << 10
	// Drain: a large answer read at once, on the first backend.
	drainOnce := func() {
		t.Helper()
		st, err := client.FullDuplexCall(ctx)
		if err != nil {
			t.Fatal(err)
		}
		req := &testgrpc.StreamingOutputCallRequest{ResponseParameters: bigStream(32, size).ResponseParameters}
		if err := st.Send(req); err != nil {
			t.Fatal(err)
		}
		st.CloseSend()
		if _, err := drain(st.Recv); err != nil {
			t.Fatal(err)
		}
	}
	for round := range 3 {
		drainOnce()
		const n = 12
		errc := make(chan error, n)
		for range n {
			go func() {
				st, err := client.StreamingOutputCall(ctx, bigStream(2, size))
				if err == nil {
					var got int
					if got, err = recvAll(st, size, nil); err == nil && got != 2*size {
						err = fmt.Errorf("%d bytes", got)
					}
				}
				errc <- err
			}()
		}
		testkit.WaitFor(ctx, t, "grown starts", func() bool { return srv.MaxWindowGrowth() > 0 })
		for range n {
			if err := <-errc; err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
		}
		testkit.WaitFor(ctx, t, "the windows and their growth to be given back", func() bool {
			return srv.MaxWindowGrowth() == 0 && srv.MaxBackendWindows() == 0
		})
	}
}
