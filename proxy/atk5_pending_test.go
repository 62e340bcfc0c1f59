package proxy_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestAtk5ShutdownWithCallsWaitingForBackend: calls of every kind wait
// for a backend connection whose handshake never finishes (a backend
// that accepts and stays mute), some with requests streaming in, when
// Server.Shutdown's short drain runs out. Every call ends promptly with
// UNAVAILABLE (or its own deadline), and Shutdown returns soon after its
// deadline, not after the handshake timeout.
func TestAtk5ShutdownWithCallsWaitingForBackend(t *testing.T) {
	verifyNoLeaks(t)
	mute := muteBackend(t)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		c.HandshakeTimeout = 20 * time.Second
		c.ConnectTimeout = 20 * time.Second
	}})
	e.setBackends(mute)
	ctx := testkit.Context(t, 30*time.Second)
	var wg sync.WaitGroup
	errs := make(chan error, 40)
	body := make([]byte, 100<<10)
	for i := 0; i < 40; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx := ctx
			if i%5 == 4 {
				var cancel context.CancelFunc
				cctx, cancel = context.WithTimeout(ctx, 600*time.Millisecond)
				defer cancel()
			}
			switch i % 4 {
			case 0:
				_, err := e.client.UnaryCall(cctx, &testgrpc.SimpleRequest{Payload: &testgrpc.Payload{Body: body[:i*1000]}})
				errs <- err
			case 1:
				st, err := e.client.StreamingOutputCall(cctx, &testgrpc.StreamingOutputCallRequest{})
				if err == nil {
					_, err = st.Recv()
				}
				errs <- err
			case 2:
				st, err := e.client.StreamingInputCall(cctx)
				if err == nil {
					for j := 0; j < 5; j++ {
						if st.Send(&testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: body}}) != nil {
							break
						}
					}
					_, err = st.CloseAndRecv()
				}
				errs <- err
			case 3:
				st, err := e.client.FullDuplexCall(cctx)
				if err == nil {
					st.Send(&testgrpc.StreamingOutputCallRequest{Payload: &testgrpc.Payload{Body: body[:10]}})
					_, err = st.Recv()
				}
				errs <- err
			}
		}()
	}
	time.Sleep(300 * time.Millisecond)
	srv := e.srv.(*proxy.Server)
	sctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := srv.Shutdown(sctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Shutdown: %v, want the deadline", err)
	}
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("Shutdown took %v with a 200ms deadline", took)
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("calls still waiting 10s after Shutdown")
	}
	close(errs)
	for err := range errs {
		switch status.Code(err) {
		case codes.Unavailable, codes.DeadlineExceeded:
		default:
			t.Errorf("call: %v, want UNAVAILABLE", err)
		}
	}
}
