package proxy

import (
	"context"

	"google.golang.org/grpc/codes"
)

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

// RetryPicker is an optional interface of a Picker, after Envoy's
// previous_hosts retry predicate and HAProxy's redispatch: for the second
// and later attempts of a call the proxy calls PickExcluding with the
// addresses the call already tried, in order, and the picker should
// choose a backend not among them if it has one. The proxy also calls it
// for a first attempt, with the backends that currently take no stream
// (they advertise SETTINGS_MAX_CONCURRENT_STREAMS=0), so that they are
// not picked; the call is no retry then. tried is only read
// during the call and is never nil or empty. The contract is otherwise
// Pick's. A Picker without it is asked again with Pick, a few times,
// until it names an address not yet tried.
type RetryPicker interface {
	PickExcluding(ctx context.Context, fullMethod string, tried []string) (addr string, done func(error), err error)
}

// Draining is implemented by the errors the proxy hands to done for an
// attempt that failed because its backend is shutting down gracefully: it
// sent GOAWAY (RFC 9113 §6.8) and the call was not processed, or it
// refused the connection shortly after such a GOAWAY, as a restarting
// server does. The status is still UNAVAILABLE; a Picker that ejects
// failing backends should not count such outcomes against the backend,
// which announced its restart rather than failed. The interface uses only
// standard types so a Picker can check for it (errors.As) without
// importing this package.
type Draining interface {
	error
	Draining() bool
}

// ConnectionFailure is implemented by the errors the proxy hands to done
// for an attempt that failed at the connection level, not because the
// backend answered: the connection could not be opened (refused, timed
// out), did not finish its HTTP/2 handshake in time, or was lost with the
// call open. The status is UNAVAILABLE. A Picker that ejects such a
// backend may end the ejection as soon as a new connection to it
// succeeds, since that is the fact these failures were about. Draining
// errors do not implement it. Like Draining it uses only standard types.
type ConnectionFailure interface {
	error
	ConnectionFailed() bool
}

// Unanswered is implemented by the errors the proxy hands to done for an
// attempt that its route's timeout (UpstreamPick.Timeout) ended while the
// backend had the whole request and had sent no response headers: it did
// not answer at all within the time the operator allows, as a hung
// backend does. The status is DEADLINE_EXCEEDED, which a Picker otherwise
// takes as the client's doing; one that ejects failing backends may count
// this one against the backend, as Envoy counts its upstream timeouts as
// gateway failures. A client's own deadline never makes one. Like
// Draining it uses only standard types.
type Unanswered interface {
	error
	Unanswered() bool
}

// ClientStatus is implemented by the errors the proxy hands to done when
// the client was sent another status than the failure's own: the proxy
// could not end the response with trailers and reset the stream instead,
// a part of a message being written already (INTERNAL_ERROR, which
// grpc-go's client reports as INTERNAL), or relayed a backend's
// REFUSED_STREAM after its answer started as INTERNAL_ERROR. The error's
// own status stays the failure's (UNAVAILABLE for a lost backend, which a
// Picker that ejects failing backends must see as such); ClientCode is the
// code the client reported, which metrics and logs of what clients got
// should count instead.
type ClientStatus interface {
	error
	ClientCode() codes.Code
}
