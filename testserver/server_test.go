package testserver

import (
	"context"
	"errors"
	"github.com/streamlb/streamlb/internal/testkit"
	"io"
	"log/slog"
	"math"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// Full method names, shortened for tables.
const (
	mEmpty      = testgrpc.TestService_EmptyCall_FullMethodName
	mUnary      = testgrpc.TestService_UnaryCall_FullMethodName
	mOutput     = testgrpc.TestService_StreamingOutputCall_FullMethodName
	mInput      = testgrpc.TestService_StreamingInputCall_FullMethodName
	mFull       = testgrpc.TestService_FullDuplexCall_FullMethodName
	mHalf       = testgrpc.TestService_HalfDuplexCall_FullMethodName
	mUnimpl     = testgrpc.TestService_UnimplementedCall_FullMethodName
	testTimeout = 30 * time.Second
)

// startBackend builds and starts a backend named "b1" unless cfg says
// otherwise, stopping it at cleanup.
func startBackend(t *testing.T, cfg Config) *Server {
	t.Helper()
	if cfg.Name == "" {
		cfg.Name = "b1"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatalf("New() error = %v", err)
	}
	if err := s.Start("127.0.0.1:0"); err != nil {
		t.Fatalf("Start() error = %v", err)
	}
	t.Cleanup(s.Stop)
	return s
}

// dial returns a client connection to addr, closed at cleanup (before the
// backend stops, as cleanups run last-in first-out).
func dial(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient(addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(
			grpc.MaxCallRecvMsgSize(defaultMaxMsgSize),
			grpc.MaxCallSendMsgSize(defaultMaxMsgSize)),
	)
	if err != nil {
		t.Fatalf("grpc.NewClient(%q) error = %v", addr, err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// setup starts a backend with cfg and returns it with a TestService client.
func setup(t *testing.T, cfg Config) (*Server, testgrpc.TestServiceClient) {
	t.Helper()
	s := startBackend(t, cfg)
	return s, testgrpc.NewTestServiceClient(dial(t, s.Addr()))
}

func testContext(t *testing.T) context.Context { return testkit.Context(t, testTimeout) }

// receive waits for a value on ch or fails the test when ctx is done.
func receive[T any](ctx context.Context, t *testing.T, what string, ch <-chan T) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-ctx.Done():
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

func params(sizes ...int32) []*testgrpc.ResponseParameters {
	var ps []*testgrpc.ResponseParameters
	for _, n := range sizes {
		ps = append(ps, &testgrpc.ResponseParameters{Size: n})
	}
	return ps
}

func payload(n int) *testgrpc.Payload {
	return &testgrpc.Payload{Body: PayloadBody(n)}
}

// recvSizes reads responses until the stream ends and returns their
// payload sizes and the final error (nil on a clean io.EOF).
func recvSizes(t *testing.T, recv func() (*testgrpc.StreamingOutputCallResponse, error)) ([]int, error) {
	t.Helper()
	var sizes []int
	for {
		r, err := recv()
		if errors.Is(err, io.EOF) {
			return sizes, nil
		}
		if err != nil {
			return sizes, err
		}
		if err := CheckPayloadBody(r.GetPayload().GetBody()); err != nil {
			t.Errorf("response %d: %v", len(sizes), err)
		}
		sizes = append(sizes, len(r.GetPayload().GetBody()))
	}
}

// callResult is what every RPC kind reports back for common checks.
type callResult struct {
	header, trailer metadata.MD
	err             error
}

// rpcKind performs one call of a kind with the given request status
// (nil for none) and outgoing metadata already in ctx.
type rpcKind struct {
	name   string
	method string
	call   func(ctx context.Context, t *testing.T, c testgrpc.TestServiceClient, st *testgrpc.EchoStatus) callResult
}

// rpcKinds covers every TestService method. Each call checks its own
// response contents.
var rpcKinds = []rpcKind{
	{
		name:   "EmptyCall",
		method: mEmpty,
		call: func(ctx context.Context, t *testing.T, c testgrpc.TestServiceClient, _ *testgrpc.EchoStatus) callResult {
			var r callResult
			_, r.err = c.EmptyCall(ctx, &testgrpc.Empty{}, grpc.Header(&r.header), grpc.Trailer(&r.trailer))
			return r
		},
	},
	{
		name:   "UnaryCall",
		method: mUnary,
		call: func(ctx context.Context, t *testing.T, c testgrpc.TestServiceClient, st *testgrpc.EchoStatus) callResult {
			var r callResult
			resp, err := c.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: 1000, Payload: payload(500), ResponseStatus: st},
				grpc.Header(&r.header), grpc.Trailer(&r.trailer))
			r.err = err
			if err != nil {
				return r
			}
			if got := len(resp.GetPayload().GetBody()); got != 1000 {
				t.Errorf("UnaryCall payload size = %d, want 1000", got)
			}
			if err := CheckPayloadBody(resp.GetPayload().GetBody()); err != nil {
				t.Error(err)
			}
			if resp.GetHostname() != "b1" || resp.GetServerId() != "b1" {
				t.Errorf("UnaryCall Hostname, ServerId = %q, %q, want b1, b1", resp.GetHostname(), resp.GetServerId())
			}
			if got := r.trailer.Get(TrailerRequestPayloadSize); !cmp.Equal(got, []string{"500"}) {
				t.Errorf("trailer %s = %q, want [500]", TrailerRequestPayloadSize, got)
			}
			return r
		},
	},
	{
		name:   "StreamingOutputCall",
		method: mOutput,
		call: func(ctx context.Context, t *testing.T, c testgrpc.TestServiceClient, st *testgrpc.EchoStatus) callResult {
			stream, err := c.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{
				ResponseParameters: params(1, 10, 100_000),
				ResponseStatus:     st,
			})
			if err != nil {
				return callResult{err: err}
			}
			sizes, err := recvSizes(t, stream.Recv)
			if diff := cmp.Diff([]int{1, 10, 100_000}, sizes); (err == nil || st != nil) && diff != "" {
				t.Errorf("StreamingOutputCall sizes mismatch (-want +got):\n%s", diff)
			}
			r := callResult{trailer: stream.Trailer(), err: err}
			r.header, _ = stream.Header()
			return r
		},
	},
	{
		name:   "StreamingInputCall",
		method: mInput,
		call: func(ctx context.Context, t *testing.T, c testgrpc.TestServiceClient, _ *testgrpc.EchoStatus) callResult {
			stream, err := c.StreamingInputCall(ctx)
			if err != nil {
				return callResult{err: err}
			}
			for _, n := range []int{1, 20, 300, 40_000} {
				if err := stream.Send(&testgrpc.StreamingInputCallRequest{Payload: payload(n)}); err != nil {
					break // the real error comes from CloseAndRecv
				}
			}
			resp, err := stream.CloseAndRecv()
			if err == nil && resp.GetAggregatedPayloadSize() != 40_321 {
				t.Errorf("AggregatedPayloadSize = %d, want 40321", resp.GetAggregatedPayloadSize())
			}
			r := callResult{trailer: stream.Trailer(), err: err}
			r.header, _ = stream.Header()
			return r
		},
	},
	{
		name:   "FullDuplexCall",
		method: mFull,
		call: func(ctx context.Context, t *testing.T, c testgrpc.TestServiceClient, st *testgrpc.EchoStatus) callResult {
			stream, err := c.FullDuplexCall(ctx)
			if err != nil {
				return callResult{err: err}
			}
			result := func(err error) callResult {
				r := callResult{trailer: stream.Trailer(), err: err}
				r.header, _ = stream.Header()
				return r
			}
			// Each request is answered before the next is sent: full duplex.
			// Send errors surface as the status from Recv.
			for _, sizes := range [][]int32{{1, 2}, {3}} {
				_ = stream.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: params(sizes...)})
				for _, want := range sizes {
					resp, err := stream.Recv()
					if err != nil {
						return result(err)
					}
					if got := len(resp.GetPayload().GetBody()); got != int(want) {
						t.Errorf("response size = %d, want %d", got, want)
					}
				}
			}
			if st != nil {
				_ = stream.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: params(4), ResponseStatus: st})
			}
			if err := stream.CloseSend(); err != nil {
				t.Fatalf("CloseSend() error = %v", err)
			}
			sizes, err := recvSizes(t, stream.Recv)
			var want []int
			if st != nil {
				want = []int{4} // responses first, then the status
			}
			if diff := cmp.Diff(want, sizes); diff != "" {
				t.Errorf("FullDuplexCall trailing sizes mismatch (-want +got):\n%s", diff)
			}
			r := callResult{trailer: stream.Trailer(), err: err}
			r.header, _ = stream.Header()
			return r
		},
	},
	{
		name:   "HalfDuplexCall",
		method: mHalf,
		call: func(ctx context.Context, t *testing.T, c testgrpc.TestServiceClient, st *testgrpc.EchoStatus) callResult {
			stream, err := c.HalfDuplexCall(ctx)
			if err != nil {
				return callResult{err: err}
			}
			reqs := []*testgrpc.StreamingOutputCallRequest{
				{ResponseParameters: params(5, 6)},
				{ResponseParameters: params(7), ResponseStatus: st},
			}
			for _, req := range reqs {
				if err := stream.Send(req); err != nil {
					break // the real error comes from Recv
				}
			}
			if err := stream.CloseSend(); err != nil {
				t.Fatalf("CloseSend() error = %v", err)
			}
			sizes, err := recvSizes(t, stream.Recv)
			if diff := cmp.Diff([]int{5, 6, 7}, sizes); (err == nil || st != nil) && diff != "" {
				t.Errorf("HalfDuplexCall sizes mismatch (-want +got):\n%s", diff)
			}
			r := callResult{trailer: stream.Trailer(), err: err}
			r.header, _ = stream.Header()
			return r
		},
	},
}

