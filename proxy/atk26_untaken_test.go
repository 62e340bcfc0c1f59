package proxy_test

import (
	"errors"
	"os"
	"testing"
	"time"

	"golang.org/x/net/http2"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
)

// TestAtk26AnswerUntakenPastDeadline: a client asks for a server stream
// with a grpc-timeout of 300 ms and grants no window
// (SETTINGS_INITIAL_WINDOW_SIZE 0). The backend's whole answer, ten
// 1,000-byte messages and its OK trailers, fits the window the proxy
// grants the backend, so the backend is done and the proxy holds the
// answer for the client. The client's deadline passes: a client keeping
// to it has given up, and the call must end (DEADLINE_EXCEEDED, or a
// reset). It did not: the deadline's timer found the answer complete and
// did nothing, and --write-timeout (the socket takes every write),
// --idle-timeout (a stream is open) and --request-idle-timeout (the
// request is complete) do not apply, so the stream, the answer's bytes
// and the connection were held for as long as the client kept the
// connection open. An answer still coming when the deadline passed
// (here 20,000-byte messages, over the backend's window) ended
// DEADLINE_EXCEEDED before as now (frame engine).
func TestAtk26AnswerUntakenPastDeadline(t *testing.T) {
	verifyNoLeaks(t)
	for _, engine := range engines {
		for _, size := range []int32{1000, 20000} {
			t.Run(engine+"/"+map[int32]string{1000: "answered", 20000: "answering"}[size], func(t *testing.T) {
				if engine == "grpc-proxy" {
					t.Skip("defect: the grpc-proxy engine holds an answer the client never takes past the call's grpc-timeout: grpc-go's server queues the DATA the handler sent, and the status after it, behind the client's window with no deadline (answered: always; answering: when DATA was queued before the deadline, about one run in three)")
				}
				e := newEnv(t, envOpts{backends: 1, engine: engine})
				r := dialRawPreface(t, e.addr)
				r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
				r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: requestBlock("/grpc.testing.TestService/StreamingOutputCall", "grpc-timeout", "300m"), EndHeaders: true})
				var ps []*testgrpc.ResponseParameters
				for range 10 {
					ps = append(ps, &testgrpc.ResponseParameters{Size: size})
				}
				r.fr.WriteData(1, true, grpcMsg(&testgrpc.StreamingOutputCallRequest{ResponseParameters: ps}))
				start := time.Now()
				r.nc.SetReadDeadline(start.Add(5 * time.Second))
				for {
					fr, err := r.fr.ReadFrame()
					if errors.Is(err, os.ErrDeadlineExceeded) {
						t.Fatalf("the call did not end within %v of its 300 ms grpc-timeout", time.Since(start).Round(time.Millisecond))
					}
					if err != nil {
						t.Fatal(err)
					}
					switch fr := fr.(type) {
					case *http2.PingFrame:
						if !fr.IsAck() {
							r.fr.WritePing(true, fr.Data) // the client is alive
						}
					case *http2.RSTStreamFrame:
						if fr.StreamID == 1 {
							return
						}
					case *http2.MetaHeadersFrame:
						if fr.StreamID != 1 || !fr.StreamEnded() {
							continue
						}
						if st := field(fr, "grpc-status"); st != "4" {
							t.Fatalf("the call ended with grpc-status %q (%q), want 4 (DEADLINE_EXCEEDED)", st, field(fr, "grpc-message"))
						}
						return
					case *http2.GoAwayFrame:
						t.Fatalf("GOAWAY %v before the call ended", fr.ErrCode)
					}
				}
			})
		}
	}
}
