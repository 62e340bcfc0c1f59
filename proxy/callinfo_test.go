package proxy_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// callEnds collects what Config.OnCallEnd reports.
type callEnds chan proxy.CallInfo

func (ch callEnds) next(t *testing.T, ctx context.Context) proxy.CallInfo {
	t.Helper()
	select {
	case ci := <-ch:
		return ci
	case <-ctx.Done():
		t.Fatal("no call-end report")
		return proxy.CallInfo{}
	}
}

// TestOnCallEnd: every call is reported once, after it ended, with the
// backend that answered (as its own x-backend names it), the status the
// client got, the bytes relayed, the retries and the limit that refused it.
//
// CountCallEnd, called inline where OnCallEnd's calls are queued, reports
// the same.
func TestOnCallEnd(t *testing.T) {
	for _, hook := range []string{"OnCallEnd", "CountCallEnd"} {
		t.Run(hook, func(t *testing.T) { testCallEnd(t, hook) })
	}
}

func testCallEnd(t *testing.T, hook string) {
	verifyNoLeaks(t)
	ends := make(callEnds, 16)
	e := newEnv(t, envOpts{backends: 2,
		tscfg: func(i int, c *testserver.Config) {
			if i == 0 {
				c.ErrorRate = 1 // b0 answers UNAVAILABLE: calls are retried on b1
			}
		},
		pcfg: func(c *proxy.Config) {
			if hook == "CountCallEnd" {
				// A buffered send with room: it does not block.
				c.CountCallEnd = func(ci proxy.CallInfo) { ends <- ci }
			} else {
				c.OnCallEnd = func(ci proxy.CallInfo) { ends <- ci }
			}
			c.RetryOn = []string{"/grpc.testing.TestService/UnaryCall"}
			c.MaxStreams = 1
		},
		dcfg: func(c *director.Config) { c.EjectAfter = -1 },
	})
	ctx := testkit.Context(t, 20*time.Second)
	name := map[string]string{e.backends[0].Addr(): "b0", e.backends[1].Addr(): "b1"}

	// A unary call with payloads both ways; b0 fails it, so it ends on b1
	// after one or two attempts, depending on the round robin's turn.
	var hdr metadata.MD
	req := &testgrpc.SimpleRequest{Payload: &testgrpc.Payload{Body: make([]byte, 1000)}, ResponseSize: 500}
	if _, err := e.client.UnaryCall(ctx, req, grpc.Header(&hdr)); err != nil {
		t.Fatal(err)
	}
	ci := ends.next(t, ctx)
	if ci.Method != "/grpc.testing.TestService/UnaryCall" || ci.Code != codes.OK || ci.ProxyStatus {
		t.Errorf("got %+v, want an OK UnaryCall with the backend's status", ci)
	}
	if got, want := name[ci.Backend], testserver.BackendFromHeader(hdr); got != want {
		t.Errorf("Backend %s (%s), want %s (x-backend)", ci.Backend, got, want)
	}
	if ci.RequestBytes < 1000 || ci.ResponseBytes < 500 {
		t.Errorf("bytes in %d, out %d; want at least the payloads 1000 and 500", ci.RequestBytes, ci.ResponseBytes)
	}
	if ci.Client == nil || !strings.HasPrefix(ci.Client.String(), "127.0.0.1:") || ci.Start.IsZero() || ci.Duration <= 0 {
		t.Errorf("client %v, start %v, duration %v", ci.Client, ci.Start, ci.Duration)
	}

	// Retries: sooner or later a call is first sent to b0.
	retried := false
	for i := 0; i < 4 && !retried; i++ {
		if _, err := e.client.UnaryCall(ctx, req); err != nil {
			t.Fatal(err)
		}
		ci := ends.next(t, ctx)
		if ci.Attempts == 2 {
			retried = true
			if name[ci.Backend] != "b1" {
				t.Errorf("retried call ended on %s, want b1", name[ci.Backend])
			}
		}
	}
	if !retried {
		t.Error("no call reported 2 attempts")
	}

	// A backend's failure is reported with its code and message.
	fctx := metadata.AppendToOutgoingContext(ctx, testserver.MetadataFailCode, "5", testserver.MetadataFailMessage, "no such thing")
	if _, err := e.client.EmptyCall(fctx, &testgrpc.Empty{}); status.Code(err) != codes.NotFound {
		t.Fatalf("got %v, want NOT_FOUND", err)
	}
	ci = ends.next(t, ctx)
	if ci.Code != codes.NotFound || ci.Message != "no such thing" || ci.ProxyStatus || ci.Limit != "" {
		t.Errorf("got %+v, want the backend's NOT_FOUND", ci)
	}

	// MaxStreams 1: a call while another hangs is refused by the proxy.
	hctx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(ctx, testserver.MetadataHang, "1"))
	hung := make(chan error, 1)
	go func() { _, err := e.client.EmptyCall(hctx, &testgrpc.Empty{}); hung <- err }()
	testkit.WaitFor(ctx, t, "the hanging call to reach a backend", func() bool {
		return e.backends[0].InFlight()+e.backends[1].InFlight() == 1
	})
	if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("got %v, want RESOURCE_EXHAUSTED", err)
	}
	ci = ends.next(t, ctx)
	if ci.Code != codes.ResourceExhausted || !ci.ProxyStatus || ci.Limit != proxy.LimitMaxStreams || ci.Backend != "" {
		t.Errorf("got %+v, want RESOURCE_EXHAUSTED by the proxy for max_streams", ci)
	}
	cancel()
	<-hung
	ci = ends.next(t, ctx)
	if ci.Code != codes.Canceled {
		t.Errorf("cancelled call reported %v, want CANCELLED", ci.Code)
	}
	select {
	case ci := <-ends:
		t.Errorf("unexpected report %+v", ci)
	default:
	}
}

