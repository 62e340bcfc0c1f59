package proxy_test

import (
	"testing"
	"time"

	"golang.org/x/net/http2"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
)

// TestAtk26GRPCProxyDeadlineWhileAnswering: with the grpc-proxy engine,
// twenty server streams, one after the other on one connection, whose
// client grants no window and whose 30 ms grpc-timeout passes while the
// backend still answers (ten 20,000-byte messages, over the window
// grpc-go grants it); the client cancels each 100 ms on. Under -race
// it failed about one run in three: grpc-proxy's handler, its send to the
// client failed, read the backend stream's trailers (ClientStream.Trailer)
// while grpc-go's transport was writing them as the stream closed, a
// data race (refConn.NewStream's trailerGuard now answers nil until
// RecvMsg has returned an error).
func TestAtk26GRPCProxyDeadlineWhileAnswering(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1, engine: "grpc-proxy"})
	r := dialRawPreface(t, e.addr)
	r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
	var ps []*testgrpc.ResponseParameters
	for range 10 {
		ps = append(ps, &testgrpc.ResponseParameters{Size: 20000})
	}
	req := grpcMsg(&testgrpc.StreamingOutputCallRequest{ResponseParameters: ps})
	for i := range 20 {
		id := uint32(2*i + 1)
		r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: requestBlock("/grpc.testing.TestService/StreamingOutputCall", "grpc-timeout", "30m"), EndHeaders: true})
		r.fr.WriteData(id, true, req)
		// The deadline passes while the handler waits to send; a client
		// keeping to it cancels the stream, as this one does 100 ms on.
		time.Sleep(100 * time.Millisecond)
		r.fr.WriteRSTStream(id, http2.ErrCodeCancel)

	}
}
