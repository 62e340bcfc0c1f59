package proxy_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// reqWriter writes request HEADERS frames with one HPACK encoder for the
// connection, so that repeated fields go out as dynamic-table indexes, as
// a real client's (and an attacker's) do.
type reqWriter struct {
	r   *rawConn
	buf bytes.Buffer
	enc *hpack.Encoder
}

func newReqWriter(r *rawConn) *reqWriter {
	w := &reqWriter{r: r}
	w.enc = hpack.NewEncoder(&w.buf)
	return w
}

// write sends a gRPC request's HEADERS on stream id, with extra fields.
func (w *reqWriter) write(id uint32, path string, extra ...string) error {
	w.buf.Reset()
	f := append([]string{":method", "POST", ":scheme", "http", ":path", path, ":authority", "x", "content-type", "application/grpc", "te", "trailers"}, extra...)
	for i := 0; i < len(f); i += 2 {
		w.enc.WriteField(hpack.HeaderField{Name: f[i], Value: f[i+1]})
	}
	return w.r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: w.buf.Bytes(), EndHeaders: true})
}

// TestLimitRefusalsAndTinyData: a client that keeps opening streams the
// proxy refuses because the connection reached one of its limits (the
// advertised MAX_CONCURRENT_STREAMS, the buffer budget, the header list
// size), or that trickles a message in one-byte DATA frames, spends its
// glitch budget and ends with GOAWAY(ENHANCE_YOUR_CALM), as HAProxy ends
// a client past tune.h2.fe.glitches-threshold; before, each was answered
// forever (the attack report's "still open (bounded)" rows). The good
// client on its own connection sees no error.
func TestLimitRefusalsAndTinyData(t *testing.T) {
	verifyNoLeaks(t)
	const call = "/grpc.testing.TestService/UnaryCall"
	hang := []string{testserver.MetadataHang, "1"}
	// 58 fields of 1000 bytes: 59 KiB decoded, under the 60 KiB limit.
	big := append([]string(nil), hang...)
	for range 58 {
		big = append(big, "x-a", strings.Repeat("v", 1000))
	}
	// 70 fields: over it.
	huge := append([]string(nil), hang...)
	for range 70 {
		huge = append(huge, "x-a", strings.Repeat("v", 1000))
	}
	tests := []struct {
		name  string
		pcfg  func(c *proxy.Config)
		n     int // frames the attacker is willing to send
		setup func(r *rawConn)
		send  func(r *rawConn, w *reqWriter, i int) error
	}{
		{
			name: "streams over MAX_CONCURRENT_STREAMS",
			pcfg: func(c *proxy.Config) { c.MaxConcurrentStreams = 4 },
			n:    4096,
			send: func(r *rawConn, w *reqWriter, i int) error { return w.write(uint32(2*i+1), call, hang...) },
		},
		{
			name: "retained headers over the buffer budget",
			n:    4096,
			send: func(r *rawConn, w *reqWriter, i int) error { return w.write(uint32(2*i+1), call, big...) },
		},
		{
			name: "header lists over the limit",
			n:    4096,
			send: func(r *rawConn, w *reqWriter, i int) error { return w.write(uint32(2*i+1), call, huge...) },
		},
		{
			name: "one-byte DATA frames",
			n:    1 << 20, // 10 MiB of frames
			setup: func(r *rawConn) {
				// A prefix promising 1 MiB: the backend waits for the rest.
				r.headers(1, call, false)
				prefix := make([]byte, 5)
				binary.BigEndian.PutUint32(prefix[1:], 1<<20)
				r.fr.WriteData(1, false, prefix)
			},
			send: func(r *rawConn, w *reqWriter, i int) error { return r.fr.WriteData(1, false, []byte{byte(i)}) },
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, envOpts{backends: 1, pcfg: tc.pcfg})
			good := startGoodClient(t, e)
			r := dialRaw(t, e.addr)
			r.nc.SetReadDeadline(time.Now().Add(30 * time.Second))
			if tc.setup != nil {
				tc.setup(r)
			}
			w := newReqWriter(r)
			sent := r.flood(tc.n, func(i int) error { return tc.send(r, w, i) })
			g := r.awaitGoAway()
			// A client closes a connection that ended: the proxy,
			// which reads (and drops) what comes after its GOAWAY until
			// then, may have let the flood go on meanwhile.
			r.nc.Close()
			n := <-sent
			if g == nil || g.ErrCode != http2.ErrCodeEnhanceYourCalm {
				t.Fatalf("got GOAWAY %+v, want ENHANCE_YOUR_CALM", g)
			}
			// The proxy stopped before the attacker's last frame: for the
			// stream cases the GOAWAY names a stream before the last
			// opened (the attacker's writes may all fit in the sockets'
			// buffers on a slow machine, so what it wrote says little);
			// the DATA case offers more than those buffers hold.
			if opened := uint32(2*tc.n - 1); tc.setup == nil && g.LastStreamID >= opened {
				t.Errorf("GOAWAY's last stream %d: all %d streams were taken", g.LastStreamID, tc.n)
			}
			if tc.setup != nil && n == tc.n {
				t.Errorf("all %d frames were taken", n)
			}
			t.Logf("attacker wrote %d frames before the GOAWAY (last stream %d)", n, g.LastStreamID)
			good.check(t)
		})
	}
}

// TestGoodClientManySmallMessages: a grpc-go client streaming many of the
// smallest messages there are (empty ones, 5 bytes on the wire each) and a
// server stream of small ones beside it, keeps its one connection: small
// messages are whole frames, never "tiny" ones, and cost no glitch.
func TestGoodClientManySmallMessages(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.MaxGlitches = 100 }})
	var dials atomic.Int32
	cc, err := grpc.NewClient("passthrough:///"+e.addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			dials.Add(1)
			return (&net.Dialer{}).DialContext(ctx, "tcp", addr)
		}))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	client := testgrpc.NewTestServiceClient(cc)
	ctx := testkit.Context(t, 60*time.Second)
	const msgs = 20000
	st, err := client.StreamingInputCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i := range msgs {
		if err := st.Send(&testgrpc.StreamingInputCallRequest{}); err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
	}
	resp, err := st.CloseAndRecv()
	if err != nil {
		t.Fatalf("client stream of %d empty messages: %v", msgs, err)
	}
	if got := resp.GetAggregatedPayloadSize(); got != 0 {
		t.Errorf("aggregated payload %d, want 0", got)
	}
	// A bidi stream of one-byte payloads (a 7-byte message each) both
	// ways.
	bidi, err := client.FullDuplexCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	req := &testgrpc.StreamingOutputCallRequest{
		ResponseParameters: []*testgrpc.ResponseParameters{{Size: 1}},
		Payload:            &testgrpc.Payload{Body: []byte{1}},
	}
	for i := range 5000 {
		if err := bidi.Send(req); err != nil {
			t.Fatalf("bidi send %d: %v", i, err)
		}
		if _, err := bidi.Recv(); err != nil {
			t.Fatalf("bidi recv %d: %v", i, err)
		}
	}
	bidi.CloseSend()
	if _, err := bidi.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("bidi end: %v, want EOF", err)
	}
	if n := dials.Load(); n != 1 {
		t.Errorf("the client dialed the proxy %d times, want once: the proxy cut its connection", n)
	}
}
