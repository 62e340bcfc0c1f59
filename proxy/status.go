package proxy

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// This file is the proxy's status edge: every call the proxy itself ends,
// rather than relaying a backend's answer, is described by a failure, and
// statusOf alone turns a failure into the gRPC status (and, for requests
// that are not gRPC, the HTTP status) the client and the Picker see. A
// status that came from a backend never goes through statusOf: its header
// blocks are relayed untouched (see endBlocks).

// failKind is what went wrong when the proxy ends a call itself.
type failKind int

const (
	// failInternal is a proxy bug: an error nobody classified. It is the
	// zero value, so a failure nobody filled in reports INTERNAL.
	failInternal failKind = iota
	// failNoBackend: Picker.Pick returned an error (cause).
	failNoBackend
	// failShuttingDown: the server is closing and opens no backend
	// connection.
	failShuttingDown
	// failTooManyCalls: Config.MaxStreams calls are in flight (limit).
	failTooManyCalls
	// failBackendFull: the backend has Config.MaxStreamsPerBackend calls
	// in flight (limit).
	failBackendFull
	// failDial: the backend connection could not be opened (cause).
	failDial
	// failConnLost: the backend connection ended before the call did
	// (cause, may be nil).
	failConnLost
	// failRefused: the backend reset the stream with REFUSED_STREAM before
	// processing it (RFC 9113 §8.7).
	failRefused
	// failGoAway: the backend's GOAWAY named a last stream id below the
	// call's (RFC 9113 §6.8), or the call was not yet opened.
	failGoAway
	// failBackendUnavailable: the backend answered UNAVAILABLE and the call
	// is retried elsewhere. Only the Picker sees this status; if the call
	// is not retried the client gets the backend's own answer.
	failBackendUnavailable
	// failBackendProtocol: the backend broke HTTP/2 on the call's stream
	// (h2code is the reset we sent).
	failBackendProtocol
	// failBackendReset: the backend reset the stream (h2code). The reset
	// itself is relayed to the client; this is the Picker's outcome.
	failBackendReset
	// failRepicked: a pick the proxy did not use, because the call had
	// already tried that backend (backend). Only the Picker sees it, and
	// as CANCELLED, so it counts neither for nor against the backend.
	failRepicked
	// failHandshake: the backend connection the attempt waited on did not
	// finish its HTTP/2 handshake (the backend's SETTINGS) in time (limit,
	// in milliseconds).
	failHandshake
	// failDeadline: the call's grpc-timeout passed.
	failDeadline
	// failRouteTimeout: the timeout of the call's route passed
	// (UpstreamPick.Timeout; limit, as a time.Duration), before the
	// client's own deadline if it has one.
	failRouteTimeout
	// failClientReset: the client reset the stream.
	failClientReset
	// failClientGone: the client connection ended with the call open.
	failClientGone
	// failClientStream: the client broke HTTP/2 on the stream (a stream
	// error, RFC 9113 §5.4.2, h2code), which the proxy reset.
	failClientStream
	// failHeadersTooLarge: the request header list was over
	// MaxHeaderListSize or MaxHeaderFields.
	failHeadersTooLarge
	// failRequestHeadersOverPeer: the request header list (detail: its
	// size) is over the backend's SETTINGS_MAX_HEADER_LIST_SIZE (limit);
	// it was not sent.
	failRequestHeadersOverPeer
	// failResponseHeadersOverPeer: a response header or trailer block of
	// the backend's is over the client's SETTINGS_MAX_HEADER_LIST_SIZE
	// (limit); it was not sent.
	failResponseHeadersOverPeer
	// failConnBudget: the client connection holds its
	// Config.MaxConnBufferedBytes (limit) already.
	failConnBudget
	// failBadRequest: the request headers are malformed (cause).
	failBadRequest
	// failBadMethod: the request's :method is not POST (detail).
	failBadMethod
	// failBadContentType: the request's content-type is not gRPC (detail).
	failBadContentType
	// failRequestIdle: the client sent nothing on a stream whose request
	// is not complete, and the response moved neither, for
	// Config.RequestIdleTimeout (limit, in milliseconds).
	failRequestIdle
	// failBackendConns: every connection to the backend is full and it
	// has Config.MaxBackendConns of them (limit). The Picker sees
	// CANCELLED (see pickerErr): the backend did not fail.
	failBackendConns
	// failQueueTimeout: every connection to the backend was full at
	// MaxBackendConns and the call waited BackendPendingTimeout (limit,
	// in ms) for a slot in vain (pool.queueLocked).
	failQueueTimeout
	// failNoStreams: the backend advertised
	// SETTINGS_MAX_CONCURRENT_STREAMS=0, so it takes no stream.
	failNoStreams
	// failOverLimit: the attempt's slot was reserved on a connection's
	// assumed stream limit, or before the backend lowered it, and the
	// backend's SETTINGS_MAX_CONCURRENT_STREAMS (limit) leaves it none:
	// it was never sent, and the call is placed again
	// (backendConn.overLimitLocked). The Picker sees CANCELLED (see
	// pickerErr): the backend did not fail.
	failOverLimit
	// failLoop: the request carries this proxy's own hop header
	// (loopHeader): it went round a forwarding loop and came back.
	failLoop
)

