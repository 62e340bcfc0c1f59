package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	grpcproxy "github.com/mwitkow/grpc-proxy/proxy"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// ReferenceConfig configures the message-level reference engine.
//
// What one client connection makes it hold: grpc-go's server buffers what
// a client sends on a stream until the stream's handler reads it, up to
// the stream's flow-control window, and the handler holds the message it
// is sending on to the backend. grpc-go grows each stream's window by BDP
// estimation up to 16 MiB, so a client uploading to a backend that did
// not read made one connection hold 16 streams x about 2.5 MiB (at least
// 39 MiB seen, TestAtk26UploadToBackendNotReading). The engine's server
// has fixed windows instead, those the frame engine grants clients:
// DefaultStreamWindow (256 KiB) per stream and DefaultConnWindow (4 MiB)
// per connection, which turns BDP estimation off. (grpc-go sends the
// connection's WINDOW_UPDATE as data arrives, not as it is read, so the
// stream window is the bound.) One connection can then make it hold
// about MaxConcurrentStreams x (256 KiB + MaxMessageSize x 3): the
// window, and the message being relayed (decoded and re-encoded), plus
// the backend connection's 64 KiB write quota per stream. That is a
// bound, not a small one: 1,024 streams x (256 KiB + 12 MiB) with the
// defaults; MaxConcurrentStreams and MaxMessageSize are what lower it.
// The frame engine bounds a connection by one budget instead
// (Config.MaxConnBufferedBytes). The fixed windows cost uploads on fast
// links what BDP would have gained (16 x 64 KiB client streams on
// loopback: 367-447 MB/s before, 279-391 MB/s after, noisy); responses
// flow on the client's window and do not change.
type ReferenceConfig struct {
	// Picker chooses the backend of every stream. Required.
	Picker Picker
	// DrainTimeout is how long the client connection of a backend that
	// left the set (see RetainBackends) stays open for calls in flight.
	// Zero means DefaultDrainTimeout.
	DrainTimeout time.Duration
	// NoLoopHeader is Config.NoLoopHeader.
	NoLoopHeader bool
	// Logger receives the engine's logs. Nil means slog.Default().
	Logger *slog.Logger
	// Credentials secure the connections to backends. Nil means
	// cleartext (h2c).
	Credentials credentials.TransportCredentials
	// OnCallEnd, if set, is called once per call when it ended, on a
	// goroutine of its own, as Config.OnCallEnd is: an access log that
	// writes must not hold up the call (it was called on the call's own
	// goroutine, before grpc-go sent the status, so a log whose writes
	// blocked held every call at its end). CountCallEnd, if set, is
	// called on the call's own goroutine, under no lock, before the
	// status is sent: for counters only. This engine fills in
	// Method, Backend, Attempts, Code, Message, ProxyStatus (for the
	// statuses it makes itself; those grpc-go's client makes for a lost
	// backend pass as the backend's), Limit (of a PickLimitError),
	// Upstream (an UpstreamPicker's, or a PickLimitError's), Start,
	// Duration and Client: it does not see the bytes relayed.
	OnCallEnd    func(CallInfo)
	CountCallEnd func(CallInfo)
	// MaxConnections, MaxConcurrentStreams and MaxHeaderListSize are
	// Config's limits of the same names, with the same defaults: client
	// connections served at once (over it a connection is closed as soon
	// as accepted; negative: no cap), streams per client connection
	// (SETTINGS_MAX_CONCURRENT_STREAMS) and a request's header list size
	// (SETTINGS_MAX_HEADER_LIST_SIZE). Without them grpc-go's server
	// serves any number of connections and streams, each stream with its
	// pump goroutines, and header lists of 16 MiB.
	MaxConnections       int
	MaxConcurrentStreams uint32
	MaxHeaderListSize    uint32
	// MaxMessageSize bounds a gRPC message, request or response: this
	// engine decodes each whole and re-encodes it, holding about three
	// times its size, so without a bound a client or backend made it
	// hold up to 2 GiB per message. A larger message fails the call
	// RESOURCE_EXHAUSTED (grpc-go's MaxRecvMsgSize). Zero means
	// DefaultReferenceMaxMessageSize, negative no bound.
	MaxMessageSize int
	// PrefaceTimeout and IdleTimeout are Config's of the same names, with
	// the same defaults: a new connection must send its preface within
	// the first (grpc-go's server waited 120 s), and one without a stream
	// for the second is shut down (grpc-go's: never), so that silent or
	// idle connections do not hold MaxConnections' places.
	PrefaceTimeout time.Duration
	IdleTimeout    time.Duration
	// MaxResponseHeaderListSize is Config's: the size of a backend's
	// response header or trailer list, advertised to backends (grpc-go's
	// client took 16 MiB). Zero means DefaultMaxResponseHeaderListSize.
	MaxResponseHeaderListSize uint32
	// CountConnectFailure is Config's, for this engine's backend
	// connections: called once for every connection to a backend that
	// could not be opened, its dial refused or timed out, or its TLS
	// handshake failed (with Credentials), with upstream "" (a connection
	// here serves every cluster with that backend). grpc-go's client does
	// the HTTP/2 handshake out of sight, so a backend that accepts and
	// never speaks HTTP/2 is not counted by this engine. While a backend
	// is down grpc-go dials it again with backoff, and every attempt that
	// fails counts, as Envoy's upstream_cx_connect_fail counts each; one
	// the engine cancels itself (a drained backend, Shutdown) does not.
	// It is called on grpc-go's connecting goroutine and must not block.
	// Nil costs nothing.
	CountConnectFailure func(upstream, backend string, err error)
}

