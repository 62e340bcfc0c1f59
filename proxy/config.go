package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"time"
)

// Defaults for Config fields left zero.
const (
	DefaultMaxConcurrentStreams  = 4096
	DefaultStreamWindow          = 256 << 10
	DefaultConnWindow            = 4 << 20
	DefaultMaxHeaderListSize     = 1 << 20
	DefaultBackendStreamsPerConn = 1000
	DefaultConnectTimeout        = 5 * time.Second
	DefaultHandshakeTimeout      = time.Second
	DefaultRestartGrace          = 5 * time.Second
	DefaultPrefaceTimeout        = 10 * time.Second
	DefaultDrainTimeout          = 30 * time.Second
	DefaultRetryBufferSize       = 64 << 10
	DefaultMaxRetries            = 2
	DefaultRetryBudget           = 10
	DefaultRetryBudgetRatio      = 0.1
	DefaultMaxConnections        = 10000
	DefaultMaxEarlyResets        = 100
	DefaultMaxGlitches           = 1000
	DefaultMaxHeaderFields       = 100
	DefaultIdleTimeout           = 5 * time.Minute
	DefaultWriteTimeout          = 20 * time.Second
	DefaultShutdownPingTimeout   = time.Second
	DefaultShutdownLinger        = time.Second
	DefaultRequestIdleTimeout    = 5 * time.Minute
	DefaultMaxConnBufferedBytes  = 16 << 20
)

const (
	maxWindow               = 1<<31 - 1
	minWindow               = 65535
	defaultInitialWindowRFC = 65535
)

