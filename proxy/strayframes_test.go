package proxy_test

import (
	"context"
	"errors"
	"io"
	"math"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// strayGlitches is the glitch budget of the tests below: small, so that a
// few dozen stray frames charged as glitches would end the connection.
const strayGlitches = 20

// TestLateWindowUpdatesOfAGoodClient: a grpc-go client reading server
// streams of several messages sends WINDOW_UPDATE for a stream whose
// END_STREAM the proxy has already sent whenever the application reads
// behind the transport, which RFC 9113 §6.9 allows ("a receiver MUST NOT
// treat this as an error"). Found from outside (loadtest/bench/rolling.sh):
// at about 130 such streams a second the proxy charged each late
// WINDOW_UPDATE to the glitch budget and cut the client with
// GOAWAY(ENHANCE_YOUR_CALM). Every call must succeed over the one
// connection the client dialed.
func TestLateWindowUpdatesOfAGoodClient(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 2, pcfg: func(c *proxy.Config) { c.MaxGlitches = strayGlitches }})
	var dials atomic.Int32
	cc, err := grpc.NewClient("passthrough:///"+e.addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(math.MaxInt32)),
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
	req := &testgrpc.StreamingOutputCallRequest{}
	for range 8 {
		req.ResponseParameters = append(req.ResponseParameters, &testgrpc.ResponseParameters{Size: 32 << 10})
	}
	const workers, perWorker = 4, 60
	errs := make(chan error, workers)
	for range workers {
		go func() {
			for range perWorker {
				cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				st, err := client.StreamingOutputCall(cctx, req)
				for err == nil {
					_, err = st.Recv()
				}
				cancel()
				if !errors.Is(err, io.EOF) {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for range workers {
		if err := <-errs; err != nil {
			t.Errorf("call failed: %v", err)
		}
	}
	if n := dials.Load(); n != 1 {
		t.Errorf("the client dialed the proxy %d times, want once: the proxy cut its connection", n)
	}
}

// TestStrayFramesOnClosedStreams: WINDOW_UPDATE and RST_STREAM on streams
// that just closed are legal in a race (RFC 9113 §5.1 "closed", §6.9); a
// client may send a few for every stream it opened without spending its
// glitch budget, while a flood on one stream still ends the connection
// (TestGlitchFloods).
func TestStrayFramesOnClosedStreams(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.MaxGlitches = strayGlitches }})
	r := dialRaw(t, e.addr)
	const streams = 3 * strayGlitches
	for i := range streams {
		id := uint32(2*i + 1)
		r.headers(id, "/grpc.testing.TestService/EmptyCall", false)
		r.fr.WriteData(id, true, grpcMsg(&testgrpc.Empty{}))
		r.next(func(f http2.Frame) bool {
			h, ok := f.(*http2.MetaHeadersFrame)
			return ok && h.StreamID == id && h.StreamEnded()
		})
		// The stream is closed on both sides: what a client whose
		// application lagged, or cancelled late, sends next.
		r.fr.WriteWindowUpdate(id, 1024)
		r.fr.WriteRSTStream(id, http2.ErrCodeCancel)
	}
	r.fr.WritePing(false, [8]byte{1})
	r.next(func(f http2.Frame) bool { p, ok := f.(*http2.PingFrame); return ok && p.IsAck() })
}