func TestRPCKinds(t *testing.T) {
	t.Parallel()
	for _, k := range rpcKinds {
		t.Run(k.name, func(t *testing.T) {
			t.Parallel()
			s, c := setup(t, Config{})
			r := k.call(testContext(t), t, c, nil)
			if r.err != nil {
				t.Fatalf("%s error = %v", k.name, r.err)
			}
			if got := BackendFromHeader(r.header); got != "b1" {
				t.Errorf("BackendFromHeader(header) = %q, want b1 (header %v)", got, r.header)
			}
			if got := r.trailer.Get(TrailerBackend); !cmp.Equal(got, []string{"b1"}) {
				t.Errorf("trailer %s = %q, want [b1]", TrailerBackend, got)
			}
			if got := s.MethodCalls(k.method); got != 1 {
				t.Errorf("MethodCalls(%s) = %d, want 1", k.method, got)
			}
			if got := s.Calls(); got != 1 {
				t.Errorf("Calls() = %d, want 1", got)
			}
		})
	}
}

func TestUnimplementedCall(t *testing.T) {
	t.Parallel()
	s, c := setup(t, Config{})
	var header metadata.MD
	_, err := c.UnimplementedCall(testContext(t), &testgrpc.Empty{}, grpc.Header(&header))
	if got := status.Code(err); got != codes.Unimplemented {
		t.Errorf("UnimplementedCall code = %v, want Unimplemented (err %v)", got, err)
	}
	if got := BackendFromHeader(header); got != "b1" {
		t.Errorf("BackendFromHeader = %q, want b1", got)
	}
	if got := s.MethodCalls(mUnimpl); got != 1 {
		t.Errorf("MethodCalls(UnimplementedCall) = %d, want 1", got)
	}
}

