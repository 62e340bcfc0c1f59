package proxy_test

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestProxyStatusAfterQueuedMessages: a backend sends N messages to a
// client that reads slowly, so they wait in the proxy's queue, the first
// of them partly written, then fails in a way the proxy detects itself. The
// client receives all N complete messages, then the proxy's status, as a
// direct grpc-go client reads every message before the error. The queue
// used to be dropped, head item included: the client read two messages
// and half of the third, then failed with INTERNAL "unexpected EOF".
func TestProxyStatusAfterQueuedMessages(t *testing.T) {
	// 10 KiB messages take a 16 KiB queue buffer each; the client's 16
	// KiB window stops the writer in the middle of the second.
	const n, size = 10, 10 << 10
	msg := payloadMsg(size)
	for _, tc := range []struct {
		name  string
		brk   func(s *h2Server, id uint32)
		opts  []grpc.DialOption
		want  codes.Code
		wantM string
	}{
		{
			// RFC 9113 §8.1: a second HEADERS block without END_STREAM
			// is malformed, a stream error.
			name: "second response HEADERS",
			brk:  func(s *h2Server, id uint32) { writeGRPCHeaders(s.fr, id) },
			want: codes.Internal, wantM: "streamlb: protocol error from backend",
		},
		{
			name: "trailers over the client's SETTINGS_MAX_HEADER_LIST_SIZE",
			brk: func(s *h2Server, id uint32) {
				var hb bytes.Buffer
				enc := hpack.NewEncoder(&hb)
				enc.WriteField(hpack.HeaderField{Name: "grpc-status", Value: "0"})
				enc.WriteField(hpack.HeaderField{Name: "x-big", Value: strings.Repeat("x", 3000)})
				s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true, EndStream: true})
			},
			opts: []grpc.DialOption{grpc.WithMaxHeaderListSize(2000)},
			want: codes.Internal, wantM: "SETTINGS_MAX_HEADER_LIST_SIZE",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			verifyNoLeaks(t)
			sent := make(chan struct{})
			bad := rawBackend(t, pingedH2([8]byte{'t', 'o', 'r', 'n'}, func(s *h2Server, id uint32) {
				writeGRPCHeaders(s.fr, id)
				for range n {
					s.fr.WriteData(id, false, msg)
				}
			}, func(s *h2Server, id uint32) bool {
				// The proxy queued the messages.
				tc.brk(s, id)
				close(sent)
				return true
			}))
			e := envBehind(t, bad, 128<<10)
			srv := e.srv.(*proxy.Server)
			ctx := testkit.Context(t, 30*time.Second)
			// The messages wait in the proxy until the client reads.
			cc := fixedWindowConn(t, e.addr, 16384, tc.opts...)
			st, err := testgrpc.NewTestServiceClient(cc).StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{})
			if err != nil {
				t.Fatal(err)
			}
			select {
			case <-sent:
			case <-ctx.Done():
				t.Fatal("the backend never sent its messages")
			}
			time.Sleep(50 * time.Millisecond) // for the proxy to see the failure
			msgs, err := drain(func() (*testgrpc.StreamingOutputCallResponse, error) {
				time.Sleep(5 * time.Millisecond) // a slow reader
				return st.Recv()
			})
			if got := status.Convert(err); len(msgs) != n || got.Code() != tc.want || !strings.Contains(got.Message(), tc.wantM) {
				t.Errorf("client got %d messages then %v, want %d then %v naming %q", len(msgs), err, n, tc.want, tc.wantM)
			}
			for i, m := range msgs {
				if !bytes.Equal(m.GetPayload().GetBody(), payloadMsg(size)[len(msg)-size:]) {
					t.Fatalf("message %d is not the one the backend sent", i)
				}
			}
			testkit.WaitFor(ctx, t, "the connection's buffer budget to be given back", func() bool { return srv.MaxBufferedBytes() == 0 })
		})
	}
}