// DefaultReferenceMaxMessageSize is ReferenceConfig.MaxMessageSize's
// default: grpc-go's own receive limit.
const DefaultReferenceMaxMessageSize = 4 << 20

// Reference is the message-level engine: mwitkow/grpc-proxy's transparent
// handler on a grpc-go server, with a goroutine pair per stream and a
// grpc-go client connection per backend. It decodes each message into an
// empty protobuf (keeping the bytes as unknown fields) and re-encodes it.
// It serves as the baseline the frame engine is tested and measured
// against.
type Reference struct {
	picker Picker
	log    *slog.Logger
	srv    *grpc.Server
	drain  time.Duration
	creds  credentials.TransportCredentials
	fails  func(upstream, backend string, err error) // CountConnectFailure
	ends   *endQueue                                 // OnCallEnd's; nil without one
	count  func(CallInfo)                            // CountCallEnd
	hopID  string                                    // names this proxy in loopHeader

	maxConns int    // 0: no cap
	maxMsg   int    // largest message received, either way
	maxResp  uint32 // advertised to backends as SETTINGS_MAX_HEADER_LIST_SIZE

	// cut ends when Shutdown's drain ran out: every call's context
	// derives from it (intercept), so the calls still running end and
	// are answered with a status before the server stops.
	cut      context.Context
	cutAll   context.CancelFunc
	refusals refusalLog

	mu sync.Mutex
	// mu guards the fields below.
	conns    map[string]*refConn
	draining map[*refConn]*time.Timer // connections of removed backends, closed when their timer fires
	retired  map[*refConn]bool        // connections out of use, closed after their last call: RetireBackends', and those of backends back in the set (RetainBackends)
}

type doneKey struct{}

// doneHolder carries the Picker's done function from the director, which
// runs inside the handler, back to the interceptor that sees the outcome.
type doneHolder struct {
	done func(error)
	addr string
	cc   *refConn
	// proxyErr is the status direct failed the call with, the proxy's
	// own; pickErr the Picker's error behind it, if that was the cause.
	proxyErr error
	pickErr  error
	upstream string // the Upstream an UpstreamPicker named
	// routeTimeout is the pick's UpstreamPick.Timeout when it bounds the
	// backend call before the client's deadline would, routeDeadline when
	// it passes, and cancel releases that backend context's timer.
	routeTimeout  time.Duration
	routeDeadline time.Time
	cancel        context.CancelFunc
}

