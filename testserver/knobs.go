package testserver

import (
	"context"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// The knobs, counters and backend metadata are implemented as interceptors
// rather than in the handlers, so they apply equally to the built-in
// handlers and to the Config.*F overrides. They only apply to TestService
// calls: health checks and reflection pass through untouched and uncounted.

// serviceMethodPrefix prefixes the full method names of TestService.
const serviceMethodPrefix = "/" + ServiceName + "/"

// unaryInterceptor wraps unary TestService calls with counters, backend
// metadata and knobs.
func (s *Server) unaryInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if !strings.HasPrefix(info.FullMethod, serviceMethodPrefix) {
		return handler(ctx, req)
	}
	start := s.begin(info.FullMethod)
	header, trailer := s.responseMetadata(ctx)
	// For unary calls headers go out with the response, or are merged into
	// a trailers-only response when the call fails without one.
	err := grpc.SetHeader(ctx, header)
	if err == nil {
		err = grpc.SetTrailer(ctx, trailer)
	}
	if err != nil {
		err = status.Errorf(codes.Internal, "testserver: set metadata: %v", err)
	}
	var resp any
	if err == nil {
		err = s.applyKnobs(ctx)
	}
	if err == nil {
		resp, err = handler(ctx, req)
	}
	s.end(ctx, info.FullMethod, start, err)
	return resp, err
}

// streamInterceptor wraps streaming TestService calls with counters,
// backend metadata and knobs. Headers are sent before anything else, so
// clients see the backend name even before the first message.
func (s *Server) streamInterceptor(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if !strings.HasPrefix(info.FullMethod, serviceMethodPrefix) {
		return handler(srv, ss)
	}
	ctx := ss.Context()
	start := s.begin(info.FullMethod)
	header, trailer := s.responseMetadata(ctx)
	ss.SetTrailer(trailer)
	// SendHeader fails only when the stream is already broken; its error is
	// then the stream's status.
	err := ss.SendHeader(header)
	if err == nil {
		err = s.applyKnobs(ctx)
	}
	if err == nil {
		err = handler(srv, ss)
	}
	s.end(ctx, info.FullMethod, start, err)
	return err
}

// begin counts a call as started and in flight.
func (s *Server) begin(fullMethod string) time.Time {
	s.calls.Add(1)
	s.inFlight.Add(1)
	s.methodCounter(fullMethod).Add(1)
	return time.Now()
}

// end counts a call as finished, and as cancelled if its context is done,
// then runs OnCancel. Counters are updated first so OnCancel observers see
// them.
func (s *Server) end(ctx context.Context, fullMethod string, start time.Time, err error) {
	s.inFlight.Add(-1)
	canceled := ctx.Err() != nil
	if canceled {
		s.canceled.Add(1)
	}
	if s.logger.Enabled(ctx, slog.LevelDebug) {
		s.logger.LogAttrs(ctx, slog.LevelDebug, "call finished",
			slog.String("method", fullMethod),
			slog.String("code", status.Code(err).String()),
			slog.Bool("canceled", canceled),
			slog.Duration("duration", time.Since(start)))
	}
	if canceled && s.cfg.OnCancel != nil {
		s.cfg.OnCancel(fullMethod)
	}
}

// responseMetadata builds the header and trailer metadata for a call: the
// backend name plus the echoed request keys. Values are copied, so the
// incoming metadata is not aliased. Binary ("-bin") values are already
// decoded by grpc-go and are re-encoded on the way out.
func (s *Server) responseMetadata(ctx context.Context) (header, trailer metadata.MD) {
	header = metadata.Pairs(HeaderBackend, s.cfg.Name)
	trailer = metadata.Pairs(TrailerBackend, s.cfg.Name)
	md, _ := metadata.FromIncomingContext(ctx)
	for k, vs := range md {
		switch {
		case strings.HasPrefix(k, EchoTrailerPrefix):
			trailer[k] = append(trailer[k], vs...)
		case strings.HasPrefix(k, EchoPrefix):
			header[k] = append(header[k], vs...)
		}
	}
	return header, trailer
}

// applyKnobs runs the per-server and per-call knobs before the handler, in
// this order: Latency plus x-delay, x-hang, x-fail-code, ErrorRate. A
// non-nil result is the status the call ends with.
func (s *Server) applyKnobs(ctx context.Context) error {
	md, _ := metadata.FromIncomingContext(ctx)
	delay := s.cfg.Latency
	if v := lastValue(md, MetadataDelay); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 {
			return status.Errorf(codes.InvalidArgument, "testserver: bad %s %q: want a non-negative Go duration", MetadataDelay, v)
		}
		delay += d
	}
	if err := s.wait(ctx, delay); err != nil {
		return err
	}
	if v := lastValue(md, MetadataHang); v != "" {
		hang, err := strconv.ParseBool(v)
		if err != nil {
			return status.Errorf(codes.InvalidArgument, "testserver: bad %s %q: want a boolean", MetadataHang, v)
		}
		if hang {
			<-ctx.Done()
			return contextStatus(ctx)
		}
	}
	if v := lastValue(md, MetadataFailCode); v != "" {
		code, err := strconv.ParseUint(v, 10, 32)
		if err != nil {
			return status.Errorf(codes.InvalidArgument, "testserver: bad %s %q: want a status code", MetadataFailCode, v)
		}
		if code != 0 {
			msg := lastValue(md, MetadataFailMessage)
			if msg == "" {
				msg = lastValue(md, MetadataFailMessageBin)
			}
			return status.Error(codes.Code(code), msg)
		}
	}
	if s.cfg.ErrorRate > 0 && s.rand.Float64() < s.cfg.ErrorRate {
		return status.Errorf(s.errorCode, "testserver: %s: injected failure (error rate %g)", s.cfg.Name, s.cfg.ErrorRate)
	}
	return nil
}

// wait blocks for d on the injected clock, or until ctx is done, in which
// case it returns the context's status.
func (s *Server) wait(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return nil
	}
	select {
	case <-s.after(d):
		return nil
	case <-ctx.Done():
		return contextStatus(ctx)
	}
}

// contextStatus converts ctx's error to a status error: Canceled or
// DeadlineExceeded.
func contextStatus(ctx context.Context) error {
	return status.FromContextError(ctx.Err()).Err()
}

// lastValue returns the last value of key in md, or "".
func lastValue(md metadata.MD, key string) string {
	if vs := md.Get(key); len(vs) > 0 {
		return vs[len(vs)-1]
	}
	return ""
}
