package proxy

import (
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
)

// stream is one proxied gRPC call: a client stream on a serverConn paired
// with a backend stream on a backendConn. It is an entry in both
// connections' tables; no goroutine belongs to it.
//
// Lock discipline: the fields under "client side" are guarded by cc.mu, the
// fields under "backend side" by bc.mu. The two locks are never held
// together; work that spans both takes one, releases it, then takes the
// other.
type stream struct {
	// Immutable after the stream is set up.
	cc     *serverConn
	bc     *backendConn // nil when no backend was picked
	method string
	done   func(error)
	timer  *time.Timer // grpc-timeout, or nil

	// Counters this stream holds a unit of, released when it ends.
	srvCount     *atomic.Int64 // Server.inflight when MaxStreams applies
	backendCount *atomic.Int64 // the backend's in-flight count

	// Client side, guarded by cc.mu.
	down        sendQueue // toward the client
	upRecv      recvState // flow control of client → proxy DATA
	cRecvEnd    bool      // client sent END_STREAM
	cSentEnd    bool      // our END_STREAM or RST_STREAM was written to the client
	headersSent bool      // response HEADERS taken for writing
	cClosed     bool      // removed from cc's table
	result      error     // outcome reported to done

	// Backend side, guarded by bc.mu.
	up        sendQueue // toward the backend
	downRecv  recvState // flow control of backend → proxy DATA
	reqFields []hpack.HeaderField
	reqEnd    bool // request HEADERS carried END_STREAM
	bRecvEnd  bool
	bSentEnd  bool
	bClosed   bool

	// sides counts the connections that have closed the stream; the second
	// one reports the outcome to done.
	sides atomic.Int32
}

// sideClosed is called once by each connection when it removes the stream
// from its table. The second call reports the outcome.
func (s *stream) sideClosed() {
	if s.sides.Add(1) != 2 {
		return
	}
	if s.timer != nil {
		s.timer.Stop()
	}
	if s.srvCount != nil {
		s.srvCount.Add(-1)
	}
	if s.backendCount != nil {
		s.backendCount.Add(-1)
	}
	if s.done != nil {
		s.done(s.result)
	}
}

// resetCode maps an HTTP/2 error code received from one peer to the code
// sent to the other. Codes are relayed as they are, so a client sees what a
// direct call would see: grpc-go maps RST_STREAM codes to statuses itself
// (REFUSED_STREAM → UNAVAILABLE, CANCEL → CANCELLED, ...).
func resetCode(c http2.ErrCode) http2.ErrCode { return c }

// rstStatus is the outcome recorded for a stream the backend reset, as
// grpc-go's client would report it (internal/transport http2ErrConvTab).
func rstStatus(c http2.ErrCode) codes.Code {
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