// refConn is the client connection to one backend, with why the engine
// closed it under the calls still on it (RetainBackends), nil until then.
type refConn struct {
	*grpc.ClientConn
	addr string // the backend's
	cut  atomic.Pointer[error]
	// calls counts the calls that took the connection (conn) and have not
	// ended (release): a retired connection closes when it is back to 0.
	// Guarded by Reference.mu.
	calls int
}

// NewStream is the ClientConn's, with the stream's Trailer guarded
// (trailerGuard): grpc-proxy's handler opens the backend stream with it.
func (c *refConn) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	cs, err := c.ClientConn.NewStream(ctx, desc, method, opts...)
	if err != nil {
		return nil, err
	}
	return &trailerGuard{ClientStream: cs}, nil
}

// trailerGuard answers Trailer with nil until RecvMsg has returned an
// error. grpc-proxy's handler reads the backend stream's trailers when
// its relay toward the client ended, which is also when sending to the
// client failed (the client's deadline passed, or it went away) while
// the backend stream still runs; grpc-go allows Trailer only once
// RecvMsg returned an error, and its transport wrote the trailers
// meanwhile (a data race the race detector reported). Those trailers
// are of no use then: the client's call has already failed.
type trailerGuard struct {
	grpc.ClientStream
	recvDone atomic.Bool
}

func (g *trailerGuard) RecvMsg(m any) error {
	err := g.ClientStream.RecvMsg(m)
	if err != nil {
		g.recvDone.Store(true)
	}
	return err
}

func (g *trailerGuard) Trailer() metadata.MD {
	if !g.recvDone.Load() {
		return nil
	}
	return g.ClientStream.Trailer()
}

// NewReference builds the reference engine. It starts nothing.
func NewReference(cfg ReferenceConfig) (*Reference, error) {
	if cfg.Picker == nil {
		return nil, errors.New("proxy: ReferenceConfig.Picker is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.DrainTimeout <= 0 {
		cfg.DrainTimeout = DefaultDrainTimeout
	}
	if cfg.Credentials == nil {
		cfg.Credentials = insecure.NewCredentials()
	}
	defaultOrOff(&cfg.MaxConnections, DefaultMaxConnections)
	defaultOrOff(&cfg.MaxMessageSize, DefaultReferenceMaxMessageSize)
	defaultOrOff(&cfg.IdleTimeout, DefaultIdleTimeout)
	if cfg.PrefaceTimeout <= 0 {
		cfg.PrefaceTimeout = DefaultPrefaceTimeout
	}
	if cfg.MaxMessageSize == 0 {
		cfg.MaxMessageSize = math.MaxInt32
	}
	if cfg.MaxConcurrentStreams == 0 {
		cfg.MaxConcurrentStreams = DefaultMaxConcurrentStreams
	}
	if cfg.MaxHeaderListSize == 0 {
		cfg.MaxHeaderListSize = DefaultMaxHeaderListSize
	}
	if cfg.MaxResponseHeaderListSize == 0 {
		cfg.MaxResponseHeaderListSize = DefaultMaxResponseHeaderListSize
	}
	cut, cutAll := context.WithCancel(context.Background())
	r := &Reference{
		creds:    cfg.Credentials,
		fails:    cfg.CountConnectFailure,
		count:    cfg.CountCallEnd,
		hopID:    hopIDUnless(cfg.NoLoopHeader),
		cut:      cut,
		cutAll:   cutAll,
		picker:   cfg.Picker,
		log:      cfg.Logger.With("component", "proxy", "engine", "grpc-proxy"),
		drain:    cfg.DrainTimeout,
		maxConns: cfg.MaxConnections,
		maxMsg:   cfg.MaxMessageSize,
		maxResp:  cfg.MaxResponseHeaderListSize,
		conns:    make(map[string]*refConn),
		draining: make(map[*refConn]*time.Timer),
		retired:  make(map[*refConn]bool),
	}
	if cfg.OnCallEnd != nil {
		r.ends = newEndQueue(cfg.OnCallEnd)
	}
	r.srv = grpc.NewServer(
		grpc.UnknownServiceHandler(grpcproxy.TransparentHandler(r.direct)),
		grpc.StreamInterceptor(r.intercept),
		grpc.MaxRecvMsgSize(cfg.MaxMessageSize),
		grpc.MaxSendMsgSize(math.MaxInt32),
		grpc.MaxConcurrentStreams(cfg.MaxConcurrentStreams),
		grpc.MaxHeaderListSize(cfg.MaxHeaderListSize),
		// Fixed windows (grpc-go's BDP estimation off): see
		// ReferenceConfig's "What one client connection makes it hold".
		grpc.StaticStreamWindowSize(DefaultStreamWindow),
		grpc.StaticConnWindowSize(DefaultConnWindow),
		grpc.ConnectionTimeout(cfg.PrefaceTimeout),
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: cfg.IdleTimeout}), // 0: never
	)
	return r, nil
}

