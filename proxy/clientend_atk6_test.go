package proxy_test

import (
	"bytes"
	"context"
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/resolver"
	"github.com/streamlb/streamlb/testserver"
)

// atk6Proxy serves engine in front of one testserver and returns its
// address, the backend and the calls it reports ended.
func atk6Proxy(t *testing.T, engine string) (string, *testserver.Server, callEnds) {
	t.Helper()
	ends := make(callEnds, 16)
	hook := func(ci proxy.CallInfo) { ends <- ci }
	if engine == "frame" {
		e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.CountCallEnd = hook }})
		return e.addr, e.backends[0], ends
	}
	ts, err := testserver.New(testserver.Config{Name: "b0", Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	if err := ts.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ts.Stop)
	d, err := director.New(director.Config{Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.UpdateState(resolver.State{Addresses: []resolver.Address{{Addr: ts.Addr()}}}); err != nil {
		t.Fatal(err)
	}
	ref, err := proxy.NewReference(proxy.ReferenceConfig{Picker: d, Logger: quietLog, OnCallEnd: hook})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serveOn(t, ref, ln)
	return ln.Addr().String(), ts, ends
}

// rawCall opens stream id on r with the request headers of a unary call
// plus extra, and sends an empty request message, ending the request.
func rawCall(t *testing.T, r *rawConn, id uint32, path string, extra ...string) {
	t.Helper()
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	f := append([]string{":method", "POST", ":scheme", "http", ":path", path, ":authority", "x", "content-type", "application/grpc", "te", "trailers"}, extra...)
	for i := 0; i < len(f); i += 2 {
		enc.WriteField(hpack.HeaderField{Name: f[i], Value: f[i+1]})
	}
	if err := r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
	if err := r.fr.WriteData(id, true, make([]byte, 5)); err != nil {
		t.Fatal(err)
	}
}

// TestAtk6DeadlineResetIsDeadline: a gRPC client resets its call with
// CANCEL when its deadline passes, a moment before the proxy's own timer
// for the grpc-timeout it sent (started when the request arrived). The
// client reports DEADLINE_EXCEEDED, and so must the access log and
// streamlb_calls_finished_total. Before the fix both engines reported
// CANCELLED for most such calls (grpc-go clients always reset first).
func TestAtk6DeadlineResetIsDeadline(t *testing.T) {
	for _, engine := range engines {
		t.Run(engine, func(t *testing.T) {
			addr, ts, ends := atk6Proxy(t, engine)
			ctx := testkit.Context(t, 20*time.Second)
			r := dialRaw(t, addr)
			const timeout = 300 * time.Millisecond
			sent := time.Now()
			rawCall(t, r, 1, "/grpc.testing.TestService/UnaryCall", "grpc-timeout", "300m", testserver.MetadataHang, "1")
			testkit.WaitFor(ctx, t, "the call to reach the backend", func() bool { return ts.InFlight() == 1 })
			// As grpc-go's client does at its deadline, which it counts
			// from before it sent the request.
			<-time.After(timeout - 10*time.Millisecond - time.Since(sent))
			if err := r.fr.WriteRSTStream(1, http2.ErrCodeCancel); err != nil {
				t.Fatal(err)
			}
			if ci := ends.next(t, ctx); ci.Code != codes.DeadlineExceeded {
				t.Errorf("call reported %v (%q), want DeadlineExceeded", ci.Code, ci.Message)
			}
		})
	}
}

// TestAtk6RefClientCancelIsCanceled: a client that cancels a bidi stream
// through the grpc-proxy engine after an exchange must be reported
// CANCELLED. grpc-proxy's pump turns the failed read of the client stream
// into INTERNAL ("failed proxying s2c"), which the engine reported (7 in
// 10 calls before the fix): a proxy fault counted for every client that
// hangs up a stream.
func TestAtk6RefClientCancelIsCanceled(t *testing.T) {
	addr, _, ends := atk6Proxy(t, "grpc-proxy")
	ctx := testkit.Context(t, 20*time.Second)
	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	client := testgrpc.NewTestServiceClient(cc)
	for i := range 8 {
		cctx, cancel := context.WithCancel(ctx)
		st, err := client.FullDuplexCall(cctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := st.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 10}}}); err != nil {
			t.Fatal(err)
		}
		if _, err := st.Recv(); err != nil {
			t.Fatal(err)
		}
		cancel()
		if ci := ends.next(t, ctx); ci.Code != codes.Canceled {
			t.Errorf("stream %d reported %v (%q), want Canceled", i, ci.Code, ci.Message)
		}
	}
}
