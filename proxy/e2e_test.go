package proxy_test

import (
	"context"
	"io"
	"strconv"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

func TestRPCKinds(t *testing.T) {
	for _, engine := range engines {
		t.Run(engine, func(t *testing.T) {
			verifyNoLeaks(t)
			e := newEnv(t, envOpts{engine: engine})
			ctx := testkit.Context(t, 20*time.Second)

			t.Run("unary", func(t *testing.T) {
				var hdr metadata.MD
				resp, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: 100, Payload: &testgrpc.Payload{Body: []byte("hello")}}, grpc.Header(&hdr))
				if err != nil {
					t.Fatal(err)
				}
				if got := len(resp.GetPayload().GetBody()); got != 100 {
					t.Errorf("payload %d bytes, want 100", got)
				}
				if name := testserver.BackendFromHeader(hdr); name == "" || name != resp.GetHostname() {
					t.Errorf("x-backend %q, hostname %q: want equal and non-empty", name, resp.GetHostname())
				}
			})
			t.Run("server-streaming", func(t *testing.T) {
				st, err := e.client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{
					ResponseParameters: []*testgrpc.ResponseParameters{{Size: 10}, {Size: 20000}, {Size: 30}},
				})
				if err != nil {
					t.Fatal(err)
				}
				msgs, err := drain(st.Recv)
				if err != nil {
					t.Fatal(err)
				}
				var sizes []int
				for _, m := range msgs {
					sizes = append(sizes, len(m.GetPayload().GetBody()))
				}
				if len(sizes) != 3 || sizes[0] != 10 || sizes[1] != 20000 || sizes[2] != 30 {
					t.Errorf("got sizes %v, want [10 20000 30]", sizes)
				}
			})
			t.Run("client-streaming", func(t *testing.T) {
				st, err := e.client.StreamingInputCall(ctx)
				if err != nil {
					t.Fatal(err)
				}
				total := 0
				for _, n := range []int{1, 1000, 70000} {
					total += n
					if err := st.Send(&testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: make([]byte, n)}}); err != nil {
						t.Fatal(err)
					}
				}
				resp, err := st.CloseAndRecv()
				if err != nil {
					t.Fatal(err)
				}
				if got := int(resp.GetAggregatedPayloadSize()); got != total {
					t.Errorf("aggregated %d, want %d", got, total)
				}
			})
			t.Run("bidi", func(t *testing.T) {
				st, err := e.client.FullDuplexCall(ctx)
				if err != nil {
					t.Fatal(err)
				}
				for i := 1; i <= 5; i++ {
					if err := st.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: int32(i * 1000)}}}); err != nil {
						t.Fatal(err)
					}
					m, err := st.Recv()
					if err != nil {
						t.Fatal(err)
					}
					if got := len(m.GetPayload().GetBody()); got != i*1000 {
						t.Errorf("message %d: %d bytes, want %d", i, got, i*1000)
					}
				}
				if err := st.CloseSend(); err != nil {
					t.Fatal(err)
				}
				if _, err := drain(st.Recv); err != nil {
					t.Fatal(err)
				}
			})
		})
	}
}

// callResult is everything a client observes of one call.
type callResult struct {
	header, trailer metadata.MD
	code            codes.Code
	msg             string
	details         int
}

func observe(hdr, trl metadata.MD, err error) callResult {
	st := status.Convert(err)
	// Timing and transport-level keys differ between any two calls.
	delete(hdr, "date")
	return callResult{header: hdr, trailer: trl, code: st.Code(), msg: st.Message(), details: len(st.Details())}
}