// intercept reports each stream's outcome to the Picker's done.
func (r *Reference) intercept(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	var start time.Time
	if r.reportsEnds() {
		start = time.Now()
	}
	h := &doneHolder{}
	ctx, cancel := context.WithCancel(ss.Context())
	defer cancel()
	defer context.AfterFunc(r.cut, cancel)()
	hs := &holderStream{ServerStream: ss, ctx: context.WithValue(ctx, doneKey{}, h), count: r.reportsEnds()}
	err := handler(srv, hs)
	if h.cancel != nil {
		h.cancel()
	}
	if h.cc != nil {
		r.release(h.cc)
	}
	// proxyStatus: the proxy made err (CallInfo.ProxyStatus).
	proxyStatus := err != nil && err == h.proxyErr
	if err != nil && h.routeTimeout > 0 && ss.Context().Err() == nil && time.Until(h.routeDeadline) < deadlineSlack {
		// The backend call's context ran out at the route's timeout
		// (grpc-go's client: DEADLINE_EXCEEDED, "context deadline
		// exceeded"), or the backend, sent what was left of it as its
		// grpc-timeout, reset the stream a moment before (CANCEL): say
		// which deadline it was, as the frame engine does.
		if c := status.Code(err); c == codes.DeadlineExceeded || c == codes.Canceled {
			err, proxyStatus = failure{kind: failRouteTimeout, method: info.FullMethod, limit: int64(h.routeTimeout)}.statusErr(), true
		}
	}
	if err != nil && r.cut.Err() != nil && ss.Context().Err() == nil {
		err, proxyStatus = failure{kind: failShuttingDown}.statusErr(), true
	}
	if err != nil && ss.Context().Err() != nil {
		// The client reset the call or its deadline passed: it gets no
		// status from us, and grpc-proxy's pump reports the failed read
		// of its stream as INTERNAL ("failed proxying s2c"), which would
		// count and log a proxy fault. Say what happened, as the frame
		// engine does.
		err, proxyStatus = clientEnded(ss.Context()), true
	}
	if err != nil && h.cc != nil && status.Code(err) == codes.Canceled && ss.Context().Err() == nil {
		// grpc-go ends the calls on a ClientConn we closed with CANCELED
		// ("the client connection is closing"), which would tell the
		// client it gave up itself: say what the frame engine says.
		if why := h.cc.cut.Load(); why != nil {
			err, proxyStatus = failure{kind: failConnLost, backend: h.addr, cause: *why}.statusErr(), true
		}
	}
	if h.done != nil {
		h.done(err)
	}
	if r.reportsEnds() {
		st, _ := status.FromError(err)
		ci := CallInfo{Method: info.FullMethod, Backend: h.addr, Code: st.Code(), Message: st.Message(), Start: start, Duration: time.Since(start),
			ProxyStatus: proxyStatus, RequestBytes: hs.in.Load(), ResponseBytes: hs.out.Load()}
		if h.addr != "" {
			ci.Attempts = 1
		}
		ci.Upstream = h.upstream
		var le *PickLimitError
		if errors.As(h.pickErr, &le) {
			ci.Limit, ci.Upstream = le.Limit, le.Upstream
		}
		if p, ok := peer.FromContext(ss.Context()); ok {
			ci.Client = p.Addr
		}
		if r.count != nil {
			r.count(ci)
		}
		if r.ends != nil {
			r.ends.push(ci)
		}
	}
	return err
}