// failure is one call the proxy ends itself: its kind and the details its
// message names. Only the fields the kind documents are read. A failure is
// an error (its message) so that functions such as pool.get can return one.
type failure struct {
	kind    failKind
	backend string        // backend address
	method  string        // gRPC full method name
	detail  string        // offending request header value
	limit   int64         // limit reached
	cause   error         // underlying error
	h2code  http2.ErrCode // RST_STREAM code
	// draining: the backend is restarting gracefully (see Draining); set
	// on failGoAway, failDial and failConnLost only.
	draining bool
	// unanswered: a failRouteTimeout whose backend had the whole request
	// and had sent no response headers (see Unanswered).
	unanswered bool
	// unsent: the call's attempt was never opened on its backend (it
	// waited for a slot): its Picker's done sees CANCELLED whatever the
	// client is told, as for failQueueTimeout.
	unsent bool
}

func (f failure) Error() string {
	st, _ := statusOf(f)
	return st.Message()
}

// statusErr is f's status as a grpc-go status error, the form handed to
// Picker.done.
func (f failure) statusErr() error {
	st, _ := statusOf(f)
	return f.doneErr(st)
}

// doneErr is st, f's status, as an error with the interfaces that tell a
// Picker what f says of the backend (Draining, ConnectionFailure,
// Unanswered).
func (f failure) doneErr(st *status.Status) error {
	switch {
	case f.kind == failQueueTimeout || f.unsent:
		// The client is told UNAVAILABLE (or, shed for its connection's
		// buffer budget, RESOURCE_EXHAUSTED); the Picker, CANCELLED: a
		// backend whose connections are all busy has not failed (as
		// pickerErr says of failBackendConns), nor answered.
		return clientStatusError{err: status.Error(codes.Canceled, st.Message()), code: st.Code()}
	case f.draining:
		return drainingError{st}
	case f.connectionLevel():
		return connectionError{st}
	case f.unanswered:
		return unansweredError{st}
	}
	return st.Err()
}

// connectionLevel reports whether f is a failure of the backend
// connection itself: it could not be opened, did not finish its
// handshake, or was lost.
func (f failure) connectionLevel() bool {
	return f.kind == failDial || f.kind == failConnLost || f.kind == failHandshake
}

// pickerErr is the outcome of f as handed to the Picker's done when the
// attempt never got a stream and the call went on elsewhere: statusErr,
// except for an overflow of the proxy's own connection cap, a backend
// that advertises SETTINGS_MAX_CONCURRENT_STREAMS=0 and an attempt its
// backend's lower SETTINGS_MAX_CONCURRENT_STREAMS left without a slot,
// which say nothing of the backend's health (it is alive and says "not
// now") and are reported as CANCELLED, as failRepicked is, so they never
// eject it. None of them was sent (UpstreamPick.Sent), so metrics count
// none as finished either.
func (f failure) pickerErr() error {
	switch f.kind {
	case failBackendConns:
		return status.Errorf(codes.Canceled, "streamlb: backend %s not used: at its connection cap", f.backend)
	case failNoStreams:
		return status.Errorf(codes.Canceled, "streamlb: backend %s not used: it takes no streams (SETTINGS_MAX_CONCURRENT_STREAMS=0)", f.backend)
	case failOverLimit:
		return status.Errorf(codes.Canceled, "streamlb: backend %s not used: its SETTINGS_MAX_CONCURRENT_STREAMS (%d) left the call no stream slot", f.backend, f.limit)
	}
	return f.statusErr()
}

// clientStatusError is a failure whose client was sent code instead of
// its status (ClientStatus). It keeps err's status and interfaces
// (Draining, ConnectionFailure) for the Picker.
type clientStatusError struct {
	err  error
	code codes.Code
}

