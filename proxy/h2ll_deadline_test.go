package proxy_test

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestH2llDeadlineMidRequestMessage: a client-streaming call with a 300
// ms deadline sends a 4 MiB message to a backend that starts reading only
// after 500 ms, so the deadline passes with the message partly relayed
// (flow control holds the rest in the client). The client must see
// DEADLINE_EXCEEDED at its deadline; the backend must never get the
// message, its Recv must fail DEADLINE_EXCEEDED or CANCELLED, and its
// handler must end; the proxy must hold nothing afterwards.
func TestH2llDeadlineMidRequestMessage(t *testing.T) {
	verifyNoLeaks(t)
	type seen struct {
		code codes.Code
		got  int
	}
	res := make(chan seen, 1)
	ts := startTestserver(t, testserver.Config{Name: "slow", Logger: quietLog,
		StreamingInputCallF: func(st testgrpc.TestService_StreamingInputCallServer) error {
			time.Sleep(500 * time.Millisecond)
			m, err := st.Recv()
			res <- seen{status.Code(err), len(m.GetPayload().GetBody())}
			return err
		}})
	srv, err := proxy.New(proxy.Config{Picker: pickerTo(ts.Addr()), Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	ln := serveProxy(t, srv)
	client := testgrpc.NewTestServiceClient(e2eConn(t, ln.Addr().String()))
	ctx := testkit.Context(t, 20*time.Second)
	cctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	st, err := client.StreamingInputCall(cctx)
	if err != nil {
		t.Fatal(err)
	}
	st.Send(&testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: make([]byte, 4<<20)}})
	_, err = st.CloseAndRecv()
	took := time.Since(start)
	if status.Code(err) != codes.DeadlineExceeded {
		t.Errorf("client: %v, want DEADLINE_EXCEEDED", err)
	}
	if took > 2*time.Second {
		t.Errorf("the client's call took %v with a 300ms deadline", took)
	}
	select {
	case s := <-res:
		if s.code != codes.DeadlineExceeded && s.code != codes.Canceled {
			t.Errorf("backend's Recv: %v with %d bytes, want DEADLINE_EXCEEDED or CANCELLED", s.code, s.got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the backend's handler never got past its Recv")
	}
	testkit.WaitFor(ctx, t, "nothing held", func() bool {
		return ts.InFlight() == 0 && srv.ClientStreams() == 0 && srv.MaxBufferedBytes() == 0
	})
}