// reportsEnds reports whether ended calls are described to a hook.
func (r *Reference) reportsEnds() bool { return r.ends != nil || r.count != nil }

// clientEnded is the status of a call whose client side ended, ctx being
// the server stream's context: DEADLINE_EXCEEDED if its grpc-timeout
// passed, also when the client's reset came first (a gRPC client resets
// with CANCEL as its deadline passes, a moment before the server's timer,
// which started on the request's arrival), else CANCELLED.
func clientEnded(ctx context.Context) error {
	err := ctx.Err()
	if d, ok := ctx.Deadline(); ok && errors.Is(err, context.Canceled) && time.Until(d) < deadlineSlack {
		err = context.DeadlineExceeded
	}
	return status.FromContextError(err).Err()
}

type holderStream struct {
	grpc.ServerStream
	ctx context.Context
	// count: in and out add up the messages received from the client and
	// sent to it, as the frame engine counts DATA payload (CallInfo): each
	// message's bytes and its 5-byte gRPC prefix. grpc-proxy's handler
	// carries a message's bytes as the unknown fields of an emptypb.Empty
	// (proto.Size), and receives and sends on goroutines of their own.
	count   bool
	in, out atomic.Int64
}

func (s *holderStream) Context() context.Context { return s.ctx }

// grpcPrefix is the length prefix of a gRPC message on the wire.
const grpcPrefix = 5

func (s *holderStream) RecvMsg(m any) error {
	err := s.ServerStream.RecvMsg(m)
	if err == nil && s.count {
		if pm, ok := m.(proto.Message); ok {
			s.in.Add(int64(proto.Size(pm)) + grpcPrefix)
		}
	}
	return err
}

func (s *holderStream) SendMsg(m any) error {
	err := s.ServerStream.SendMsg(m)
	if err == nil && s.count {
		if pm, ok := m.(proto.Message); ok {
			s.out.Add(int64(proto.Size(pm)) + grpcPrefix)
		}
	}
	return err
}