func (e clientStatusError) Error() string          { return e.err.Error() }
func (e clientStatusError) Unwrap() error          { return e.err }
func (e clientStatusError) ClientCode() codes.Code { return e.code }

// GRPCStatus is err's own: status.FromError of a wrapping error would
// replace its message with Error's.
func (e clientStatusError) GRPCStatus() *status.Status { return status.Convert(e.err) }

var _ ClientStatus = clientStatusError{}

// sentAs returns err, the outcome of a call whose client was reset with
// code, as the client reports it: wrapped in a clientStatusError when
// grpc-go's client turns that reset into another code than err's.
// CANCEL is left alone: it ends a call that failed for the client's
// deadline or going away, which the client reports as such.
func sentAs(err error, code http2.ErrCode) error {
	cc := rstCode(code)
	if cc == codes.Canceled || cc == status.Code(err) {
		return err
	}
	return clientStatusError{err: err, code: cc}
}

// drainingError is the status of an attempt that failed because its
// backend is restarting gracefully; it implements Draining.
type drainingError struct{ st *status.Status }

func (e drainingError) Error() string              { return e.st.Err().Error() }
func (e drainingError) GRPCStatus() *status.Status { return e.st }

// Draining implements the Draining interface.
func (drainingError) Draining() bool { return true }

var _ Draining = drainingError{}

// connectionError is the status of an attempt that failed because its
// backend connection could not be opened, did not finish its handshake or
// was lost; it implements ConnectionFailure.
type connectionError struct{ st *status.Status }

func (e connectionError) Error() string              { return e.st.Err().Error() }
func (e connectionError) GRPCStatus() *status.Status { return e.st }

// ConnectionFailed implements the ConnectionFailure interface.
func (connectionError) ConnectionFailed() bool { return true }

var _ ConnectionFailure = connectionError{}

// unansweredError is the status of an attempt that its route's timeout
// ended with the whole request sent and no response headers from the
// backend; it implements Unanswered.
type unansweredError struct{ st *status.Status }

func (e unansweredError) Error() string              { return e.st.Err().Error() }
func (e unansweredError) GRPCStatus() *status.Status { return e.st }

// Unanswered implements the Unanswered interface.
func (unansweredError) Unanswered() bool { return true }

var _ Unanswered = unansweredError{}

