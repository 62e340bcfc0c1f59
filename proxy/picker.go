package proxy

import "context"

// Picker chooses a backend for one stream.
//
// Pick is called once per incoming gRPC stream, from the connection's reader
// goroutine, so it must not block or do I/O; it may be called concurrently
// from many connections. It returns the backend's "host:port" and a done
// function that the proxy calls exactly once when the stream ends, with nil
// when the call finished with grpc-status 0 and a non-nil error otherwise (an
// error carrying a gRPC status, via status.FromError, when one is known).
// done is how the picker learns outcomes and in-flight counts, after
// grpc-go's balancer.PickResult.Done. done may be nil.
//
// When no backend is usable Pick returns a non-nil error; the proxy answers
// the call with UNAVAILABLE naming the error, or with the error's own
// status when it carries one (status.FromError), or with CANCELLED or
// DEADLINE_EXCEEDED for context errors.
type Picker interface {
	Pick(ctx context.Context, fullMethod string) (addr string, done func(error), err error)
}

// PickerFunc adapts an ordinary function to the Picker interface.
type PickerFunc func(ctx context.Context, fullMethod string) (string, func(error), error)

// Pick calls f(ctx, fullMethod).
func (f PickerFunc) Pick(ctx context.Context, fullMethod string) (string, func(error), error) {
	return f(ctx, fullMethod)
}