// direct is the grpc-proxy StreamDirector: pick, then forward metadata on
// a client connection to the backend.
func (r *Reference) direct(ctx context.Context, fullMethod string) (context.Context, grpc.ClientConnInterface, error) {
	h, _ := ctx.Value(doneKey{}).(*doneHolder)
	counted := h != nil // intercept releases h.cc when the call ends
	if h == nil {
		h = new(doneHolder) // not through intercept: nobody reads it
	}
	fail := func(f failure) (context.Context, grpc.ClientConnInterface, error) {
		h.proxyErr = f.statusErr()
		return nil, nil, h.proxyErr
	}
	md, _ := metadata.FromIncomingContext(ctx)
	marks := md.Get(loopHeader)
	if r.hopID != "" && countOf(marks, r.hopID) >= maxLoopPasses {
		// A forwarding loop, found as the frame engine finds it (see
		// loopHeader); nothing else bounds one here.
		return fail(failure{kind: failLoop, method: fullMethod})
	}
	addr, sent, done, timeout, err := r.pick(ctx, fullMethod, h)
	if err != nil {
		h.pickErr = err
		return fail(failure{kind: failNoBackend, method: fullMethod, cause: err})
	}
	h.done = done
	h.addr = addr
	cc, err := r.conn(addr, counted)
	if err != nil {
		return fail(failure{kind: failDial, backend: addr, cause: err})
	}
	if counted {
		h.cc = cc
	}
	if sent != nil {
		// The handler opens the backend stream next; a call of this
		// engine that got this far is sent (UpstreamPick.Sent).
		sent()
	}
	out := md.Copy()
	if r.hopID != "" && (len(marks) > 0 || rand.Uint32N(loopSample) == 0) { // as loopMark
		out.Append(loopHeader, r.hopID)
	}
	// grpc-go's client sends the backend the time left of the outgoing
	// context's deadline as grpc-timeout: the client's (ctx derives from
	// the server stream's), or the route's timeout if that is earlier.
	// The handler's cancel of that context on its expiry resets the
	// backend stream with CANCEL.
	if timeout > 0 {
		if d, ok := ctx.Deadline(); !ok || time.Until(d) > timeout {
			h.routeTimeout, h.routeDeadline = timeout, time.Now().Add(timeout)
			ctx, h.cancel = context.WithDeadline(ctx, h.routeDeadline)
		}
	}
	return metadata.NewOutgoingContext(ctx, out), cc, nil
}

// pick asks the Picker for the call's backend. An UpstreamPicker is asked
// through PickUpstream, as the frame engine asks it, so that the call's
// CallInfo names the cluster it was routed to (h.upstream): looked up by
// its backend when the call ended, a call outliving its cluster (a reload
// removed it) was logged with none, or with another cluster that has the
// same backend.
//
// It also returns the pick's UpstreamPick.Sent and Timeout: this engine
// makes one attempt, so the first pick is the call's only one.
func (r *Reference) pick(ctx context.Context, fullMethod string, h *doneHolder) (string, func(), func(error), time.Duration, error) {
	up, ok := r.picker.(UpstreamPicker)
	if !ok {
		addr, done, err := r.picker.Pick(ctx, fullMethod)
		return addr, nil, done, 0, err
	}
	pk, err := up.PickUpstream(ctx, fullMethod, nil, nil)
	if pk.Upstream != nil {
		h.upstream = pk.Upstream.name
	}
	return pk.Addr, pk.Sent, pk.Done, pk.Timeout, err
}

// conn returns the client connection to addr, opening it if there is
// none; count: the call that takes it is counted on it until release.
func (r *Reference) conn(addr string, count bool) (*refConn, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if cc, ok := r.conns[addr]; ok {
		if count {
			cc.calls++
		}
		return cc, nil
	}
	// The target is a URL: the "%" of an IPv6 zone ("[fe80::1%eth0]:port")
	// is escaped, and the passthrough resolver dials it unescaped.
	creds := r.creds
	if r.fails != nil {
		creds = countingCreds{TransportCredentials: creds, backend: addr, fails: r.fails}
	}
	cc, err := grpc.NewClient("passthrough:///"+strings.ReplaceAll(addr, "%", "%25"),
		grpc.WithContextDialer(r.dialer(addr)),
		grpc.WithTransportCredentials(creds),
		grpc.WithMaxHeaderListSize(r.maxResp),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(r.maxMsg), grpc.MaxCallSendMsgSize(math.MaxInt32)))
	if err != nil {
		return nil, fmt.Errorf("proxy: client for %s: %w", addr, err)
	}
	rc := &refConn{ClientConn: cc, addr: addr}
	if count {
		rc.calls = 1
	}
	r.conns[addr] = rc
	return rc, nil
}