// Config configures a frame-engine Server. The zero value of every field but
// Picker selects a default.
type Config struct {
	// Picker chooses the backend of every stream. Required.
	Picker Picker

	// MaxConcurrentStreams is advertised to clients as
	// SETTINGS_MAX_CONCURRENT_STREAMS; streams beyond it are refused with
	// REFUSED_STREAM (RFC 9113 §5.1.2).
	MaxConcurrentStreams uint32

	// StreamWindow is the flow-control window granted per stream, to clients
	// and to backends alike. It bounds the bytes buffered per stream and
	// direction.
	StreamWindow int32

	// ConnWindow is the connection-level window granted to each peer.
	ConnWindow int32

	// MaxConnBufferedBytes bounds the request DATA bytes a client
	// connection may have in the proxy, received and not yet handed on to
	// backends, over all its streams (each stream is also bounded by
	// StreamWindow). Past it the proxy withholds the connection-level
	// WINDOW_UPDATE, so the client stops sending, until the backends have
	// taken half of it; at most ConnWindow more can arrive meanwhile.
	// Zero means DefaultMaxConnBufferedBytes, negative no bound. Retry
	// replay buffers are bounded per attempt by RetryBufferSize instead.
	MaxConnBufferedBytes int64

	// MaxHeaderListSize bounds the decoded size of a header block
	// (SETTINGS_MAX_HEADER_LIST_SIZE).
	MaxHeaderListSize uint32

	// MaxHeaderFields bounds the fields of a client's request header block
	// (Envoy's default is 100 too); a request over it, or over
	// MaxHeaderListSize, is answered RESOURCE_EXHAUSTED (HTTP 431) on its
	// own stream, and request trailers over it reset the stream. Zero
	// means DefaultMaxHeaderFields.
	MaxHeaderFields int

	// BackendStreamsPerConn caps the streams opened on one backend
	// connection; the backend's own SETTINGS_MAX_CONCURRENT_STREAMS applies
	// when lower. When every connection to a backend is full another one is
	// opened.
	BackendStreamsPerConn uint32

	// ConnectTimeout bounds dialing a backend.
	ConnectTimeout time.Duration

	// HandshakeTimeout bounds how long a backend may take to send its
	// HTTP/2 SETTINGS after the connection is dialed (RFC 9113 §3.4); after
	// it the connection is closed. A call waits on a connection that has
	// not finished its handshake (dial included) at most HandshakeTimeout,
	// and at most a quarter of the time its grpc-timeout leaves (never
	// less than 50ms), then goes to another backend if it may be retried;
	// such a wait counts as a failure of the backend. Zero means
	// DefaultHandshakeTimeout.
	HandshakeTimeout time.Duration

	// RestartGrace is how long after a backend's graceful GOAWAY (code
	// NO_ERROR, RFC 9113 §6.8) its refused connections are taken for a
	// restart in progress rather than a failure: the calls go to other
	// backends, and the outcome handed to the Picker's done implements
	// Draining, so outlier ejection does not punish the backend, which
	// would otherwise stay ejected after it is back. The first SETTINGS of
	// a new connection to it ends the grace early; after it, refusals
	// count as failures again. Zero means DefaultRestartGrace, negative
	// none.
	RestartGrace time.Duration

	// PrefaceTimeout bounds how long a new client connection may take to
	// send the HTTP/2 connection preface.
	PrefaceTimeout time.Duration

	// IdleTimeout is how long a client connection may go without a stream
	// before it is shut down gracefully (GOAWAY, then close). Zero means
	// DefaultIdleTimeout, negative never.
	IdleTimeout time.Duration

	// RequestIdleTimeout bounds how long a client stream whose request is
	// not complete (no END_STREAM yet) may go with no DATA from the client
	// and no response frame toward it: past it the call ends with
	// DEADLINE_EXCEEDED, the stream is reset (NO_ERROR) and the backend
	// stream cancelled, so a client cannot hold streams (and the backend's
	// handlers) by never finishing its requests. Checked on a sweep every
	// quarter of it, so a stream may live up to a quarter longer. Calls
	// whose request is complete are bounded by their grpc-timeout only.
	// Zero means DefaultRequestIdleTimeout, negative none.
	RequestIdleTimeout time.Duration

	// WriteTimeout bounds every write to a client connection: a client
	// that does not read for that long while the proxy has bytes for it
	// loses the connection, and its calls fail. Zero means
	// DefaultWriteTimeout, negative no bound.
	WriteTimeout time.Duration

	// ShutdownPingTimeout bounds the first step of a client connection's
	// graceful shutdown (Server.Shutdown, IdleTimeout): after GOAWAY with
	// stream id 2^31-1 and a PING, the proxy waits for the PING's ack, or
	// this long, before it sends GOAWAY with the real last stream id;
	// streams the client opened in between are served (RFC 9113 §6.8).
	// Zero means DefaultShutdownPingTimeout.
	ShutdownPingTimeout time.Duration

	// ShutdownLinger is how long a drained client connection, its final
	// GOAWAY written, waits for the client to close before the proxy
	// closes it, so the GOAWAY is not lost to a TCP reset. Zero means
	// DefaultShutdownLinger, negative none.
	ShutdownLinger time.Duration

	// DrainTimeout bounds how long connections to a backend that left the
	// set (see Server.RetainBackends) may keep serving the streams they
	// carry; after it they are closed and those streams fail with
	// UNAVAILABLE. Zero means DefaultDrainTimeout.
	DrainTimeout time.Duration

	// MaxConnections caps the client connections served at once; a
	// connection accepted over it is closed at once (and counted, and
	// logged at Debug at most once a second). Zero means
	// DefaultMaxConnections, negative no cap.
	MaxConnections int

	// MaxEarlyResets bounds the streams a client connection may reset
	// before their response ended, per 10 s window, once they are more
	// than half of the streams it opened in the window; past it the
	// connection ends with GOAWAY(ENHANCE_YOUR_CALM). This is the defence
	// against rapid reset (CVE-2023-44487). Zero means
	// DefaultMaxEarlyResets, negative no limit.
	MaxEarlyResets int

	// MaxGlitches is the points a client connection may spend per 10 s
	// window on frames that do no work (empty DATA, PINGs with nothing sent
	// in between, SETTINGS, frames on closed streams, stream errors), one
	// point each; past it the connection ends with
	// GOAWAY(ENHANCE_YOUR_CALM), as HAProxy's glitch threshold does. Zero
	// means DefaultMaxGlitches, negative no limit.
	MaxGlitches int

	// MaxStreams caps the calls in flight through the server, over all
	// client connections; a call over the cap fails at once with
	// RESOURCE_EXHAUSTED. Zero means no cap.
	MaxStreams int64

	// MaxStreamsPerBackend caps the calls in flight to any one backend;
	// a call picked for a backend at its cap fails at once with
	// RESOURCE_EXHAUSTED. Zero means no cap.
	MaxStreamsPerBackend int64

	// PickMetadata names request headers (lower case) to hand to the
	// Picker as incoming gRPC metadata (metadata.FromIncomingContext), for
	// policies that route on a header such as ring hash. Empty means none,
	// which keeps Pick free of per-stream allocations.
	PickMetadata []string

	// RetryBufferSize bounds the request bytes an attempt keeps so the call
	// can be retried on another backend (see retry.go), counted by the
	// capacity of the buffers kept, not by the bytes in them: zero means
	// DefaultRetryBufferSize, negative disables retries.
	RetryBufferSize int

	// MaxRetries is how many more attempts a call may make: zero means
	// DefaultMaxRetries, negative none.
	MaxRetries int

	// RetryBudget and RetryBudgetRatio are gRFC A6 retry throttling for
	// the RetryOn methods: a token bucket of RetryBudget tokens; every
	// failed call takes one, every successful call gives back
	// RetryBudgetRatio, and UNAVAILABLE answers are retried only while more
	// than half the tokens are left, so a fleet-wide failure does not
	// multiply the load. Zero means DefaultRetryBudget and
	// DefaultRetryBudgetRatio. Transparent retries (the call never reached
	// a backend) do not use the budget.
	RetryBudget      int
	RetryBudgetRatio float64

	// MaxRetries, RetryBudget, RetryBudgetRatio, RetryOn and Dial make the
	// Server's own Upstream: they apply to the calls of a Picker that is
	// not an UpstreamPicker, or whose pick names no Upstream.
	//
	// RetryOn names methods ("/pkg.Service/Method", or "/pkg.Service/" for
	// all of a service) whose UNAVAILABLE answers are retried on another
	// backend, within the retry budget. Only idempotent methods belong here.
	// The leading and a service's trailing slash may be left out
	// ("pkg.Service/Method", "pkg.Service"); New rejects other forms.
	RetryOn []string

	// Dial opens backend connections. Nil means net.Dialer.DialContext.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)

	// Logger receives the server's logs. Nil means slog.Default().
	Logger *slog.Logger

	// OnCallEnd, if set, is called once per client stream after it ended,
	// with what the access log and metrics need. It runs on a goroutine
	// of the Server's, one call at a time, under no lock of the proxy's,
	// so it may block, but while it does further calls queue (up to a
	// bound, then they are dropped and counted in a Warn log). Nil costs
	// nothing per call.
	OnCallEnd func(CallInfo)
}