func TestEchoMetadata(t *testing.T) {
	t.Parallel()
	binary := string([]byte{0, 1, 0xfe, 0xff, '\n'})
	out := metadata.Pairs(
		"x-echo-foo", "bar",
		"x-echo-foo", "baz",
		"x-echo-data-bin", binary,
		"x-echo-trailer-t", "tv",
		"x-echo-trailer-t-bin", binary,
		"x-not-echoed", "nope",
	)
	wantHeader := map[string][]string{
		HeaderBackend:     {"b1"},
		"x-echo-foo":      {"bar", "baz"},
		"x-echo-data-bin": {binary},
	}
	wantTrailer := map[string][]string{
		TrailerBackend:         {"b1"},
		"x-echo-trailer-t":     {"tv"},
		"x-echo-trailer-t-bin": {binary},
	}
	for _, k := range rpcKinds {
		t.Run(k.name, func(t *testing.T) {
			t.Parallel()
			_, c := setup(t, Config{})
			ctx := metadata.NewOutgoingContext(testContext(t), out)
			r := k.call(ctx, t, c, nil)
			if r.err != nil {
				t.Fatalf("%s error = %v", k.name, r.err)
			}
			if diff := cmp.Diff(wantHeader, pick(r.header, wantHeader, "x-not-echoed")); diff != "" {
				t.Errorf("header mismatch (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(wantTrailer, pick(r.trailer, wantTrailer, "x-not-echoed")); diff != "" {
				t.Errorf("trailer mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

// pick returns the entries of md whose keys are in want or extra, ignoring
// the transport's own keys such as content-type.
func pick(md metadata.MD, want map[string][]string, extra ...string) map[string][]string {
	got := map[string][]string{}
	for k, v := range md {
		_, ok := want[k]
		for _, e := range extra {
			ok = ok || k == e
		}
		if ok {
			got[k] = v
		}
	}
	return got
}

func TestStatus(t *testing.T) {
	t.Parallel()
	const nonASCII = "héllo wörld ✓"
	tests := []struct {
		name     string
		md       metadata.MD
		st       *testgrpc.EchoStatus
		kinds    []string // rpcKinds to run; nil means all
		wantCode codes.Code
		wantMsg  string
	}{
		{
			name:     "fail code with message",
			md:       metadata.Pairs(MetadataFailCode, "5", MetadataFailMessage, "no such thing"),
			wantCode: codes.NotFound,
			wantMsg:  "no such thing",
		},
		{
			name:     "fail code without message",
			md:       metadata.Pairs(MetadataFailCode, "14"),
			wantCode: codes.Unavailable,
		},
		{
			name:     "fail code with binary non-ASCII message",
			md:       metadata.Pairs(MetadataFailCode, "9", MetadataFailMessageBin, nonASCII),
			wantCode: codes.FailedPrecondition,
			wantMsg:  nonASCII,
		},
		{
			name:     "fail code zero succeeds",
			md:       metadata.Pairs(MetadataFailCode, "0"),
			wantCode: codes.OK,
		},
		{
			name:     "bad fail code",
			md:       metadata.Pairs(MetadataFailCode, "nine"),
			wantCode: codes.InvalidArgument,
			wantMsg:  `testserver: bad x-fail-code "nine": want a status code`,
		},
		{
			name:     "bad delay",
			md:       metadata.Pairs(MetadataDelay, "soon"),
			wantCode: codes.InvalidArgument,
			wantMsg:  `testserver: bad x-delay "soon": want a non-negative Go duration`,
		},
		{
			name:     "bad hang",
			md:       metadata.Pairs(MetadataHang, "maybe"),
			wantCode: codes.InvalidArgument,
			wantMsg:  `testserver: bad x-hang "maybe": want a boolean`,
		},
		{
			name:     "hang false succeeds",
			md:       metadata.Pairs(MetadataHang, "0"),
			wantCode: codes.OK,
		},
		{
			name:     "response status non-ASCII",
			st:       &testgrpc.EchoStatus{Code: int32(codes.InvalidArgument), Message: nonASCII},
			kinds:    []string{"UnaryCall", "StreamingOutputCall", "FullDuplexCall", "HalfDuplexCall"},
			wantCode: codes.InvalidArgument,
			wantMsg:  nonASCII,
		},
		{
			name:     "response status OK",
			st:       &testgrpc.EchoStatus{Code: 0, Message: "ignored"},
			kinds:    []string{"UnaryCall", "StreamingOutputCall", "HalfDuplexCall"},
			wantCode: codes.OK,
		},
	}
	for _, tc := range tests {
		for _, k := range rpcKinds {
			if tc.kinds != nil && !contains(tc.kinds, k.name) {
				continue
			}
			t.Run(tc.name+"/"+k.name, func(t *testing.T) {
				t.Parallel()
				_, c := setup(t, Config{})
				ctx := metadata.NewOutgoingContext(testContext(t), tc.md)
				r := k.call(ctx, t, c, tc.st)
				st := status.Convert(r.err)
				if st.Code() != tc.wantCode || st.Message() != tc.wantMsg {
					t.Errorf("status = %v %q, want %v %q", st.Code(), st.Message(), tc.wantCode, tc.wantMsg)
				}
				// Failed calls still identify the backend.
				if got := BackendFromHeader(r.header); got != "b1" {
					t.Errorf("BackendFromHeader = %q, want b1", got)
				}
			})
		}
	}
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// cancelRecorder returns an OnCancel hook and the channel it reports on.
func cancelRecorder() (func(string), <-chan string) {
	ch := make(chan string, 16)
	return func(m string) { ch <- m }, ch
}

func TestDelayDeadline(t *testing.T) {
	t.Parallel()
	onCancel, cancels := cancelRecorder()
	s, c := setup(t, Config{OnCancel: onCancel})
	ctx := testContext(t)
	// Long enough for the call to reach the handler even on a loaded
	// machine: a deadline that passes first would leave OnCancel unfired.
	callCtx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(ctx, MetadataDelay, "1h"), time.Second)
	defer cancel()
	_, err := c.UnaryCall(callCtx, &testgrpc.SimpleRequest{})
	if got := status.Code(err); got != codes.DeadlineExceeded {
		t.Errorf("UnaryCall with x-delay past deadline: code = %v, want DeadlineExceeded (err %v)", got, err)
	}
	if got := receive(ctx, t, "OnCancel", cancels); got != mUnary {
		t.Errorf("OnCancel method = %q, want %q", got, mUnary)
	}
	if got := s.Canceled(); got != 1 {
		t.Errorf("Canceled() = %d, want 1", got)
	}
}

// fakeClock is an injected After: it reports each requested duration and
// fires only when the test sends on fire.
type fakeClock struct {
	requests chan time.Duration
	fire     chan time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{requests: make(chan time.Duration, 16), fire: make(chan time.Time)}
}

func (c *fakeClock) After(d time.Duration) <-chan time.Time {
	c.requests <- d
	return c.fire
}

func TestLatencyAndDelayUseClock(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		latency time.Duration
		delay   string
		want    time.Duration
	}{
		{name: "latency only", latency: 3 * time.Second, want: 3 * time.Second},
		{name: "delay only", delay: "250ms", want: 250 * time.Millisecond},
		{name: "latency plus delay", latency: time.Second, delay: "2h", want: 2*time.Hour + time.Second},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			clock := newFakeClock()
			_, c := setup(t, Config{Latency: tc.latency, After: clock.After})
			ctx := testContext(t)
			callCtx := ctx
			if tc.delay != "" {
				callCtx = metadata.AppendToOutgoingContext(ctx, MetadataDelay, tc.delay)
			}
			done := make(chan error, 1)
			go func() {
				_, err := c.EmptyCall(callCtx, &testgrpc.Empty{})
				done <- err
			}()
			if got := receive(ctx, t, "clock request", clock.requests); got != tc.want {
				t.Errorf("waited for %v, want %v", got, tc.want)
			}
			select {
			case err := <-done:
				t.Fatalf("call finished before the clock fired: %v", err)
			case clock.fire <- time.Now():
			}
			if err := receive(ctx, t, "call", done); err != nil {
				t.Errorf("EmptyCall error = %v", err)
			}
		})
	}
}

func TestStreamIntervalsUseClock(t *testing.T) {
	t.Parallel()
	clock := newFakeClock()
	_, c := setup(t, Config{After: clock.After})
	ctx := testContext(t)
	stream, err := c.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{
		ResponseParameters: []*testgrpc.ResponseParameters{
			{Size: 1},
			{Size: 2, IntervalUs: 500},
			{Size: 3, IntervalUs: 1000},
		},
	})
	if err != nil {
		t.Fatalf("StreamingOutputCall error = %v", err)
	}
	for i, want := range []time.Duration{0, 500 * time.Microsecond, time.Millisecond} {
		if want > 0 {
			if got := receive(ctx, t, "clock request", clock.requests); got != want {
				t.Errorf("interval %d = %v, want %v", i, got, want)
			}
			clock.fire <- time.Now()
		}
		resp, err := stream.Recv()
		if err != nil {
			t.Fatalf("Recv(%d) error = %v", i, err)
		}
		if got := len(resp.GetPayload().GetBody()); got != i+1 {
			t.Errorf("response %d size = %d, want %d", i, got, i+1)
		}
	}
	if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
		t.Errorf("final Recv() error = %v, want io.EOF", err)
	}
}

func TestCancelObserved(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		method string
		// start opens the call and returns once the backend is handling it,
		// then wait returns the call's final error.
		start func(ctx context.Context, t *testing.T, s *Server, c testgrpc.TestServiceClient) (wait func() error)
	}{
		{
			name:   "unary hang",
			method: mUnary,
			start: func(ctx context.Context, t *testing.T, s *Server, c testgrpc.TestServiceClient) func() error {
				done := make(chan error, 1)
				go func() {
					_, err := c.UnaryCall(metadata.AppendToOutgoingContext(ctx, MetadataHang, "1"), &testgrpc.SimpleRequest{})
					done <- err
				}()
				testkit.WaitFor(testContext(t), t, "call in flight", func() bool { return s.InFlight() == 1 })
				return func() error { return receive(testContext(t), t, "call", done) }
			},
		},
		{
			name:   "bidi hang",
			method: mFull,
			start: func(ctx context.Context, t *testing.T, s *Server, c testgrpc.TestServiceClient) func() error {
				stream, err := c.FullDuplexCall(metadata.AppendToOutgoingContext(ctx, MetadataHang, "true"))
				if err != nil {
					t.Fatalf("FullDuplexCall error = %v", err)
				}
				// Headers are sent before the knobs run, so once they
				// arrive the backend is handling the call.
				if _, err := stream.Header(); err != nil {
					t.Fatalf("Header() error = %v", err)
				}
				return func() error {
					_, err := stream.Recv()
					return err
				}
			},
		},
		{
			name:   "server stream waiting for interval",
			method: mOutput,
			start: func(ctx context.Context, t *testing.T, s *Server, c testgrpc.TestServiceClient) func() error {
				stream, err := c.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{
					ResponseParameters: []*testgrpc.ResponseParameters{
						{Size: 1},
						{Size: 1, IntervalUs: math.MaxInt32},
					},
				})
				if err != nil {
					t.Fatalf("StreamingOutputCall error = %v", err)
				}
				if _, err := stream.Recv(); err != nil {
					t.Fatalf("first Recv() error = %v", err)
				}
				return func() error {
					_, err := stream.Recv()
					return err
				}
			},
		},
		{
			name:   "client stream waiting for requests",
			method: mInput,
			start: func(ctx context.Context, t *testing.T, s *Server, c testgrpc.TestServiceClient) func() error {
				stream, err := c.StreamingInputCall(ctx)
				if err != nil {
					t.Fatalf("StreamingInputCall error = %v", err)
				}
				if _, err := stream.Header(); err != nil {
					t.Fatalf("Header() error = %v", err)
				}
				// Wait for the end without half-closing: CloseAndRecv
				// could send END_STREAM before the client's cancel is
				// acted on, and the backend would then finish the call
				// normally (no cancel to observe).
				return func() error {
					return stream.RecvMsg(new(testgrpc.StreamingInputCallResponse))
				}
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			onCancel, cancels := cancelRecorder()
			s, c := setup(t, Config{OnCancel: onCancel})
			ctx, cancel := context.WithCancel(testContext(t))
			defer cancel()
			wait := tc.start(ctx, t, s, c)
			cancel()
			if got := status.Code(wait()); got != codes.Canceled {
				t.Errorf("client code = %v, want Canceled", got)
			}
			if got := receive(testContext(t), t, "OnCancel", cancels); got != tc.method {
				t.Errorf("OnCancel method = %q, want %q", got, tc.method)
			}
			if got := s.Canceled(); got != 1 {
				t.Errorf("Canceled() = %d, want 1", got)
			}
			if got := s.InFlight(); got != 0 {
				t.Errorf("InFlight() = %d, want 0", got)
			}
		})
	}
}

