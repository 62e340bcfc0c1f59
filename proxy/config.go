package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"strings"
	"time"
)

// Defaults for Config fields left zero.
const (
	DefaultMaxConcurrentStreams  = 1024
	DefaultStreamWindow          = 256 << 10
	DefaultConnWindow            = 4 << 20
	DefaultMaxHeaderListSize     = 60 << 10
	DefaultBackendStreamsPerConn = 1000
	DefaultConnectTimeout        = 5 * time.Second
	DefaultHandshakeTimeout      = time.Second
	DefaultRestartGrace          = 5 * time.Second
	DefaultPrefaceTimeout        = 10 * time.Second
	DefaultDrainTimeout          = 30 * time.Second
	DefaultRetryBufferSize       = 64 << 10
	DefaultResponseHoldback      = 128 << 10
	DefaultMaxRetries            = 2
	DefaultRetryBudget           = 10
	DefaultRetryBudgetRatio      = 0.1
	DefaultMaxConnections        = 10000
	DefaultMaxEarlyResets        = 100
	DefaultMaxGlitches           = 1000
	DefaultMaxHeaderFields       = 100
	DefaultIdleTimeout           = 5 * time.Minute
	DefaultParkAfter             = time.Second
	DefaultWriteTimeout          = 20 * time.Second
	DefaultPingAckDelay          = 10 * time.Millisecond
	DefaultShutdownPingTimeout   = time.Second
	DefaultShutdownLinger        = time.Second
	DefaultRequestIdleTimeout    = 5 * time.Minute
	DefaultMaxConnBufferedBytes  = 16 << 20
	DefaultMaxBackendConns       = 8
	DefaultMaxBackendPending     = 1024
	DefaultBackendPendingTimeout = 5 * time.Second
	DefaultBackendIdleTimeout    = 5 * time.Minute
	// DefaultBackendKeepaliveTime is grpc-go's server default of
	// keepalive.EnforcementPolicy.MinTime: PINGs any closer together, on
	// a connection whose backend sends nothing in between, make a grpc-go
	// backend close it with GOAWAY(ENHANCE_YOUR_CALM, "too_many_pings").
	DefaultBackendKeepaliveTime = 5 * time.Minute
	// DefaultBackendKeepaliveTimeout is grpc-go's client default
	// (keepalive.ClientParameters.Timeout).
	DefaultBackendKeepaliveTimeout = 20 * time.Second
	// MinTimerSetting is the least positive IdleTimeout,
	// RequestIdleTimeout, BackendIdleTimeout and BackendKeepaliveTime
	// (the floor of the DNS refresh and the health-check interval too).
	MinTimerSetting            = time.Millisecond
	DefaultBackendStreamWindow = 16 << 10
	// DefaultBackendMaxStreamWindow was 1 MiB: four 1 MiB answers to a
	// client slower than the backends then held about 4 MiB of DATA in
	// the proxy, which the GC's heap goal doubles. 512 KiB took the
	// benchmark's peak RSS from about 22-24 to 20 MiB with no measurable
	// CPU per MiB (BENCHMARKS.md, "Memory: start-up pages").
	DefaultBackendMaxStreamWindow    = 512 << 10
	DefaultMaxResponseHeaderListSize = 1 << 20
)