// TestCallEndBytesBothEngines: the grpc-proxy engine reports the bytes a
// call relayed as the frame engine does (each message and its 5-byte
// prefix, both ways): the same calls give the same counts. It reported
// none (0 in the access log's bytes_in and bytes_out, and in
// streamlb_request_bytes_total and streamlb_response_bytes_total).
func TestCallEndBytesBothEngines(t *testing.T) {
	type counts struct{ in, out int64 }
	got := map[string][]counts{}
	for _, engine := range []string{"frame", "grpc-proxy"} {
		ends := make(callEnds, 4)
		e := newEnv(t, envOpts{backends: 1, engine: engine,
			pcfg: func(c *proxy.Config) { c.OnCallEnd = func(ci proxy.CallInfo) { ends <- ci } },
			rcfg: func(c *proxy.ReferenceConfig) { c.OnCallEnd = func(ci proxy.CallInfo) { ends <- ci } },
		})
		ctx := testkit.Context(t, 20*time.Second)
		req := &testgrpc.SimpleRequest{Payload: &testgrpc.Payload{Body: make([]byte, 1000)}, ResponseSize: 500}
		if _, err := e.client.UnaryCall(ctx, req); err != nil {
			t.Fatal(err)
		}
		ci := ends.next(t, ctx)
		got[engine] = append(got[engine], counts{ci.RequestBytes, ci.ResponseBytes})
		st, err := e.client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 70000}, {Size: 3}, {Size: 0}}})
		if err != nil {
			t.Fatal(err)
		}
		for {
			if _, err := st.Recv(); err != nil {
				break
			}
		}
		ci = ends.next(t, ctx)
		got[engine] = append(got[engine], counts{ci.RequestBytes, ci.ResponseBytes})
	}
	f, r := got["frame"], got["grpc-proxy"]
	for i := range f {
		if f[i].in == 0 || f[i].out == 0 || f[i] != r[i] {
			t.Errorf("call %d: frame engine counted %+v, grpc-proxy engine %+v; want the same, not zero", i, f[i], r[i])
		}
	}
}