// fakeRand returns values in turn, cycling, and counts calls.
type fakeRand struct {
	mu     sync.Mutex
	values []float64
	calls  int
}

func (r *fakeRand) Float64() float64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	v := r.values[r.calls%len(r.values)]
	r.calls++
	return v
}

func TestErrorRate(t *testing.T) {
	t.Parallel()
	const n = 10
	tests := []struct {
		name      string
		rate      float64
		code      codes.Code
		values    []float64
		wantFails int
		wantCode  codes.Code
		wantRand  int
	}{
		{name: "rate 1 fails all", rate: 1, values: []float64{0.999999}, wantFails: n, wantCode: codes.Unavailable, wantRand: n},
		{name: "rate 0 fails none", rate: 0, values: []float64{0}, wantFails: 0, wantRand: 0},
		{name: "rate half", rate: 0.5, values: []float64{0.1, 0.9}, wantFails: n / 2, wantCode: codes.Unavailable, wantRand: n},
		{name: "custom code", rate: 0.3, code: codes.ResourceExhausted, values: []float64{0.29, 0.3}, wantFails: n / 2, wantCode: codes.ResourceExhausted, wantRand: n},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			rnd := &fakeRand{values: tc.values}
			s, c := setup(t, Config{ErrorRate: tc.rate, ErrorCode: tc.code, Rand: rnd})
			ctx := testContext(t)
			fails := 0
			for range n {
				var header metadata.MD
				_, err := c.UnaryCall(ctx, &testgrpc.SimpleRequest{}, grpc.Header(&header))
				if err != nil {
					fails++
					if got := status.Code(err); got != tc.wantCode {
						t.Errorf("code = %v, want %v", got, tc.wantCode)
					}
				}
				if got := BackendFromHeader(header); got != "b1" {
					t.Errorf("BackendFromHeader = %q, want b1", got)
				}
			}
			if fails != tc.wantFails {
				t.Errorf("failed %d of %d calls, want %d", fails, n, tc.wantFails)
			}
			if rnd.calls != tc.wantRand {
				t.Errorf("Rand called %d times, want %d", rnd.calls, tc.wantRand)
			}
			if got := s.Calls(); got != n {
				t.Errorf("Calls() = %d, want %d", got, n)
			}
		})
	}
}

