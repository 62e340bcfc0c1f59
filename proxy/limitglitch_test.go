package proxy_test

import (
	"bufio"
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

// TestGoAwayReachesSlowReader: a client whose connection ends in a
// connection error (here the glitch budget, spent on header lists over
// the limit) while it is still sending, and that reads the proxy's
// answers slowly (a 4 KiB receive buffer, 25 KB/s), still gets the GOAWAY
// that says why. It takes the proxy's writer more than a second to get
// through the answers queued before it. Before, the reader gave the
// writer a second, then closed the socket with the client's frames unread,
// so the kernel answered with a TCP RST and dropped what the client had
// not taken yet: the client saw "connection reset by peer" and no GOAWAY.
// The reader now waits while the writer makes progress, reading and
// dropping what the client sends (transport.drainAfterError).
func TestGoAwayReachesSlowReader(t *testing.T) {
	verifyNoLeaks(t)
	const call = "/grpc.testing.TestService/UnaryCall"
	huge := []string{testserver.MetadataHang, "1"}
	for range 70 {
		huge = append(huge, "x-a", strings.Repeat("v", 1000))
	}
	// The linger after the GOAWAY is long enough for the slow client
	// to read up to it on a loaded machine; what comes after it, the
	// proxy's close, resets a client still sending.
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.ShutdownLinger = 10 * time.Second }})
	r := dialRaw(t, e.addr)
	if err := r.nc.(*net.TCPConn).SetReadBuffer(4 << 10); err != nil {
		t.Fatal(err)
	}
	r.nc.SetReadDeadline(time.Now().Add(30 * time.Second))
	r.fr = http2.NewFramer(r.nc, bufio.NewReader(&pacedReader{r: r.nc, n: 256, every: 10 * time.Millisecond}))
	r.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	w := newReqWriter(r)
	start := time.Now()
	sent := r.flood(4096, func(i int) error { return w.write(uint32(2*i+1), call, huge...) })
	g := r.awaitGoAway()
	r.nc.Close()
	<-sent
	if g == nil || g.ErrCode != http2.ErrCodeEnhanceYourCalm {
		t.Fatalf("got GOAWAY %+v after %v, want ENHANCE_YOUR_CALM", g, time.Since(start))
	}
	t.Logf("GOAWAY (last stream %d) read after %v", g.LastStreamID, time.Since(start))
}

// pacedReader reads at most n bytes per every.
type pacedReader struct {
	r     io.Reader
	n     int
	every time.Duration
}

func (p *pacedReader) Read(b []byte) (int, error) {
	time.Sleep(p.every)
	return p.r.Read(b[:min(len(b), p.n)])
}

// TestConnErrorNonReaderClosed: a client that does not read, with
// streams of responses queued toward it, then makes a connection error:
// the proxy closes it within a couple of seconds, although its reader
// now goes on draining the client's bytes after the error
// (drainAfterError): once the writer has written the GOAWAY into the
// socket's buffer, at the end of its linger (ShutdownLinger); if it is
// stuck in a write, once the write moved no byte for a second; never
// at drainAfterError's ten-second bound.
func TestConnErrorNonReaderClosed(t *testing.T) {
	verifyNoLeaks(t)
	addr := rawStreamServer(t)
	srv, err := proxy.New(proxy.Config{Picker: pickerTo(addr), Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	ln := serveProxy(t, srv)
	ctx := testkit.Context(t, 30*time.Second)
	r := dialTiny(t, ln.Addr().String())
	const streams = 8
	for i := range streams {
		id := uint32(2*i + 1)
		r.headers(id, "/x.Y/Z", false)
		r.fr.WriteData(id, true, streamRequest(uint32(i), 4000, 16379, 8000, 5000))
	}
	testkit.WaitFor(ctx, t, "a blocked writer", func() bool { return srv.MaxBufferedBytes() > 100_000 })
	// A WINDOW_UPDATE of 0 on the connection: a connection error
	// PROTOCOL_ERROR (RFC 9113 §6.9).
	r.fr.AllowIllegalWrites = true
	if err := r.fr.WriteWindowUpdate(0, 0); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	testkit.WaitFor(ctx, t, "the connection to close", func() bool { return srv.ClientConns() == 0 })
	if d := time.Since(start); d > 6*time.Second {
		t.Errorf("closed %v after the connection error", d)
	}
	t.Logf("closed %v after the connection error", time.Since(start))
}
