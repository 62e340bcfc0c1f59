package proxy_test

import (
	"bytes"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestAtk6ClientStreamErrorReported: a client that breaks HTTP/2 on a
// call (request trailers without END_STREAM, RFC 9113 §8.1) has its
// stream reset by the proxy with PROTOCOL_ERROR, which a gRPC client
// reports as INTERNAL. The call was reported CANCELLED, "client reset the
// stream", as if the client had given up.
func TestAtk6ClientStreamErrorReported(t *testing.T) {
	ends := make(callEnds, 4)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.CountCallEnd = func(ci proxy.CallInfo) { ends <- ci } }})
	ctx := testkit.Context(t, 10*time.Second)
	r := dialRaw(t, e.addr)
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for _, f := range [][2]string{{":method", "POST"}, {":scheme", "http"}, {":path", "/grpc.testing.TestService/FullDuplexCall"}, {":authority", "x"},
		{"content-type", "application/grpc"}, {"te", "trailers"}, {testserver.MetadataHang, "1"}} {
		enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	if err := r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb.Bytes(), EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
	if err := r.fr.WriteData(1, false, make([]byte, 5)); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(ctx, t, "the call to reach the backend", func() bool { return e.backends[0].InFlight() == 1 })
	hb.Reset()
	enc.WriteField(hpack.HeaderField{Name: "x-trailer", Value: "1"})
	if err := r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb.Bytes(), EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
	rst := r.next(func(f http2.Frame) bool { _, ok := f.(*http2.RSTStreamFrame); return ok }).(*http2.RSTStreamFrame)
	ci := ends.next(t, ctx)
	if rst.ErrCode != http2.ErrCodeProtocol || ci.Code != codes.Internal || !ci.ProxyStatus {
		t.Errorf("client got RST_STREAM %v; call reported %v (%q), proxy status %v; want INTERNAL", rst.ErrCode, ci.Code, ci.Message, ci.ProxyStatus)
	}
}