func TestHealth(t *testing.T) {
	t.Parallel()
	s := startBackend(t, Config{})
	h := healthpb.NewHealthClient(dial(t, s.Addr()))
	ctx := testContext(t)
	check := func(want healthpb.HealthCheckResponse_ServingStatus) {
		t.Helper()
		for _, svc := range []string{"", ServiceName} {
			resp, err := h.Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
			if err != nil {
				t.Fatalf("Check(%q) error = %v", svc, err)
			}
			if got := resp.GetStatus(); got != want {
				t.Errorf("Check(%q) = %v, want %v", svc, got, want)
			}
		}
	}
	check(healthpb.HealthCheckResponse_SERVING)
	s.SetServing(false)
	check(healthpb.HealthCheckResponse_NOT_SERVING)
	s.SetServing(true)
	check(healthpb.HealthCheckResponse_SERVING)
	if got := s.Calls(); got != 0 {
		t.Errorf("Calls() after health checks = %d, want 0 (health is not counted)", got)
	}
}

func TestReflection(t *testing.T) {
	t.Parallel()
	s := startBackend(t, Config{})
	rc := reflectionpb.NewServerReflectionClient(dial(t, s.Addr()))
	stream, err := rc.ServerReflectionInfo(testContext(t))
	if err != nil {
		t.Fatalf("ServerReflectionInfo error = %v", err)
	}
	req := &reflectionpb.ServerReflectionRequest{
		MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{},
	}
	if err := stream.Send(req); err != nil {
		t.Fatalf("Send error = %v", err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatalf("Recv error = %v", err)
	}
	got := map[string]bool{}
	for _, svc := range resp.GetListServicesResponse().GetService() {
		got[svc.GetName()] = true
	}
	for _, want := range []string{ServiceName, "grpc.health.v1.Health"} {
		if !got[want] {
			t.Errorf("reflection services %v lack %q", got, want)
		}
	}
	if err := stream.CloseSend(); err != nil {
		t.Errorf("CloseSend error = %v", err)
	}
}

func TestLargeMessages(t *testing.T) {
	t.Parallel()
	const size = 64 << 20
	_, c := setup(t, Config{})
	ctx := testContext(t)

	t.Run("response", func(t *testing.T) {
		resp, err := c.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: size})
		if err != nil {
			t.Fatalf("UnaryCall(ResponseSize=64MiB) error = %v", err)
		}
		if got := len(resp.GetPayload().GetBody()); got != size {
			t.Fatalf("payload size = %d, want %d", got, size)
		}
		if err := CheckPayloadBody(resp.GetPayload().GetBody()); err != nil {
			t.Error(err)
		}
	})
	t.Run("request", func(t *testing.T) {
		var trailer metadata.MD
		_, err := c.UnaryCall(ctx, &testgrpc.SimpleRequest{Payload: payload(size)}, grpc.Trailer(&trailer))
		if err != nil {
			t.Fatalf("UnaryCall(64MiB payload) error = %v", err)
		}
		if got := trailer.Get(TrailerRequestPayloadSize); !cmp.Equal(got, []string{"67108864"}) {
			t.Errorf("trailer %s = %q, want [67108864]", TrailerRequestPayloadSize, got)
		}
	})
}

