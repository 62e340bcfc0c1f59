package proxy_test

import (
	"github.com/streamlb/streamlb/internal/testkit"

	"net"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// TestTrailersOnlyFromBackend relays a backend's trailers-only response
// (a status and trailer metadata, no headers, no message), as grpc-go
// sends it when a handler fails before sending anything.
func TestTrailersOnlyFromBackend(t *testing.T) {
	for _, engine := range engines {
		t.Run(engine, func(t *testing.T) {
			verifyNoLeaks(t)
			bare := grpc.NewServer(grpc.UnknownServiceHandler(func(_ any, ss grpc.ServerStream) error {
				ss.SetTrailer(metadata.Pairs("x-reason", "gone", "x-blob-bin", "\x00\x01"))
				return status.Error(codes.NotFound, "no such thing: ünïcode")
			}))
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			go bare.Serve(ln)
			t.Cleanup(bare.Stop)

			e := newEnv(t, envOpts{engine: engine, backends: 1})
			e.setBackends(ln.Addr().String())
			ctx := testkit.Context(t, 20*time.Second)
			call := func(c testgrpc.TestServiceClient) callResult {
				var h, tr metadata.MD
				_, err := c.EmptyCall(ctx, &testgrpc.Empty{}, grpc.Header(&h), grpc.Trailer(&tr))
				return observe(h, tr, err)
			}
			want := call(testgrpc.NewTestServiceClient(e.dial(ln.Addr().String())))
			got := call(e.client)
			if want.code != codes.NotFound {
				t.Fatalf("direct call: %+v, want NotFound (the test server is wrong)", want)
			}
			if diff := cmp.Diff(want, got, cmp.AllowUnexported(callResult{})); diff != "" {
				if engine == "frame" || got.code != want.code {
					t.Errorf("proxied trailers-only response differs (-direct +proxied):\n%s", diff)
				} else {
					t.Logf("reference engine differs (-direct +proxied):\n%s", diff)
				}
			}
		})
	}
}

// TestStreamingStatusMatchesDirect: a server stream that sends messages,
// then fails, looks the same through the proxy as directly.
func TestStreamingStatusMatchesDirect(t *testing.T) {
	for _, engine := range engines {
		t.Run(engine, func(t *testing.T) {
			verifyNoLeaks(t)
			e := newEnv(t, envOpts{engine: engine, backends: 1})
			ctx := testkit.Context(t, 20*time.Second)
			md := metadata.Pairs("x-echo-k", "v", "x-echo-trailer-t", "tv")
			req := &testgrpc.StreamingOutputCallRequest{
				ResponseParameters: []*testgrpc.ResponseParameters{{Size: 10}, {Size: 70000}},
				ResponseStatus:     &testgrpc.EchoStatus{Code: int32(codes.Aborted), Message: "after two messages"},
			}
			run := func(c testgrpc.TestServiceClient) (int, callResult) {
				st, err := c.StreamingOutputCall(metadata.NewOutgoingContext(ctx, md), req)
				if err != nil {
					t.Fatal(err)
				}
				msgs, err := drain(st.Recv)
				h, _ := st.Header()
				return len(msgs), observe(h, st.Trailer(), err)
			}
			wantN, want := run(e.direct(0))
			gotN, got := run(e.client)
			if gotN != wantN || wantN != 2 {
				t.Errorf("got %d messages through the proxy, %d directly; want 2", gotN, wantN)
			}
			if diff := cmp.Diff(want, got, cmp.AllowUnexported(callResult{})); diff != "" {
				if engine == "frame" || got.code != want.code {
					t.Errorf("proxied stream differs (-direct +proxied):\n%s", diff)
				} else {
					t.Logf("reference engine differs (-direct +proxied):\n%s", diff)
				}
			}
		})
	}
}