// release ends a call's use of cc (conn): a connection RetireBackends
// took out of use closes after its last call.
func (r *Reference) release(cc *refConn) {
	r.mu.Lock()
	cc.calls--
	last := cc.calls == 0 && r.retired[cc]
	if last {
		delete(r.retired, cc)
	}
	r.mu.Unlock()
	if last {
		cc.Close()
	}
}

// dialer opens backend addr's connections for its grpc-go client, as the
// frame engine opens its own: straight to the backend with a net.Dialer.
// grpc-go's own dialer would go through an HTTP CONNECT proxy named by
// HTTPS_PROXY in the environment (its delegating resolver), which the
// frame engine never does; a dial that fails is counted
// (CountConnectFailure), unless grpc-go cancelled it. One that ran out of
// grpc-go's connect deadline did fail: a connect timeout, as Envoy counts.
func (r *Reference) dialer(addr string) func(context.Context, string) (net.Conn, error) {
	return func(ctx context.Context, a string) (net.Conn, error) {
		var d net.Dialer
		nc, err := d.DialContext(ctx, "tcp", a)
		if err != nil && r.fails != nil && !errors.Is(ctx.Err(), context.Canceled) {
			r.fails("", addr, err)
		}
		return nc, err
	}
}

// countingCreds counts the TLS handshakes with backend that fail
// (ReferenceConfig.CountConnectFailure); otherwise they are its
// TransportCredentials'.
type countingCreds struct {
	credentials.TransportCredentials
	backend string
	fails   func(upstream, backend string, err error)
}

func (c countingCreds) ClientHandshake(ctx context.Context, authority string, raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	nc, ai, err := c.TransportCredentials.ClientHandshake(ctx, authority, raw)
	if err != nil && !errors.Is(ctx.Err(), context.Canceled) {
		c.fails("", c.backend, err)
	}
	return nc, ai, err
}

func (c countingCreds) Clone() credentials.TransportCredentials {
	return countingCreds{TransportCredentials: c.TransportCredentials.Clone(), backend: c.backend, fails: c.fails}
}

// Serve serves gRPC on ln until Shutdown or Close.
func (r *Reference) Serve(ln net.Listener) error {
	if r.maxConns > 0 {
		ln = &capListener{Listener: ln, max: int64(r.maxConns), refused: func() {
			r.refusals.note(time.Now(), r.log, slog.LevelDebug, "connections refused: at max connections", r.maxConns)
		}}
	}
	if r.ends != nil {
		r.ends.start(r.log)
	}
	err := r.srv.Serve(ln)
	if err == nil || errors.Is(err, grpc.ErrServerStopped) {
		return ErrServerClosed
	}
	return err
}

// Shutdown stops accepting, lets in-flight calls finish until ctx ends,
// then stops hard and closes the backend connections.
func (r *Reference) Shutdown(ctx context.Context) error {
	done := make(chan struct{})
	go func() {
		r.srv.GracefulStop()
		close(done)
	}()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = ctx.Err()
		// End the calls still running, so that each is answered with
		// UNAVAILABLE, and give those answers shutdownAbortGrace to go
		// out before the connections are closed, as the frame engine
		// does; grpc-go's Stop alone just closes them.
		r.cutAll()
		t := time.NewTimer(shutdownAbortGrace)
		select {
		case <-done:
		case <-t.C:
			r.srv.Stop()
			<-done
		}
		t.Stop()
	}
	r.closeConns()
	r.stopEnds()
	return err
}

// Close stops the engine at once.
func (r *Reference) Close() error {
	r.cutAll()
	r.srv.Stop()
	r.closeConns()
	r.stopEnds()
	return nil
}

// stopEnds delivers the ended calls still queued for OnCallEnd (for a
// bounded time) once no call runs.
func (r *Reference) stopEnds() {
	if r.ends != nil {
		r.ends.stop()
	}
}