func TestMetadataAndStatusMatchDirect(t *testing.T) {
	bin := string([]byte{0, 1, 2, 0xff, 0xfe})
	cases := []struct {
		name string
		md   metadata.MD
		req  *testgrpc.SimpleRequest
	}{
		{name: "ok with echoed metadata", md: metadata.Pairs("x-echo-a", "1", "x-echo-data-bin", bin, "x-echo-trailer-t", "tv"), req: &testgrpc.SimpleRequest{ResponseSize: 10}},
		{name: "status with non-ASCII message", req: &testgrpc.SimpleRequest{ResponseStatus: &testgrpc.EchoStatus{Code: int32(codes.FailedPrecondition), Message: "héllo wörld ✓ 100%"}}},
		{name: "trailers-only failure", md: metadata.Pairs("x-fail-code", "5", "x-fail-message", "not here")},
		{name: "binary metadata both ways", md: metadata.Pairs("x-echo-blob-bin", bin+bin, "x-echo-trailer-blob-bin", bin)},
	}
	for _, engine := range engines {
		t.Run(engine, func(t *testing.T) {
			verifyNoLeaks(t)
			e := newEnv(t, envOpts{engine: engine})
			ctx := testkit.Context(t, 20*time.Second)
			for _, tc := range cases {
				t.Run(tc.name, func(t *testing.T) {
					req := tc.req
					if req == nil {
						req = &testgrpc.SimpleRequest{}
					}
					var ph, pt metadata.MD
					_, perr := e.client.UnaryCall(metadata.NewOutgoingContext(ctx, tc.md), req, grpc.Header(&ph), grpc.Trailer(&pt))
					name := testserver.BackendFromHeader(ph)
					if name == "" {
						name = pt.Get(testserver.TrailerBackend)[0]
					}
					b := e.backendByName(name)
					if b == nil {
						t.Fatalf("call was not attributed to a backend (header %v trailer %v, err %v)", ph, pt, perr)
					}
					var dh, dt metadata.MD
					direct := testgrpc.NewTestServiceClient(e.dial(b.Addr()))
					_, derr := direct.UnaryCall(metadata.NewOutgoingContext(ctx, tc.md), req, grpc.Header(&dh), grpc.Trailer(&dt))
					got, want := observe(ph, pt, perr), observe(dh, dt, derr)
					diff := cmp.Diff(want, got, cmp.AllowUnexported(callResult{}))
					if diff == "" {
						return
					}
					if engine == "frame" || got.code != want.code {
						t.Errorf("proxied call differs from direct call (-direct +proxied):\n%s", diff)
					} else {
						t.Logf("reference engine differs from a direct call beyond the status (-direct +proxied):\n%s", diff)
					}
				})
			}
		})
	}
}

func TestLargeMessage(t *testing.T) {
	const size = 64 << 20
	for _, engine := range engines {
		t.Run(engine, func(t *testing.T) {
			verifyNoLeaks(t)
			e := newEnv(t, envOpts{engine: engine, backends: 1})
			ctx := testkit.Context(t, 60*time.Second)
			body := testserver.PayloadBody(size)
			var trl metadata.MD
			resp, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: size, Payload: &testgrpc.Payload{Body: body}}, grpc.Trailer(&trl))
			if err != nil {
				t.Fatal(err)
			}
			if got := trl.Get(testserver.TrailerRequestPayloadSize); len(got) != 1 || got[0] != strconv.Itoa(size) {
				t.Errorf("backend saw request payload %v, want %d", got, size)
			}
			if got := len(resp.GetPayload().GetBody()); got != size {
				t.Fatalf("response payload %d bytes, want %d", got, size)
			}
			if err := testserver.CheckPayloadBody(resp.GetPayload().GetBody()); err != nil {
				t.Error(err)
			}
		})
	}
}

func TestThousandConcurrentStreams(t *testing.T) {
	const n = 1000
	for _, engine := range engines {
		t.Run(engine, func(t *testing.T) {
			verifyNoLeaks(t)
			e := newEnv(t, envOpts{engine: engine})
			ctx := testkit.Context(t, 60*time.Second)
			streams := make([]testgrpc.TestService_FullDuplexCallClient, n)
			var g errgroup.Group
			g.SetLimit(100)
			for i := range streams {
				g.Go(func() error {
					st, err := e.client.FullDuplexCall(ctx)
					if err != nil {
						return err
					}
					streams[i] = st
					if err := st.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 10}}}); err != nil {
						return err
					}
					_, err = st.Recv()
					return err
				})
			}
			if err := g.Wait(); err != nil {
				t.Fatal(err)
			}
			// Every stream is open at once on the one client connection.
			var inflight int64
			for _, b := range e.backends {
				inflight += b.InFlight()
			}
			if inflight != n {
				t.Fatalf("backends have %d calls in flight, want %d", inflight, n)
			}
			for _, st := range streams {
				g.Go(func() error {
					if err := st.CloseSend(); err != nil {
						return err
					}
					_, err := drain(st.Recv)
					return err
				})
			}
			if err := g.Wait(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestEvenSplit checks one client connection's calls spread evenly: each of
// three backends within 33±5%.
func TestEvenSplit(t *testing.T) {
	const calls = 3000
	for _, engine := range engines {
		t.Run(engine, func(t *testing.T) {
			verifyNoLeaks(t)
			e := newEnv(t, envOpts{engine: engine})
			count := spread(t, e, calls, 30, nil)
			for _, b := range e.backends {
				share := float64(count[b.Name()]) / calls * 100
				if share < 100.0/3-5 || share > 100.0/3+5 {
					t.Errorf("backend %s got %.1f%% of calls, want 33±5%% (counts %v)", b.Name(), share, count)
				}
				if got := b.MethodCalls("/grpc.testing.TestService/EmptyCall"); got != int64(count[b.Name()]) {
					t.Errorf("backend %s counted %d calls, clients attributed %d", b.Name(), got, count[b.Name()])
				}
			}
		})
	}
}

// TestSlowConsumer checks flow control is per stream: a response stream the
// client does not read stalls only itself, and nothing of it is lost.
func TestSlowConsumer(t *testing.T) {
	const msgs, size = 200, 64 << 10
	for _, engine := range engines {
		t.Run(engine, func(t *testing.T) {
			verifyNoLeaks(t)
			e := newEnv(t, envOpts{engine: engine})
			ctx := testkit.Context(t, 60*time.Second)
			params := make([]*testgrpc.ResponseParameters, msgs)
			for i := range params {
				params[i] = &testgrpc.ResponseParameters{Size: size}
			}
			slow, err := e.client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{ResponseParameters: params})
			if err != nil {
				t.Fatal(err)
			}
			first, err := slow.Recv() // the stream is established; now stop reading
			if err != nil {
				t.Fatal(err)
			}
			for i := range 50 {
				if _, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: 1000}); err != nil {
					t.Fatalf("call %d beside a stalled stream: %v", i, err)
				}
			}
			rest, err := drain(slow.Recv)
			if err != nil {
				t.Fatal(err)
			}
			if got := len(rest) + 1; got != msgs {
				t.Errorf("slow stream delivered %d messages, want %d", got, msgs)
			}
			for _, m := range append(rest, first) {
				if len(m.GetPayload().GetBody()) != size {
					t.Fatalf("message of %d bytes, want %d", len(m.GetPayload().GetBody()), size)
				}
			}
		})
	}
}