// statusOf is the one mapping from a proxy-generated failure to the status
// the call ends with, and the HTTP status of the response: 200 except for
// requests refused before they could be relayed, which get the HTTP status
// grpc-go's server sends for them (http2_server.go, writeEarlyAbort).
// Messages start with "streamlb:" and name the cause, and the backend or
// limit when there is one, so a client can tell the proxy's answers from
// its backends'.
func statusOf(f failure) (*status.Status, int) {
	switch f.kind {
	case failNoBackend:
		// A status the Picker chose is kept, as grpc-go's pickerWrapper
		// ends an RPC with the status a picker returns.
		if st, ok := status.FromError(f.cause); ok && st.Code() != codes.OK {
			return st, http.StatusOK
		}
		code := codes.Unavailable
		switch {
		case errors.Is(f.cause, context.Canceled):
			code = codes.Canceled
		case errors.Is(f.cause, context.DeadlineExceeded):
			code = codes.DeadlineExceeded
		}
		return status.Newf(code, "streamlb: no backend for %s: %v", f.method, f.cause), http.StatusOK
	case failShuttingDown:
		return status.New(codes.Unavailable, "streamlb: server is shutting down"), http.StatusOK
	case failTooManyCalls:
		return status.Newf(codes.ResourceExhausted, "streamlb: too many concurrent calls (limit %d)", f.limit), http.StatusOK
	case failBackendFull:
		return status.Newf(codes.ResourceExhausted, "streamlb: backend %s is at its concurrency limit (limit %d)", f.backend, f.limit), http.StatusOK
	case failDial:
		return status.Newf(codes.Unavailable, "streamlb: backend %s: connecting: %v", f.backend, f.cause), http.StatusOK
	case failConnLost:
		msg := "streamlb: backend connection to " + f.backend + " lost"
		if f.cause != nil && !errors.Is(f.cause, errClosed) {
			msg += ": " + f.cause.Error()
		}
		return status.New(codes.Unavailable, msg), http.StatusOK
	case failRefused:
		return status.Newf(codes.Unavailable, "streamlb: backend %s refused the stream (REFUSED_STREAM)", f.backend), http.StatusOK
	case failGoAway:
		return status.Newf(codes.Unavailable, "streamlb: backend %s is going away (GOAWAY) and did not process the call", f.backend), http.StatusOK
	case failBackendUnavailable:
		return status.Newf(codes.Unavailable, "streamlb: backend %s answered UNAVAILABLE", f.backend), http.StatusOK
	case failBackendProtocol:
		if f.cause != nil {
			return status.Newf(codes.Internal, "streamlb: protocol error from backend %s: %v: %v", f.backend, f.h2code, f.cause), http.StatusOK
		}
		return status.Newf(codes.Internal, "streamlb: protocol error from backend %s: %v", f.backend, f.h2code), http.StatusOK
	case failBackendReset:
		return status.Newf(rstCode(f.h2code), "streamlb: backend %s reset the stream: %v", f.backend, f.h2code), http.StatusOK
	case failRepicked:
		return status.Newf(codes.Canceled, "streamlb: pick of %s not used: the call already tried it", f.backend), http.StatusOK
	case failHandshake:
		return status.Newf(codes.Unavailable, "streamlb: backend %s: no HTTP/2 handshake within %v", f.backend, time.Duration(f.limit)*time.Millisecond), http.StatusOK
	case failBackendConns:
		return status.Newf(codes.Unavailable, "streamlb: backend %s: every connection is at its stream limit (limit %d connections)", f.backend, f.limit), http.StatusOK
	case failQueueTimeout:
		return status.Newf(codes.Unavailable, "streamlb: backend %s: every connection is at its stream limit, and no slot came free within %v", f.backend, time.Duration(f.limit)*time.Millisecond), http.StatusOK
	case failNoStreams:
		return status.Newf(codes.Unavailable, "streamlb: backend %s accepts no streams (SETTINGS_MAX_CONCURRENT_STREAMS=0)", f.backend), http.StatusOK
	case failOverLimit:
		return status.Newf(codes.Unavailable, "streamlb: backend %s: its SETTINGS_MAX_CONCURRENT_STREAMS (%d) left the call no stream slot", f.backend, f.limit), http.StatusOK
	case failLoop:
		return status.Newf(codes.Unavailable, "streamlb: forwarding loop: %s came back to this proxy %d times (its %s header names it); a backend of its cluster is this proxy, or a proxy that forwards to it", f.method, maxLoopPasses, loopHeader), http.StatusOK
	case failDeadline:
		return status.New(codes.DeadlineExceeded, "streamlb: deadline exceeded (grpc-timeout) waiting for "+f.method), http.StatusOK
	case failRouteTimeout:
		return status.Newf(codes.DeadlineExceeded, "streamlb: route timeout %v exceeded waiting for %s", time.Duration(f.limit), f.method), http.StatusOK
	case failRequestIdle:
		return status.Newf(codes.DeadlineExceeded, "streamlb: request idle for %v: no DATA or END_STREAM from the client", time.Duration(f.limit)*time.Millisecond), http.StatusOK
	case failClientReset:
		return status.New(codes.Canceled, "streamlb: client reset the stream"), http.StatusOK
	case failClientGone:
		return status.New(codes.Canceled, "streamlb: client connection closed"), http.StatusOK
	case failClientStream:
		// CANCELLED, as for a client that gave up: nothing the backend
		// did. The client itself reports the reset's code (sentAs).
		if f.cause != nil {
			return status.Newf(codes.Canceled, "streamlb: stream error from the client: %v (%v); the proxy reset the stream", f.h2code, f.cause), http.StatusOK
		}
		return status.Newf(codes.Canceled, "streamlb: stream error from the client: %v; the proxy reset the stream", f.h2code), http.StatusOK
	case failHeadersTooLarge:
		return status.New(codes.ResourceExhausted, "streamlb: request header list too large"), http.StatusRequestHeaderFieldsTooLarge
	case failRequestHeadersOverPeer:
		return status.Newf(codes.ResourceExhausted, "streamlb: request header list of %s bytes is over backend %s's SETTINGS_MAX_HEADER_LIST_SIZE of %d", f.detail, f.backend, f.limit), http.StatusOK
	case failResponseHeadersOverPeer:
		// grpc-go's server resets such a stream with INTERNAL_ERROR, which
		// its client reports as INTERNAL; a status says why.
		return status.Newf(codes.Internal, "streamlb: response header list of %s bytes from backend %s is over the client's SETTINGS_MAX_HEADER_LIST_SIZE of %d", f.detail, f.backend, f.limit), http.StatusOK
	case failConnBudget:
		return status.Newf(codes.ResourceExhausted, "streamlb: connection holds its buffer budget (%d bytes): too much data in flight", f.limit), http.StatusOK
	case failBadRequest:
		return status.Newf(codes.Internal, "streamlb: malformed request headers: %v", f.cause), http.StatusBadRequest
	case failBadMethod:
		return status.Newf(codes.Internal, "streamlb: method %q not allowed, gRPC uses POST", f.detail), http.StatusMethodNotAllowed
	case failBadContentType:
		return status.Newf(codes.InvalidArgument, "streamlb: invalid gRPC request content-type %q", f.detail), http.StatusUnsupportedMediaType
	}
	if f.cause != nil {
		return status.Newf(codes.Internal, "streamlb: internal error: %v", f.cause), http.StatusOK
	}
	return status.Newf(codes.Internal, "streamlb: internal error (failure kind %d)", f.kind), http.StatusOK
}

