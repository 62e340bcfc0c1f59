package proxy_test

import (
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
