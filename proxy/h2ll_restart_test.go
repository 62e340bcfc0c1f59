package proxy_test

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
)

// TestH2llBackendStopsUnderLongStreams: long bidi streams on two backends
// share one client connection; one backend stops gracefully with a 300
// ms bound (GOAWAY, then its connections closed under the streams still
// running). The stream on it must end UNAVAILABLE soon after the bound,
// not hang; the stream on the other backend, on the same client
// connection, must go on untouched, and new calls must succeed.
func TestH2llBackendStopsUnderLongStreams(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 2})
	ctx := testkit.Context(t, 30*time.Second)
	echo := func(st testgrpc.TestService_FullDuplexCallClient) (string, error) {
		if err := st.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 10}}}); err != nil {
			_, err = st.Recv()
			return "", err
		}
		_, err := st.Recv()
		return "", err
	}
	on := map[string]testgrpc.TestService_FullDuplexCallClient{}
	for len(on) < 2 {
		st, err := e.client.FullDuplexCall(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := echo(st); err != nil {
			t.Fatal(err)
		}
		h, _ := st.Header()
		name := h.Get("x-backend")
		if len(name) == 0 {
			t.Fatal("no x-backend header")
		}
		if _, ok := on[name[0]]; ok {
			st.CloseSend()
			continue
		}
		on[name[0]] = st
	}
	stopping := e.backendByName("b0")
	done := make(chan error, 1)
	start := time.Now()
	go func() {
		sctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		done <- stopping.Shutdown(sctx)
	}()
	// The stream on b0 keeps echoing until it fails.
	var err error
	for err == nil && time.Since(start) < 5*time.Second {
		_, err = echo(on["b0"])
		time.Sleep(10 * time.Millisecond)
	}
	took := time.Since(start)
	<-done
	if status.Code(err) != codes.Unavailable {
		t.Errorf("the stream on the stopped backend ended with %v after %v, want UNAVAILABLE", err, took)
	}
	if took > 2*time.Second {
		t.Errorf("the stream on the stopped backend took %v to end, its backend closed after 300ms", took)
	}
	for i := 0; i < 5; i++ {
		if _, err := echo(on["b1"]); err != nil {
			t.Fatalf("the stream on the other backend: %v", err)
		}
	}
	for i := 0; i < 10; i++ {
		if _, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{}); err != nil {
			t.Errorf("a new call after the stop: %v", err)
		}
	}
	on["b1"].CloseSend()
	if _, err := on["b1"].Recv(); err == nil {
		t.Error("an answer after CloseSend")
	}
}