func TestCounters(t *testing.T) {
	t.Parallel()
	s, c := setup(t, Config{})
	ctx := testContext(t)
	want := map[string]int64{mEmpty: 3, mUnary: 2, mFull: 4}
	for range want[mEmpty] {
		if _, err := c.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
			t.Fatalf("EmptyCall error = %v", err)
		}
	}
	for range want[mUnary] {
		// Failed calls count too.
		failCtx := metadata.AppendToOutgoingContext(ctx, MetadataFailCode, "13")
		if _, err := c.UnaryCall(failCtx, &testgrpc.SimpleRequest{}); status.Code(err) != codes.Internal {
			t.Fatalf("UnaryCall error = %v, want Internal", err)
		}
	}
	for range want[mFull] {
		stream, err := c.FullDuplexCall(ctx)
		if err != nil {
			t.Fatalf("FullDuplexCall error = %v", err)
		}
		if err := stream.CloseSend(); err != nil {
			t.Fatalf("CloseSend error = %v", err)
		}
		if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
			t.Fatalf("Recv error = %v, want io.EOF", err)
		}
	}
	got := map[string]int64{}
	for _, m := range []string{mEmpty, mUnary, mOutput, mInput, mFull, mHalf, mUnimpl} {
		if n := s.MethodCalls(m); n != 0 {
			got[m] = n
		}
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("MethodCalls mismatch (-want +got):\n%s", diff)
	}
	if got := s.Calls(); got != 9 {
		t.Errorf("Calls() = %d, want 9", got)
	}
	// The server may still be finishing the last stream after the client
	// saw its end.
	testkit.WaitFor(ctx, t, "no calls in flight", func() bool { return s.InFlight() == 0 })
	if got := s.Canceled(); got != 0 {
		t.Errorf("Canceled() = %d, want 0", got)
	}
}