func (r *Reference) closeConns() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for addr, cc := range r.conns {
		cc.Close()
		delete(r.conns, addr)
	}
	for cc, t := range r.draining {
		t.Stop()
		cc.Close()
		delete(r.draining, cc)
	}
	for cc := range r.retired {
		cc.Close()
		delete(r.retired, cc)
	}
}

// RetireBackends takes the client connections of the backends addrs out
// of use without a drain timeout: new calls to them get a new connection,
// and each closes after its last call, however long (an idle one at
// once), as the frame engine's DrainUpstream does for a cluster a reload
// removed. Calls on it are bounded only by Shutdown. Safe for concurrent
// use.
func (r *Reference) RetireBackends(addrs []string) {
	var idle []*refConn
	r.mu.Lock()
	for _, addr := range addrs {
		cc, ok := r.conns[addr]
		if !ok {
			continue
		}
		delete(r.conns, addr)
		idle = r.retireLocked(cc, idle)
	}
	r.mu.Unlock()
	for _, cc := range idle {
		cc.Close()
	}
}

// retireLocked takes cc, already out of r.conns and r.draining, out of
// use: it closes after its last call (r.retired), or, with none, at once:
// it is appended to idle, for the caller to close once r.mu is released.
// Caller must hold r.mu.
func (r *Reference) retireLocked(cc *refConn, idle []*refConn) []*refConn {
	if cc.calls == 0 {
		return append(idle, cc)
	}
	r.retired[cc] = true
	return idle
}

// RetainBackends takes the client connections of backends not in addrs out
// of use; grpc-go cannot drain a ClientConn, so each is closed after
// DrainTimeout, which fails calls still on it. A backend back in addrs
// before then (a DNS answer or a registry listing that left it out once)
// has its calls kept, as the frame engine keeps them: its old connection
// takes no new call (they get a new one) and closes after its last call,
// as RetireBackends' do. Safe for concurrent use.
func (r *Reference) RetainBackends(addrs []string) {
	keep := make(map[string]bool, len(addrs))
	for _, a := range addrs {
		keep[a] = true
	}
	var idle []*refConn
	r.mu.Lock()
	defer func() {
		r.mu.Unlock()
		for _, cc := range idle {
			cc.Close()
		}
	}()
	for cc, t := range r.draining {
		if !keep[cc.addr] {
			continue
		}
		// Deleted under mu, the timer, if it fired, finds it gone.
		t.Stop()
		delete(r.draining, cc)
		idle = r.retireLocked(cc, idle)
	}
	for addr, cc := range r.conns {
		if keep[addr] {
			continue
		}
		delete(r.conns, addr)
		r.draining[cc] = time.AfterFunc(r.drain, func() {
			r.mu.Lock()
			_, ok := r.draining[cc]
			delete(r.draining, cc)
			r.mu.Unlock()
			if ok {
				why := fmt.Errorf("%w: drain timeout %v passed", errLeftSet, r.drain)
				cc.cut.Store(&why)
				cc.Close()
			}
		})
	}
}

// countOf returns how many of vs are v.
func countOf(vs []string, v string) int {
	n := 0
	for _, x := range vs {
		if x == v {
			n++
		}
	}
	return n
}

// capListener closes the connections it accepts while max of those it
// handed on are open, as the frame engine's Serve does at
// Config.MaxConnections; grpc-go's server has no such cap.
type capListener struct {
	net.Listener
	max     int64
	refused func()
	open    atomic.Int64
}

func (l *capListener) Accept() (net.Conn, error) {
	for {
		nc, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if l.open.Add(1) <= l.max {
			return &cappedConn{Conn: nc, open: &l.open}, nil
		}
		l.open.Add(-1)
		nc.Close()
		l.refused()
	}
}

// cappedConn gives its place under capListener's cap back when closed.
type cappedConn struct {
	net.Conn
	open *atomic.Int64
	once sync.Once
}

func (c *cappedConn) Close() error {
	c.once.Do(func() { c.open.Add(-1) })
	return c.Conn.Close()
}