func (c *Config) setDefaults() error {
	if c.Picker == nil {
		return errors.New("proxy: Config.Picker is required")
	}
	if c.MaxConcurrentStreams == 0 {
		c.MaxConcurrentStreams = DefaultMaxConcurrentStreams
	}
	if c.StreamWindow == 0 {
		c.StreamWindow = DefaultStreamWindow
	}
	if c.StreamWindow < minWindow {
		return fmt.Errorf("proxy: StreamWindow %d is below the HTTP/2 default of %d", c.StreamWindow, minWindow)
	}
	if c.ConnWindow == 0 {
		c.ConnWindow = DefaultConnWindow
	}
	if c.ConnWindow < minWindow {
		return fmt.Errorf("proxy: ConnWindow %d is below the HTTP/2 default of %d", c.ConnWindow, minWindow)
	}
	defaultOrOff(&c.MaxConnBufferedBytes, DefaultMaxConnBufferedBytes)
	if c.MaxHeaderListSize == 0 {
		c.MaxHeaderListSize = DefaultMaxHeaderListSize
	}
	if c.MaxHeaderFields <= 0 {
		c.MaxHeaderFields = DefaultMaxHeaderFields
	}
	if c.BackendStreamsPerConn == 0 {
		c.BackendStreamsPerConn = DefaultBackendStreamsPerConn
	}
	if c.ConnectTimeout <= 0 {
		c.ConnectTimeout = DefaultConnectTimeout
	}
	if c.HandshakeTimeout <= 0 {
		c.HandshakeTimeout = DefaultHandshakeTimeout
	}
	defaultOrOff(&c.RestartGrace, DefaultRestartGrace)
	defaultOrOff(&c.MaxConnections, DefaultMaxConnections)
	defaultOrOff(&c.IdleTimeout, DefaultIdleTimeout)
	defaultOrOff(&c.WriteTimeout, DefaultWriteTimeout)
	defaultOrOff(&c.RequestIdleTimeout, DefaultRequestIdleTimeout)
	if c.ShutdownPingTimeout <= 0 {
		c.ShutdownPingTimeout = DefaultShutdownPingTimeout
	}
	defaultOrOff(&c.ShutdownLinger, DefaultShutdownLinger)
	if c.MaxEarlyResets == 0 {
		c.MaxEarlyResets = DefaultMaxEarlyResets
	}
	if c.MaxGlitches == 0 {
		c.MaxGlitches = DefaultMaxGlitches
	}
	if c.PrefaceTimeout <= 0 {
		c.PrefaceTimeout = DefaultPrefaceTimeout
	}
	defaultOrOff(&c.RetryBufferSize, DefaultRetryBufferSize)
	switch {
	case c.MaxRetries == 0:
		c.MaxRetries = DefaultMaxRetries
	case c.MaxRetries < 0 || c.RetryBufferSize == 0:
		c.MaxRetries = 0
	}
	if c.DrainTimeout <= 0 {
		c.DrainTimeout = DefaultDrainTimeout
	}
	if c.MaxStreams < 0 || c.MaxStreamsPerBackend < 0 {
		return errors.New("proxy: MaxStreams and MaxStreamsPerBackend must not be negative")
	}
	if len(c.PickMetadata) > 0 {
		// A copy: the caller's slice is theirs, and may be shared with
		// other configs.
		keys := make([]string, len(c.PickMetadata))
		for i, h := range c.PickMetadata {
			keys[i] = strings.ToLower(h)
		}
		c.PickMetadata = keys
	}
	if c.RetryBudget < 0 || c.RetryBudgetRatio < 0 {
		return errors.New("proxy: RetryBudget and RetryBudgetRatio must not be negative")
	}
	if c.RetryBudget == 0 {
		c.RetryBudget = DefaultRetryBudget
	}
	if c.RetryBudgetRatio == 0 {
		c.RetryBudgetRatio = DefaultRetryBudgetRatio
	}
	var err error
	if c.RetryOn, err = normalizeMethods(c.RetryOn); err != nil {
		return err
	}
	if c.Dial == nil {
		var d net.Dialer
		c.Dial = d.DialContext
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return nil
}

// defaultOrOff applies the convention of the Config fields that can be
// turned off: zero means def, a negative value means off (stored as 0).
func defaultOrOff[T ~int | ~int64](v *T, def T) {
	switch {
	case *v == 0:
		*v = def
	case *v < 0:
		*v = 0
	}
}