func TestHandlerOverride(t *testing.T) {
	t.Parallel()
	s, c := setup(t, Config{
		UnaryCallF: func(ctx context.Context, in *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
			return &testgrpc.SimpleResponse{Username: "override"}, nil
		},
	})
	var header metadata.MD
	resp, err := c.UnaryCall(testContext(t), &testgrpc.SimpleRequest{}, grpc.Header(&header))
	if err != nil {
		t.Fatalf("UnaryCall error = %v", err)
	}
	if got := resp.GetUsername(); got != "override" {
		t.Errorf("Username = %q, want override", got)
	}
	if got := BackendFromHeader(header); got != "b1" {
		t.Errorf("BackendFromHeader = %q, want b1", got)
	}
	if got := s.MethodCalls(mUnary); got != 1 {
		t.Errorf("MethodCalls(UnaryCall) = %d, want 1", got)
	}
}

func TestNewValidation(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		cfg     Config
		wantErr bool
	}{
		{name: "valid", cfg: Config{Name: "b"}},
		{name: "valid full", cfg: Config{Name: "b", ErrorRate: 1, Latency: time.Second, ErrorCode: codes.Aborted}},
		{name: "missing name", cfg: Config{}, wantErr: true},
		{name: "negative error rate", cfg: Config{Name: "b", ErrorRate: -0.1}, wantErr: true},
		{name: "error rate above 1", cfg: Config{Name: "b", ErrorRate: 1.1}, wantErr: true},
		{name: "NaN error rate", cfg: Config{Name: "b", ErrorRate: math.NaN()}, wantErr: true},
		{name: "negative latency", cfg: Config{Name: "b", Latency: -time.Second}, wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.cfg.Logger = slog.New(slog.DiscardHandler)
			s, err := New(tc.cfg)
			if gotErr := err != nil; gotErr != tc.wantErr {
				t.Fatalf("New() error = %v, want error %v", err, tc.wantErr)
			}
			if err != nil {
				return
			}
			if got := s.Addr(); got != "" {
				t.Errorf("Addr() before Start = %q, want empty", got)
			}
			s.Stop() // stopping a never-started server is fine
		})
	}
}

