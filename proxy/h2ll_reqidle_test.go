package proxy_test

import (
	"context"
	"errors"
	"io"
	"testing"
	"time"

	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestH2llRequestIdleBackendNotReading: a client uploads 4 MiB as fast as
// it may to a backend that reads the first message, then works for three
// RequestIdleTimeouts without reading, then reads the rest. The client is
// not idle: it has more to send at every moment, and sends nothing only
// because the windows are spent, which the proxy returns only as the
// backend reads. RequestIdleTimeout bounds clients that hold streams by
// never finishing their requests; this call must not end on it.
func TestH2llRequestIdleBackendNotReading(t *testing.T) {
	verifyNoLeaks(t)
	const idle = 400 * time.Millisecond
	ts := startTestserver(t, testserver.Config{Name: "busy", Logger: quietLog,
		StreamingInputCallF: func(st testgrpc.TestService_StreamingInputCallServer) error {
			var sum int32
			for i := 0; ; i++ {
				m, err := st.Recv()
				if errors.Is(err, io.EOF) {
					return st.SendAndClose(&testgrpc.StreamingInputCallResponse{AggregatedPayloadSize: sum})
				}
				if err != nil {
					return err
				}
				sum += int32(len(m.GetPayload().GetBody()))
				if i == 0 {
					time.Sleep(3 * idle) // works on the first part
				}
			}
		}})
	srv, err := proxy.New(proxy.Config{Picker: pickerTo(ts.Addr()), Logger: quietLog, RequestIdleTimeout: idle})
	if err != nil {
		t.Fatal(err)
	}
	ln := serveProxy(t, srv)
	client := testgrpc.NewTestServiceClient(e2eConn(t, ln.Addr().String()))
	ctx := testkit.Context(t, 20*time.Second)
	st, err := client.StreamingInputCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	const total = 4 << 20
	body := make([]byte, 32<<10)
	for sent := 0; sent < total; sent += len(body) {
		if err := st.Send(&testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: body}}); err != nil {
			break
		}
	}
	resp, err := st.CloseAndRecv()
	if err != nil || resp.GetAggregatedPayloadSize() != total {
		t.Errorf("upload held up by its backend: %v, %d bytes at the backend, want %d", err, resp.GetAggregatedPayloadSize(), total)
	}
}

// TestH2llRequestIdleClientNotReading: the other side of
// TestH2llRequestIdleBackendNotReading. A client sends echo requests of
// 32 KiB answers on a bidi stream and never reads: the answers fill its
// window, then the proxy's queue, then the backend's, whose handler then
// stops reading, and the client's requests stop. The proxy then holds
// request bytes the backend does not take, but only because the client
// does not read: the call must still end on RequestIdleTimeout, and the
// backend's handler with it.
func TestH2llRequestIdleClientNotReading(t *testing.T) {
	verifyNoLeaks(t)
	const idle = 300 * time.Millisecond
	ts := startTestserver(t, testserver.Config{Name: "echo", Logger: quietLog})
	srv, err := proxy.New(proxy.Config{Picker: pickerTo(ts.Addr()), Logger: quietLog, RequestIdleTimeout: idle})
	if err != nil {
		t.Fatal(err)
	}
	ln := serveProxy(t, srv)
	client := testgrpc.NewTestServiceClient(fixedWindowConn(t, ln.Addr().String(), 64<<10))
	ctx := testkit.Context(t, 30*time.Second)
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	_, sent := sendWithoutReading(t, cctx, client)
	testkit.WaitFor(ctx, t, "the call on the backend", func() bool { return ts.InFlight() == 1 })
	start := time.Now()
	for ts.InFlight() != 0 {
		if time.Since(start) > 20*idle {
			t.Fatalf("a client that sends and never reads held the backend's handler for %v, RequestIdleTimeout %v", time.Since(start).Round(time.Millisecond), idle)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("the call ended after %v", time.Since(start).Round(time.Millisecond))
	cancel()
	<-sent
}

// sendWithoutReading opens a bidi call on client under ctx and sends it
// 8 KiB messages, each asking a 32 KiB answer, until a send fails (at
// most 100,000), reading nothing. It returns the call, for the caller to
// read, and the channel on which the error that ended the sends, or nil,
// comes.
func sendWithoutReading(t *testing.T, ctx context.Context, client testgrpc.TestServiceClient) (testgrpc.TestService_FullDuplexCallClient, <-chan error) {
	t.Helper()
	st, err := client.FullDuplexCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sent := make(chan error, 1)
	go func() {
		req := &testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 32 << 10}},
			Payload: &testgrpc.Payload{Body: make([]byte, 8<<10)}}
		for i := 0; i < 100_000; i++ {
			if err := st.Send(req); err != nil {
				sent <- err
				return
			}
		}
		sent <- nil
	}()
	return st, sent
}
