package proxy_test

import (
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/internal/testkit"
)

// TestReplayKeepsRequestsUnderRetryBuffer: a client-streaming call of
// five or six 9,000-byte messages (45-54 KB, under the default 64 KiB
// retry buffer) that a backend refuses with REFUSED_STREAM after reading
// all of it is retried on another backend. Its replay was counted by the
// capacity of the buffers the messages were written from, a 16 KiB one
// per 9 KB message, so the call lost its retryability at the fifth
// message and failed.
func TestReplayKeepsRequestsUnderRetryBuffer(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1, dcfg: func(c *director.Config) { c.EjectAfter = -1 }})
	var refused atomic.Int32
	bad := rawBackend(t, h2Frames(func(s *h2Server, f http2.Frame) bool {
		d, ok := f.(*http2.DataFrame)
		if !ok {
			return true
		}
		if n := len(d.Data()); n > 0 && s.fr.WriteWindowUpdate(0, uint32(n)) != nil {
			return false
		}
		if !d.StreamEnded() {
			return true
		}
		// The whole request arrived; refused without processing it
		// (RFC 9113 §8.7), so the proxy must send it elsewhere.
		refused.Add(1)
		return s.fr.WriteRSTStream(d.StreamID, http2.ErrCodeRefusedStream) == nil
	}))
	e.setBackends(bad, e.backends[0].Addr())
	ctx := testkit.Context(t, 60*time.Second)
	const size = 9000
	for _, msgs := range []int{5, 6} {
		for rep := range 4 {
			st, err := e.client.StreamingInputCall(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for range msgs {
				if err = st.Send(&testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: make([]byte, size)}}); err != nil {
					break
				}
				// Each message goes to the backend on its own, so the
				// replay keeps them one by one.
				time.Sleep(2 * time.Millisecond)
			}
			var resp *testgrpc.StreamingInputCallResponse
			if err == nil {
				resp, err = st.CloseAndRecv()
			}
			what := fmt.Sprintf("%d messages of %d bytes, call %d", msgs, size, rep)
			switch {
			case err != nil:
				t.Errorf("%s: %v (a request under the retry buffer must be retried after REFUSED_STREAM)", what, err)
			case resp.GetAggregatedPayloadSize() != int32(msgs*size):
				t.Errorf("%s: the backend got %d bytes of payload, want %d", what, resp.GetAggregatedPayloadSize(), msgs*size)
			}
		}
	}
	if refused.Load() == 0 {
		t.Fatal("the refusing backend got no call; the test proves nothing")
	}
	t.Logf("%d calls refused by the first backend, retried", refused.Load())
}