func TestLifecycle(t *testing.T) {
	t.Parallel()

	t.Run("start stop twice", func(t *testing.T) {
		t.Parallel()
		s := startBackend(t, Config{})
		if s.Addr() == "" {
			t.Fatal("Addr() empty after Start")
		}
		if err := s.Start("127.0.0.1:0"); err == nil {
			t.Error("second Start() error = nil, want error")
		}
		s.Stop()
		s.Stop()
		s.GracefulStop()
		if err := s.Shutdown(t.Context()); err != nil {
			t.Errorf("Shutdown after Stop error = %v", err)
		}
	})

	t.Run("start bad address", func(t *testing.T) {
		t.Parallel()
		s, err := New(Config{Name: "b", Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Start("256.0.0.1:bad"); err == nil {
			t.Error("Start(bad address) error = nil, want error")
		}
		s.Stop()
	})

	t.Run("serve returns nil after stop", func(t *testing.T) {
		t.Parallel()
		s, err := New(Config{Name: "b", Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		served := make(chan error, 1)
		go func() { served <- s.Serve(ln) }()
		c := testgrpc.NewTestServiceClient(dial(t, ln.Addr().String()))
		ctx := testContext(t)
		if _, err := c.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
			t.Fatalf("EmptyCall error = %v", err)
		}
		if got, want := s.Addr(), ln.Addr().String(); got != want {
			t.Errorf("Addr() = %q, want %q", got, want)
		}
		s.GracefulStop()
		if err := receive(ctx, t, "Serve", served); err != nil {
			t.Errorf("Serve() after GracefulStop = %v, want nil", err)
		}
	})

	t.Run("shutdown falls back to stop", func(t *testing.T) {
		t.Parallel()
		onCancel, cancels := cancelRecorder()
		s, c := setup(t, Config{OnCancel: onCancel})
		ctx := testContext(t)
		done := make(chan error, 1)
		go func() {
			_, err := c.EmptyCall(metadata.AppendToOutgoingContext(ctx, MetadataHang, "1"), &testgrpc.Empty{})
			done <- err
		}()
		testkit.WaitFor(ctx, t, "call in flight", func() bool { return s.InFlight() == 1 })
		shutdownCtx, cancel := context.WithCancel(ctx)
		cancel() // already expired: GracefulStop cannot finish the hung call
		if err := s.Shutdown(shutdownCtx); !errors.Is(err, context.Canceled) {
			t.Errorf("Shutdown() error = %v, want context.Canceled", err)
		}
		if err := receive(ctx, t, "call", done); status.Code(err) != codes.Unavailable {
			t.Errorf("hung call error = %v, want Unavailable", err)
		}
		if got := receive(ctx, t, "OnCancel", cancels); got != mEmpty {
			t.Errorf("OnCancel method = %q, want %q", got, mEmpty)
		}
	})

	t.Run("shutdown drains", func(t *testing.T) {
		t.Parallel()
		s, c := setup(t, Config{})
		ctx := testContext(t)
		if _, err := c.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
			t.Fatalf("EmptyCall error = %v", err)
		}
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown() error = %v", err)
		}
	})
}

func TestPayloadBody(t *testing.T) {
	t.Parallel()
	for _, n := range []int{0, 1, 250, 251, 252, 502, 1000, 1 << 16, 1<<20 + 3} {
		b := PayloadBody(n)
		if len(b) != n {
			t.Fatalf("len(PayloadBody(%d)) = %d", n, len(b))
		}
		for i, c := range b {
			if c != byte(i%251) {
				t.Fatalf("PayloadBody(%d)[%d] = %d, want %d", n, i, c, i%251)
			}
		}
		if err := CheckPayloadBody(b); err != nil {
			t.Errorf("CheckPayloadBody(PayloadBody(%d)) = %v", n, err)
		}
	}
	tests := []struct {
		name string
		b    []byte
	}{
		{name: "flipped byte", b: func() []byte { b := PayloadBody(1000); b[600] ^= 1; return b }()},
		{name: "shifted", b: PayloadBody(1000)[1:]},
		{name: "zeros", b: make([]byte, 10)},
	}
	for _, tc := range tests {
		if err := CheckPayloadBody(tc.b); err == nil {
			t.Errorf("CheckPayloadBody(%s) = nil, want error", tc.name)
		}
	}
}

func TestBackendFromHeader(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		md   metadata.MD
		want string
	}{
		{name: "nil", md: nil, want: ""},
		{name: "absent", md: metadata.Pairs("other", "x"), want: ""},
		{name: "present", md: metadata.Pairs(HeaderBackend, "b7"), want: "b7"},
		{name: "first of many", md: metadata.Pairs(HeaderBackend, "b7", HeaderBackend, "b8"), want: "b7"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := BackendFromHeader(tc.md); got != tc.want {
				t.Errorf("BackendFromHeader(%v) = %q, want %q", tc.md, got, tc.want)
			}
		})
	}
}