// rstCode is the status of a stream the backend reset, as grpc-go's client
// would report it (internal/transport http2ErrConvTab).
func rstCode(c http2.ErrCode) codes.Code {
	switch c {
	case http2.ErrCodeNo, http2.ErrCodeProtocol, http2.ErrCodeInternal, http2.ErrCodeFlowControl,
		http2.ErrCodeSettingsTimeout, http2.ErrCodeStreamClosed, http2.ErrCodeFrameSize,
		http2.ErrCodeCompression, http2.ErrCodeConnect:
		return codes.Internal
	case http2.ErrCodeRefusedStream:
		return codes.Unavailable
	case http2.ErrCodeCancel:
		return codes.Canceled
	case http2.ErrCodeEnhanceYourCalm:
		return codes.ResourceExhausted
	case http2.ErrCodeInadequateSecurity:
		return codes.PermissionDenied
	}
	return codes.Unknown
}

// endBlocks returns the header blocks that end a response the proxy cuts
// short, and the outcome to report to Picker.done. With answer, the
// backend's own final header blocks, those are relayed untouched and the
// outcome is the backend's status; otherwise the blocks carry statusOf(f),
// trailers-only when trailersOnly (no response header was sent yet),
// else trailers after the headers already sent.
func endBlocks(f failure, trailersOnly bool, answer [][]hpack.HeaderField) ([][]hpack.HeaderField, error) {
	if len(answer) > 0 {
		return answer, answerOutcome(answer)
	}
	st, httpStatus := statusOf(f)
	// For outlier detection: a call that ends because its backend
	// connection was lost says the connection failed (ConnectionFailure),
	// one its route's timeout ended unanswered says so (Unanswered).
	err := f.doneErr(st)
	if _, ok := err.(drainingError); ok {
		err = st.Err() // as before: a drain ending a call is no more than its status
	}
	return [][]hpack.HeaderField{statusFields(st, httpStatus, trailersOnly)}, err
}

// statusFields is a proxy-generated gRPC status. With trailersOnly it is a
// complete response of one HEADERS frame (gRPC "Trailers-Only") with the
// given HTTP status, otherwise the trailers that close a response already
// started.
func statusFields(st *status.Status, httpStatus int, trailersOnly bool) []hpack.HeaderField {
	f := make([]hpack.HeaderField, 0, 4)
	if trailersOnly {
		f = append(f,
			hpack.HeaderField{Name: ":status", Value: strconv.Itoa(httpStatus)},
			hpack.HeaderField{Name: "content-type", Value: "application/grpc"})
	}
	f = append(f, hpack.HeaderField{Name: "grpc-status", Value: strconv.Itoa(int(st.Code()))})
	if msg := st.Message(); msg != "" {
		f = append(f, hpack.HeaderField{Name: "grpc-message", Value: encodeGRPCMessage(msg)})
	}
	return f
}

// failLocked ends s's response because of f, as endBlocks describes, and
// records the outcome for Picker.done. The response must not have ended
// yet. Caller must hold mu. With answer, the backend's own answer before
// any response was relayed, what is queued is dropped; otherwise
// endStatusLocked (midstream.go) decides what of it still goes.
func (c *serverConn) failLocked(s *stream, f failure, answer ...[]hpack.HeaderField) {
	if len(answer) == 0 {
		c.endStatusLocked(s, f)
		return
	}
	blocks, result := endBlocks(f, !s.headersSent, answer)
	s.result = result
	s.failKind = f.kind
	if len(answer) > 0 {
		c.noteBackendStatusLocked(s, answer[len(answer)-1])
	}
	c.finishDownLocked(s, blocks...)
}
