package proxy_test

import (
	"context"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestHeaderListLimits: client requests and backend responses have
// separate limits, each advertised to its peer, and the peer's own
// SETTINGS_MAX_HEADER_LIST_SIZE is respected when the proxy sends.
func TestHeaderListLimits(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1, tscfg: func(_ int, c *testserver.Config) {
		// x-big-response: N answers with N KiB of response headers.
		c.UnaryCallF = func(ctx context.Context, _ *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
			md, _ := metadata.FromIncomingContext(ctx)
			if v := md.Get("x-big-response"); len(v) == 1 {
				n, _ := strconv.Atoi(v[0])
				grpc.SetHeader(ctx, metadata.Pairs("x-big", strings.Repeat("v", n<<10)))
			}
			return &testgrpc.SimpleResponse{}, nil
		}
	}})
	ctx := testkit.Context(t, 30*time.Second)

	t.Run("advertised", func(t *testing.T) {
		r := dialRaw(t, e.addr)
		f := r.next(func(f http2.Frame) bool { s, ok := f.(*http2.SettingsFrame); return ok && !s.IsAck() }).(*http2.SettingsFrame)
		got, ok := f.Value(http2.SettingMaxHeaderListSize)
		if !ok || got != proxy.DefaultMaxHeaderListSize {
			t.Errorf("SETTINGS_MAX_HEADER_LIST_SIZE = %d (sent: %v), want %d", got, ok, proxy.DefaultMaxHeaderListSize)
		}
	})

	t.Run("request over the 60 KiB default", func(t *testing.T) {
		// grpc-go's client enforces the limit we advertise itself, so a
		// raw client sends it: one field repeated, which HPACK's dynamic
		// table makes a small frame decoding to 62 KiB.
		r := dialRaw(t, e.addr)
		var extra []string
		for range 62 {
			extra = append(extra, "x-a", strings.Repeat("v", 1000))
		}
		r.writeFields(1, "/grpc.testing.TestService/EmptyCall", extra...)
		f := r.next(func(f http2.Frame) bool { return f.Header().StreamID == 1 })
		h, ok := f.(*http2.MetaHeadersFrame)
		if !ok || h.PseudoValue("status") != "431" || field(h, "grpc-status") != "8" {
			t.Errorf("got %v, want HTTP 431 with grpc-status 8 (RESOURCE_EXHAUSTED)", f)
		}
	})

	big := func(n int) string { return strings.Repeat("v", n) }
	tests := []struct {
		name     string
		dialOpts []grpc.DialOption
		md       []string
		want     codes.Code
		wantMsg  string
	}{
		{name: "request under the 60 KiB default", md: []string{"x-big", big(50 << 10)}, want: codes.OK},
		// 200 KiB of response headers: over the request limit, under the
		// response limit.
		{name: "large response headers pass", md: []string{"x-big-response", "200"}, want: codes.OK},
		{name: "response headers over the client's limit",
			dialOpts: []grpc.DialOption{grpc.WithMaxHeaderListSize(4096)},
			md:       []string{"x-echo-big", big(8 << 10)}, want: codes.Internal, wantMsg: "client's SETTINGS_MAX_HEADER_LIST_SIZE of 4096"},
		{name: "response trailers over the client's limit",
			dialOpts: []grpc.DialOption{grpc.WithMaxHeaderListSize(4096)},
			md:       []string{"x-echo-trailer-big", big(8 << 10)}, want: codes.Internal, wantMsg: "client's SETTINGS_MAX_HEADER_LIST_SIZE of 4096"},
		{name: "response within the client's limit",
			dialOpts: []grpc.DialOption{grpc.WithMaxHeaderListSize(4096)},
			md:       []string{"x-echo-small", big(1 << 10)}, want: codes.OK},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			opts := append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, tc.dialOpts...)
			cc, err := grpc.NewClient("passthrough:///"+e.addr, opts...)
			if err != nil {
				t.Fatal(err)
			}
			defer cc.Close()
			cctx := metadata.AppendToOutgoingContext(ctx, tc.md...)
			_, err = testgrpc.NewTestServiceClient(cc).UnaryCall(cctx, &testgrpc.SimpleRequest{})
			if got := status.Code(err); got != tc.want {
				t.Fatalf("code = %v (%v), want %v", got, err, tc.want)
			}
			if tc.wantMsg != "" && !strings.Contains(status.Convert(err).Message(), tc.wantMsg) {
				t.Errorf("message %q, want it to contain %q", status.Convert(err).Message(), tc.wantMsg)
			}
			// The connection is fine after it.
			if _, err := testgrpc.NewTestServiceClient(cc).EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
				t.Errorf("next call on the connection: %v", err)
			}
		})
	}
}

// limitedBackend is a gRPC server that advertises a small
// SETTINGS_MAX_HEADER_LIST_SIZE and counts the calls it sees.
type limitedBackend struct {
	testgrpc.UnimplementedTestServiceServer
	calls atomic.Int64
}

func (b *limitedBackend) EmptyCall(context.Context, *testgrpc.Empty) (*testgrpc.Empty, error) {
	b.calls.Add(1)
	return &testgrpc.Empty{}, nil
}

// TestRequestOverBackendHeaderLimit: a request over the backend's
// advertised limit fails RESOURCE_EXHAUSTED and never reaches it; smaller
// ones do.
func TestRequestOverBackendHeaderLimit(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	ctx := testkit.Context(t, 30*time.Second)
	var b limitedBackend
	gs := grpc.NewServer(grpc.MaxHeaderListSize(2048))
	testgrpc.RegisterTestServiceServer(gs, &b)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go gs.Serve(ln)
	t.Cleanup(gs.Stop)
	e.setBackends(ln.Addr().String())

	if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatalf("small request: %v", err)
	}
	// Twice: once on a new backend connection (checked when its SETTINGS
	// arrive), once on the open one.
	for i := range 2 {
		cctx := metadata.AppendToOutgoingContext(ctx, "x-big", strings.Repeat("v", 4096))
		_, err := e.client.EmptyCall(cctx, &testgrpc.Empty{})
		if got := status.Code(err); got != codes.ResourceExhausted || !strings.Contains(err.Error(), "SETTINGS_MAX_HEADER_LIST_SIZE of 2048") {
			t.Fatalf("call %d over the backend's limit: %v, want RESOURCE_EXHAUSTED naming the limit", i, err)
		}
	}
	if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatalf("small request after: %v", err)
	}
	if got := b.calls.Load(); got != 2 {
		t.Errorf("backend saw %d calls, want the 2 small ones", got)
	}
}