func TestCancellationReachesBackend(t *testing.T) {
	for _, engine := range engines {
		t.Run(engine, func(t *testing.T) {
			verifyNoLeaks(t)
			cancelled := make(chan string, 10)
			e := newEnv(t, envOpts{engine: engine, tscfg: func(i int, c *testserver.Config) {
				c.OnCancel = func(m string) { cancelled <- m }
			}})
			ctx := testkit.Context(t, 20*time.Second)
			cctx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(ctx, testserver.MetadataHang, "1"))
			st, err := e.client.FullDuplexCall(cctx)
			if err != nil {
				t.Fatal(err)
			}
			testkit.WaitFor(ctx, t, "the call to reach a backend", func() bool {
				var n int64
				for _, b := range e.backends {
					n += b.InFlight()
				}
				return n == 1
			})
			cancel()
			if _, err := st.Recv(); status.Code(err) != codes.Canceled {
				t.Errorf("client got %v, want Canceled", err)
			}
			select {
			case m := <-cancelled:
				if m != "/grpc.testing.TestService/FullDuplexCall" {
					t.Errorf("cancelled method %q", m)
				}
			case <-ctx.Done():
				t.Fatal("backend never saw its context cancelled")
			}
		})
	}
}

// TestSlowBackendReader is TestSlowConsumer the other way: a backend
// handler that does not read stalls only its own request stream, and once
// it reads, every byte arrives.
func TestSlowBackendReader(t *testing.T) {
	const msgs, size = 100, 64 << 10
	for _, engine := range engines {
		t.Run(engine, func(t *testing.T) {
			verifyNoLeaks(t)
			release := make(chan struct{})
			e := newEnv(t, envOpts{engine: engine, backends: 1, tscfg: func(_ int, c *testserver.Config) {
				c.StreamingInputCallF = func(st testgrpc.TestService_StreamingInputCallServer) error {
					<-release
					total := 0
					for {
						m, err := st.Recv()
						if err == io.EOF {
							return st.SendAndClose(&testgrpc.StreamingInputCallResponse{AggregatedPayloadSize: int32(total)})
						}
						if err != nil {
							return err
						}
						total += len(m.GetPayload().GetBody())
					}
				}
			}})
			ctx := testkit.Context(t, 60*time.Second)
			st, err := e.client.StreamingInputCall(ctx)
			if err != nil {
				t.Fatal(err)
			}
			sent := make(chan error, 1)
			go func() {
				for range msgs {
					if err := st.Send(&testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: make([]byte, size)}}); err != nil {
						sent <- err
						return
					}
				}
				sent <- st.CloseSend()
			}()
			// The stalled upload must not hold up other calls.
			for i := range 20 {
				if _, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: 100}); err != nil {
					t.Fatalf("call %d beside a stalled upload: %v", i, err)
				}
			}
			close(release)
			if err := <-sent; err != nil {
				t.Fatal(err)
			}
			resp, err := st.CloseAndRecv()
			if err != nil {
				t.Fatal(err)
			}
			if got := int(resp.GetAggregatedPayloadSize()); got != msgs*size {
				t.Errorf("backend received %d bytes, want %d", got, msgs*size)
			}
		})
	}
}
