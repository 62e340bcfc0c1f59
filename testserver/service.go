package testserver

import (
	"context"
	"errors"
	"io"
	"strconv"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// service implements TestService for a Server. Its behaviour follows
// grpc-go's interop test server (interop/test_utils.go), with waits that
// honour cancellation and the backend name in responses.
// UnimplementedCall is left to the embedded type and returns Unimplemented.
type service struct {
	testgrpc.UnimplementedTestServiceServer
	s *Server
}

// EmptyCall returns an empty response.
func (sv *service) EmptyCall(ctx context.Context, in *testgrpc.Empty) (*testgrpc.Empty, error) {
	if f := sv.s.cfg.EmptyCallF; f != nil {
		return f(ctx, in)
	}
	return &testgrpc.Empty{}, nil
}

// UnaryCall returns a ResponseSize payload and the backend name, reports
// the request payload length in a trailer, and ends with ResponseStatus if
// its code is not OK.
func (sv *service) UnaryCall(ctx context.Context, in *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	if f := sv.s.cfg.UnaryCallF; f != nil {
		return f(ctx, in)
	}
	size := strconv.Itoa(len(in.GetPayload().GetBody()))
	if err := grpc.SetTrailer(ctx, metadata.Pairs(TrailerRequestPayloadSize, size)); err != nil {
		return nil, status.Errorf(codes.Internal, "testserver: set trailer: %v", err)
	}
	if err := echoStatus(in.GetResponseStatus()); err != nil {
		return nil, err
	}
	pl, err := newPayload(in.GetResponseSize())
	if err != nil {
		return nil, err
	}
	return &testgrpc.SimpleResponse{
		Payload:  pl,
		Hostname: sv.s.cfg.Name,
		ServerId: sv.s.cfg.Name,
	}, nil
}

// CacheableUnaryCall behaves like UnaryCall; caching is a proxy concern.
func (sv *service) CacheableUnaryCall(ctx context.Context, in *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	return sv.UnaryCall(ctx, in)
}

// StreamingOutputCall sends one response per ResponseParameters entry,
// waiting IntervalUs before each, then ends with ResponseStatus.
func (sv *service) StreamingOutputCall(in *testgrpc.StreamingOutputCallRequest, stream testgrpc.TestService_StreamingOutputCallServer) error {
	if f := sv.s.cfg.StreamingOutputCallF; f != nil {
		return f(in, stream)
	}
	if err := sv.respond(stream, in); err != nil {
		return err
	}
	return echoStatus(in.GetResponseStatus())
}

// StreamingInputCall receives until the client half-closes and returns the
// total payload size received, saturated at math.MaxInt32.
func (sv *service) StreamingInputCall(stream testgrpc.TestService_StreamingInputCallServer) error {
	if f := sv.s.cfg.StreamingInputCallF; f != nil {
		return f(stream)
	}
	var sum int64
	for {
		in, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return stream.SendAndClose(&testgrpc.StreamingInputCallResponse{
				AggregatedPayloadSize: clampInt32(sum),
			})
		}
		if err != nil {
			return err
		}
		sum += int64(len(in.GetPayload().GetBody()))
	}
}

// FullDuplexCall answers each request as it arrives with its
// ResponseParameters, and ends with a request's ResponseStatus as soon as
// one has a code other than OK. It returns OK when the client half-closes.
func (sv *service) FullDuplexCall(stream testgrpc.TestService_FullDuplexCallServer) error {
	if f := sv.s.cfg.FullDuplexCallF; f != nil {
		return f(stream)
	}
	for {
		in, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := sv.respond(stream, in); err != nil {
			return err
		}
		if err := echoStatus(in.GetResponseStatus()); err != nil {
			return err
		}
	}
}

// HalfDuplexCall buffers requests until the client half-closes, then
// answers them in order like FullDuplexCall.
func (sv *service) HalfDuplexCall(stream testgrpc.TestService_HalfDuplexCallServer) error {
	if f := sv.s.cfg.HalfDuplexCallF; f != nil {
		return f(stream)
	}
	var reqs []*testgrpc.StreamingOutputCallRequest
	for {
		in, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		reqs = append(reqs, in)
	}
	for _, in := range reqs {
		if err := sv.respond(stream, in); err != nil {
			return err
		}
		if err := echoStatus(in.GetResponseStatus()); err != nil {
			return err
		}
	}
	return nil
}

// respond sends the responses in's ResponseParameters ask for, waiting
// IntervalUs before each one on the injected clock.
func (sv *service) respond(stream grpc.ServerStreamingServer[testgrpc.StreamingOutputCallResponse], in *testgrpc.StreamingOutputCallRequest) error {
	ctx := stream.Context()
	for _, p := range in.GetResponseParameters() {
		if err := sv.s.wait(ctx, time.Duration(p.GetIntervalUs())*time.Microsecond); err != nil {
			return err
		}
		pl, err := newPayload(p.GetSize())
		if err != nil {
			return err
		}
		if err := stream.Send(&testgrpc.StreamingOutputCallResponse{Payload: pl}); err != nil {
			return err
		}
	}
	return nil
}

// newPayload returns a payload of size bytes following the PayloadBody
// pattern.
func newPayload(size int32) (*testgrpc.Payload, error) {
	if size < 0 {
		return nil, status.Errorf(codes.InvalidArgument, "testserver: negative response size %d", size)
	}
	return &testgrpc.Payload{
		Type: testgrpc.PayloadType_COMPRESSABLE,
		Body: PayloadBody(int(size)),
	}, nil
}

// echoStatus returns the status st asks for, or nil if st is unset or OK.
// The message is passed through as is; gRPC percent-encodes it on the wire
// (gRPC over HTTP/2 spec, "Status-Message").
func echoStatus(st *testgrpc.EchoStatus) error {
	if st.GetCode() == 0 {
		return nil
	}
	return status.Error(codes.Code(st.GetCode()), st.GetMessage())
}