const (
	maxWindow               = 1<<31 - 1
	minWindow               = 65535
	defaultInitialWindowRFC = 65535

	// minBackendWindow is the smallest BackendStreamWindow: a window of
	// zero would never be credited (credit follows bytes received).
	minBackendWindow = 256
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

	// StreamWindow is the flow-control window granted to clients per
	// stream. It bounds the request bytes buffered per stream.
	StreamWindow int32

	// BackendStreamWindow is the initial flow-control window granted to
	// backends per stream (their SETTINGS_INITIAL_WINDOW_SIZE). It is all
	// a stream whose client does not read its answer can make the proxy
	// buffer for it, since a window granted cannot be taken back (RFC 9113
	// §6.9): per client connection, streams × BackendStreamWindow. When
	// the backend ran short of it and the client has shown that it reads
	// (a drain probe PING acknowledged), while its connection's buffers
	// are within half of MaxConnBufferedBytes, the window grows towards
	// BackendMaxStreamWindow; the growth of all the streams of one client
	// connection together is at most a quarter of MaxConnBufferedBytes
	// (see transport.growLocked).
	// So a fast client's streams run with large windows (few
	// WINDOW_UPDATEs, large batches: a fixed window of 64 KiB cost 29%
	// more CPU per MiB than one of 128 KiB, see BENCHMARKS.md), and a
	// client that never reads holds 16 KiB per stream. The connection
	// window is credited on receipt, so a stream held back never holds
	// back the other streams of its backend connection. At least 256;
	// zero means DefaultBackendStreamWindow (16 KiB).
	BackendStreamWindow int32

	// BackendMaxStreamWindow is what a backend stream's window may grow
	// to while its client drains the answer (see BackendStreamWindow).
	// At least BackendStreamWindow, at most 2^31-1; zero means
	// DefaultBackendMaxStreamWindow (512 KiB).
	BackendMaxStreamWindow int32

	// ConnWindow is the connection-level window granted to each peer.
	ConnWindow int32

	// MaxConnBufferedBytes is the one budget of the buffers a client
	// connection may hold in the proxy, counted by their capacity, not by
	// the bytes in them (a 1-byte DATA payload in a 1 KiB buffer counts
	// 1 KiB; see budget.go): request DATA queued toward backends, the
	// copies kept so calls can be retried, response DATA queued toward
	// the client, the request header blocks kept for retries and the
	// backends' response header and trailer blocks queued toward the
	// client (both by their RFC 9113 §6.5.2 size). Past it:
	//   - the connection-level WINDOW_UPDATE is withheld, so the client
	//     stops sending DATA, until the count is back to half (at most
	//     ConnWindow more arrives meanwhile), as Envoy's per-connection
	//     buffer limit stops reading from the client;
	//   - new streams are answered RESOURCE_EXHAUSTED: HEADERS are not
	//     flow-controlled, so this is what bounds retained headers;
	//   - a response header block that would take the count past it is
	//     not queued, and its call ends RESOURCE_EXHAUSTED instead;
	//   - retries keep no more replay once half of it is used: such a
	//     call loses its retryability, not its bytes, as Envoy lets a
	//     request that outgrew its retry buffer go on unretried. The half
	//     left is what queued DATA needs to drain, so the withheld window
	//     always comes back once the backends take the queued bytes.
	// The response direction is bounded by the windows granted to
	// backends: streams × BackendStreamWindow, plus at most a quarter of
	// this budget of window growth (see BackendStreamWindow), and those
	// windows, growth included, never add up to more than it; the
	// response buffers count in the budget too, and new streams are
	// refused (RESOURCE_EXHAUSTED) once the windows of the open ones
	// would exceed it: 1,024 streams of 16 KiB with the defaults.
	// Zero means DefaultMaxConnBufferedBytes (16 MiB: 64 streams' worth
	// of StreamWindow), negative no bound.
	// RetryBufferSize still bounds each attempt's replay.
	MaxConnBufferedBytes int64

	// MaxHeaderListSize bounds the decoded size (RFC 9113 §6.5.2: names,
	// values and 32 bytes per field) of a client's request header block,
	// and is advertised to clients as SETTINGS_MAX_HEADER_LIST_SIZE. Zero
	// means DefaultMaxHeaderListSize, 60 KiB, Envoy's default
	// (max_request_headers_kb): gRPC metadata is small, and every open
	// stream keeps its request headers for retries, so this times
	// MaxConcurrentStreams is what one connection could make the proxy
	// hold without MaxConnBufferedBytes.
	MaxHeaderListSize uint32

	// MaxResponseHeaderListSize bounds the decoded size of a backend's
	// response header and trailer blocks, and is advertised to backends
	// as SETTINGS_MAX_HEADER_LIST_SIZE. Backends are trusted more than
	// clients and their trailers carry grpc-status-details-bin, the
	// serialized google.rpc.Status with its error details, so the limit is
	// larger: zero means DefaultMaxResponseHeaderListSize, 1 MiB. grpc-go's
	// client accepts 16 MiB, but a response block is decoded into memory
	// before it is relayed, and 1 MiB is already far beyond any status a
	// service sends on purpose. A response block over it ends the call
	// with INTERNAL.
	//
	// Both directions also respect the peer's own advertised
	// SETTINGS_MAX_HEADER_LIST_SIZE when sending: a response header or
	// trailer block over the client's limit is replaced by a gRPC status
	// INTERNAL, as grpc-go's server fails such a call, and a request over
	// a backend's limit ends with RESOURCE_EXHAUSTED without being sent.
	MaxResponseHeaderListSize uint32

	// MaxHeaderFields bounds the fields of a client's request header block
	// (Envoy's default is 100 too); a request over it, or over
	// MaxHeaderListSize, is answered RESOURCE_EXHAUSTED (HTTP 431) on its
	// own stream, and request trailers over it reset the stream. Zero
	// means DefaultMaxHeaderFields.
	MaxHeaderFields int

	// BackendStreamsPerConn caps the streams opened on one backend
	// connection; the backend's own SETTINGS_MAX_CONCURRENT_STREAMS applies
	// when lower. When every connection to a backend is full another one is
	// opened, up to MaxBackendConns.
	BackendStreamsPerConn uint32

	// MaxBackendConns caps the connections open to any one backend
	// address that take new streams: a connection going away (the
	// backend's GOAWAY, a drain) carries its streams to their end outside
	// the cap, so that long streams left on connections a backend cycles
	// (grpc-go's MaxConnectionAge) do not take the cap's places (all
	// together, going away or not, are bounded at 16 times the cap); a call
	// that waits for a slot (below) still counts them, and waits rather
	// than dial a backend that may be shutting down. Another connection is opened only
	// when every one is full (BackendStreamsPerConn or the backend's
	// SETTINGS_MAX_CONCURRENT_STREAMS reached); at the cap a call goes to
	// another backend as a transparent retry (it never reached this one),
	// and when none can take it, it is picked once more, the backends it
	// tried included, and waits for a slot on that backend
	// (MaxBackendPending); when that backend's queue is full, or its
	// connections are going away, it is picked again among the others,
	// and fails at once with UNAVAILABLE when none has room in its queue.
	// A call waiting on a backend that leaves the set (RetainBackends)
	// goes to another as a transparent retry. A client connection that
	// withholds its window for its buffer budget fails its waiting calls
	// that hold request data, the last come first, with
	// RESOURCE_EXHAUSTED: no backend reads that data, and the calls
	// running could not finish. Such an overflow is not the backend's
	// failure: the Picker's done sees CANCELLED, which counts neither for
	// nor against it. Zero means DefaultMaxBackendConns, negative no cap.
	MaxBackendConns int

	// MaxBackendPending caps the calls waiting for a stream slot on one
	// backend whose connections are all full at MaxBackendConns (HAProxy's
	// server queue, Envoy's pending requests): they wait in order, on the
	// connection with the fewest waiting, and each takes the next slot a
	// finished stream gives back there, before any new call; a slot that
	// comes free on a connection with none waiting is offered to the
	// calls waiting on the others (they are moved and picked again). A
	// call that
	// does not get one within BackendPendingTimeout fails with
	// UNAVAILABLE, not retried (the backends were full), as does a call
	// that finds the queues full; its deadline, route timeout and the
	// client's cancel end the wait too. Calls that took a slot a
	// connection's backend then has no room for (reserved on the assumed
	// limit before its first SETTINGS, or before it lowered
	// SETTINGS_MAX_CONCURRENT_STREAMS) are picked again, uncounted, as
	// if picked then: another connection takes them if the pool may open
	// one, else they wait the same way, within this cap. Zero means
	// DefaultMaxBackendPending, negative none wait (those calls then go
	// to another backend, or fail UNAVAILABLE).
	MaxBackendPending int
	// BackendPendingTimeout bounds that wait. Zero or negative means
	// DefaultBackendPendingTimeout.
	BackendPendingTimeout time.Duration

	// BackendIdleTimeout closes a backend connection that carried no
	// stream for that long (checked every quarter of it, so it may live
	// up to a quarter longer): GOAWAY, then close, and the pool forgets
	// it; the next call opens a new one. Zero means
	// DefaultBackendIdleTimeout, negative never.
	BackendIdleTimeout time.Duration

	// BackendKeepaliveTime and BackendKeepaliveTimeout find half-open
	// backend connections, as grpc-go's client keepalive does: a
	// connection with streams in flight on which nothing was read for
	// BackendKeepaliveTime sends a PING, and if still nothing is read
	// within BackendKeepaliveTimeout it is closed, its calls failing with
	// UNAVAILABLE (a failure of the backend, for ejection). Idle
	// connections are not pinged (grpc-go servers refuse that by default,
	// PermitWithoutStream); BackendIdleTimeout closes them. A grpc-go
	// backend whose keepalive.EnforcementPolicy.MinTime is above
	// BackendKeepaliveTime closes the connection with "too_many_pings" when
	// it sends nothing between PINGs: keep BackendKeepaliveTime at or above
	// the backends' MinTime (grpc-go's default, 5 min, is the default
	// here). Zero means the defaults, a negative BackendKeepaliveTime no
	// PINGs.
	BackendKeepaliveTime    time.Duration
	BackendKeepaliveTimeout time.Duration

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

	// ParkAfter is how long a client connection must go without a stream
	// and without a frame from the client before its reader goroutine is
	// let go (on Linux, for plain TCP and TLS connections): the socket
	// waits in the server's epoll set, and a new reader starts when the
	// client sends something or hangs up. An idle connection then costs
	// no goroutine stack. The check runs on the server's housekeeper, so
	// a connection parks between ParkAfter and about twice that after it
	// went quiet. Zero means DefaultParkAfter, negative never.
	ParkAfter time.Duration

	// RequestIdleTimeout bounds how long a client stream whose request is
	// not complete (no END_STREAM yet) may go with no DATA from the client
	// and no response frame toward it, while the proxy holds none of its
	// request bytes for the backend (one that stopped reading, or a slot
	// the call waits for, holds the client by its window, and the stream
	// is not idle then): past it the call ends with
	// DEADLINE_EXCEEDED, the stream is reset (NO_ERROR) and the backend
	// stream cancelled, so a client cannot hold streams (and the backend's
	// handlers) by never finishing its requests. Checked on a sweep every
	// quarter of it, so a stream may live up to a quarter longer. Calls
	// whose request is complete are bounded by their grpc-timeout only.
	// Zero means DefaultRequestIdleTimeout, negative none.
	RequestIdleTimeout time.Duration

	// PingAckDelay is how long the answer to a peer's PING may wait for
	// other frames to that peer before it is written on its own. grpc-go
	// clients and servers send a PING (their BDP estimator's) after most
	// DATA they receive; answered at once, each answer was a write of its
	// own, on a loopback about as costly as the call's own writes. Held
	// back, it goes out with the next frames written to the peer, which at
	// a moderate rate come within a millisecond or two. The wait adds to
	// the peer's round-trip measurement, so it is kept short: 10 ms by
	// default. It was 5 ms; an answer rarely waits that long at any rate
	// (0.3% of them at 2,000 calls/s), but the timer each PING arms is the
	// process's next one, and Go's sysmon thread and the idle scheduler's
	// blocking poll sleep only until it, stopped or not: at 2,000 calls/s
	// the proxy's CPU per call fell about 10% and at full speed 5% with 10
	// ms (BENCHMARKS.md, "Session 21"). 0 means DefaultPingAckDelay,
	// negative answers at once.
	PingAckDelay time.Duration
	// WriteTimeout bounds every write to a client or backend connection:
	// a peer that does not read for that long while the proxy has bytes
	// for it loses the connection, and the calls on it fail. The
	// deadline moves at most every sixteenth of WriteTimeout, so a write
	// that stalls fails between fifteen sixteenths of it and all of it
	// after it began. Zero means DefaultWriteTimeout, negative no bound.
	WriteTimeout time.Duration

	// ShutdownPingTimeout bounds the first step of a client connection's
	// graceful shutdown (Server.Shutdown, IdleTimeout): after GOAWAY with
	// stream id 2^31-1 and a PING, the proxy waits for the PING's ack, or
	// this long, before it sends GOAWAY with the real last stream id;
	// streams the client opened in between are served (RFC 9113 §6.8).
	// Zero means DefaultShutdownPingTimeout.
	ShutdownPingTimeout time.Duration

	// ShutdownLinger is how long a drained client connection, or one
	// ended by a connection error, its final GOAWAY written, waits for
	// the client to close before the proxy closes it, so the GOAWAY is
	// not lost to a TCP reset. Zero means DefaultShutdownLinger,
	// negative none.
	ShutdownLinger time.Duration

	// DrainTimeout bounds how long connections to a backend that left the
	// set (see Server.RetainBackends) may keep serving the streams they
	// carry; after it they are closed and those streams fail with
	// UNAVAILABLE, in a message that names the backend, its departure and
	// the timeout. It does not bound the calls of a retired Upstream (see
	// Server.DrainUpstream). Zero means DefaultDrainTimeout.
	DrainTimeout time.Duration

	// MaxConnections caps the client connections served at once; a
	// connection accepted over it is closed at once (and counted, and
	// logged at Debug at most once a second). Zero means
	// DefaultMaxConnections, negative no cap.
	MaxConnections int

	// MaxEarlyResets bounds the streams a client connection may reset
	// before their response ended and within a second of opening them,
	// per 10 s window, once they are more than half of the streams it
	// opened in the window; past it the connection ends with
	// GOAWAY(ENHANCE_YOUR_CALM). This is the defence against rapid reset
	// (CVE-2023-44487). Zero means DefaultMaxEarlyResets, negative no
	// limit.
	MaxEarlyResets int

	// NoLoopHeader turns the forwarding-loop guard off: requests go to
	// the backends without the loopHeader field (streamlb-via) this
	// proxy adds to some of them (loopMark), and one that arrives
	// carrying this proxy's token is not refused (it cannot carry it).
	// For backends known not to be proxies. A loop is then bounded only
	// by the limits (MaxBackendConns and the backends' stream limits,
	// MaxStreams).
	NoLoopHeader bool

	// MaxGlitches is the points a client connection may spend per 10 s
	// window on frames that do no work (empty DATA, PINGs with nothing sent
	// in between, SETTINGS, frames on closed streams beyond 4 per stream
	// opened in the window, PRIORITY and unknown-type frames beyond 100 plus
	// 100 per stream opened, stream errors), one point each; past it the connection ends with
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
	// capacity of the buffers kept, not by the bytes in them; the kept
	// bytes are packed into full buffers (transport.retainLocked), so a
	// request of up to RetryBufferSize less 16 KiB is always kept. Zero
	// means DefaultRetryBufferSize, negative disables retries.
	RetryBufferSize int

	// ResponseHoldback is the largest gRPC response message (its length
	// prefix, in bytes) whose first part is held back until the rest
	// arrives, so that a backend failing in the middle of it gives the
	// client the complete messages before it and a clean status, not a
	// torn message (see holdback.go). A larger message goes on as it
	// arrives. Zero means DefaultResponseHoldback (128 KiB: a message of
	// a 64 KiB payload, a common chunk size, is a few bytes over 64 KiB
	// encoded, or less when BackendMaxStreamWindow is under 4/3 of that),
	// negative off. It needs a BackendMaxStreamWindow of at least 4/3 of it
	// plus the prefix (holdTarget): a held message must be able to arrive
	// whole.
	ResponseHoldback int

	// MaxRetries is how many more attempts a call may make: zero means
	// DefaultMaxRetries, negative none.
	MaxRetries int

	// RetryBudget and RetryBudgetRatio are gRFC A6 retry throttling for
	// the RetryOn methods: a token bucket of RetryBudget tokens; every
	// failed call takes one, every successful call gives back
	// RetryBudgetRatio (only backends' answers count, OK and UNAVAILABLE,
	// and a backend unreachable before its headers as a failure; see
	// stream.budgetOutcome), and UNAVAILABLE answers are retried only while more
	// than half the tokens are left, so a fleet-wide failure does not
	// multiply the load. Zero means DefaultRetryBudget and
	// DefaultRetryBudgetRatio; a negative RetryBudget is a bucket of no
	// tokens: no UNAVAILABLE answer is retried (as retry_on: [] says, but
	// for every cluster a file's retry_budget: 0 applies to). Transparent
	// retries (the call never reached a backend) do not use the budget.
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

	// CountCallEnd, if set, is called once per client stream after it
	// ended, with the same CallInfo as OnCallEnd, but at once, on the
	// goroutine that ended the stream and possibly under the proxy's
	// locks. It must return quickly, never block and never call back into
	// the Server: it is for counters (metrics), which need no goroutine
	// hand-off per call the way OnCallEnd's delivery does. Nil costs
	// nothing per call.
	CountCallEnd func(CallInfo)

	// CountConnectFailure, if set, is called once for every backend
	// connection that could not be opened, as Envoy counts
	// upstream_cx_connect_fail: the dial failed (refused, ConnectTimeout
	// passed, or, with a Dial that does TLS, its handshake failed), or the
	// backend did not complete the HTTP/2 handshake: it closed or reset
	// the connection, broke the protocol, or sent no SETTINGS within
	// HandshakeTimeout (RFC 9113 §3.4: its SETTINGS come first). Since
	// streams are opened only after those SETTINGS, no call was sent on
	// such a connection (UpstreamPick.Sent), so nothing else counts it
	// per backend. A connection that completed its handshake and failed
	// later is not counted, nor one the proxy closed itself before the
	// handshake (Shutdown, Close, a drained backend or Upstream).
	//
	// upstream names the Upstream the connection was dialed for, as
	// CallInfo.Upstream does ("" for the Server's own), backend is its
	// address and err why it failed. It is called on the connection's own
	// goroutine, off the calls' path and under no lock of the proxy's,
	// before the calls that waited for the connection go elsewhere or
	// fail: it must return quickly and never block, since they wait for
	// it. Nil costs nothing.
	CountConnectFailure func(upstream, backend string, err error)
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
	if c.BackendStreamWindow == 0 {
		c.BackendStreamWindow = DefaultBackendStreamWindow
	}
	if c.BackendStreamWindow < minBackendWindow {
		return fmt.Errorf("proxy: BackendStreamWindow %d is below %d", c.BackendStreamWindow, minBackendWindow)
	}
	if c.BackendMaxStreamWindow == 0 {
		c.BackendMaxStreamWindow = max(DefaultBackendMaxStreamWindow, c.BackendStreamWindow)
	}
	if c.BackendMaxStreamWindow < c.BackendStreamWindow {
		return fmt.Errorf("proxy: BackendMaxStreamWindow %d is below BackendStreamWindow %d", c.BackendMaxStreamWindow, c.BackendStreamWindow)
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
	if c.MaxResponseHeaderListSize == 0 {
		c.MaxResponseHeaderListSize = DefaultMaxResponseHeaderListSize
	}
	if c.MaxHeaderFields <= 0 {
		c.MaxHeaderFields = DefaultMaxHeaderFields
	}
	if c.BackendStreamsPerConn == 0 {
		c.BackendStreamsPerConn = DefaultBackendStreamsPerConn
	}
	defaultOrOff(&c.MaxBackendConns, DefaultMaxBackendConns)
	defaultOrOff(&c.MaxBackendPending, DefaultMaxBackendPending)
	if c.BackendPendingTimeout <= 0 {
		c.BackendPendingTimeout = DefaultBackendPendingTimeout
	}
	defaultOrOff(&c.BackendIdleTimeout, DefaultBackendIdleTimeout)
	defaultOrOff(&c.BackendKeepaliveTime, DefaultBackendKeepaliveTime)
	for _, d := range []struct {
		name string
		v    time.Duration
	}{
		{"BackendIdleTimeout", c.BackendIdleTimeout},
		{"BackendKeepaliveTime", c.BackendKeepaliveTime},
		{"IdleTimeout", c.IdleTimeout},
		{"RequestIdleTimeout", c.RequestIdleTimeout},
	} {
		// Checked a quarter of it apart (the idle timeouts) or as often
		// as it (keepalive): under 4ns the backend idle sweep's ticker
		// panicked, the client ones were never checked, and a few ns
		// made a timer that never let the CPU rest.
		if d.v > 0 && d.v < MinTimerSetting {
			return fmt.Errorf("proxy: %s %v under the minimum %v", d.name, d.v, MinTimerSetting)
		}
	}
	if c.BackendKeepaliveTimeout <= 0 {
		c.BackendKeepaliveTimeout = DefaultBackendKeepaliveTimeout
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
	defaultOrOff(&c.ParkAfter, DefaultParkAfter)
	defaultOrOff(&c.WriteTimeout, DefaultWriteTimeout)
	defaultOrOff(&c.PingAckDelay, DefaultPingAckDelay)
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
	if c.ResponseHoldback == 0 {
		// The default, within what the window cap lets arrive whole.
		c.ResponseHoldback = min(DefaultResponseHoldback, holdFits(c.BackendMaxStreamWindow))
	}
	defaultOrOff(&c.ResponseHoldback, 0)
	if c.ResponseHoldback > math.MaxInt32 {
		// Past any window (int32), and holdTarget would overflow.
		return fmt.Errorf("proxy: ResponseHoldback %d needs a BackendMaxStreamWindow of at least 4/3 of it, over the largest window (%d)", c.ResponseHoldback, math.MaxInt32)
	}
	if n := holdTarget(int64(c.ResponseHoldback) + 5); c.ResponseHoldback > 0 && n > int64(c.BackendMaxStreamWindow) {
		return fmt.Errorf("proxy: ResponseHoldback %d needs a BackendMaxStreamWindow of at least %d, not %d", c.ResponseHoldback, n, c.BackendMaxStreamWindow)
	}
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
	if c.RetryBudgetRatio < 0 {
		return errors.New("proxy: RetryBudgetRatio must not be negative")
	}
	switch {
	case c.RetryBudget == 0:
		c.RetryBudget = DefaultRetryBudget
	case c.RetryBudget < 0:
		c.RetryBudget = -1 // none; NewUpstream's bucket of no tokens
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
