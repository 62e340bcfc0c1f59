package testserver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/reflection"
)

// ServiceName is the fully qualified name of the TestService a Server
// implements. It is also the service name whose health SetServing flips.
const ServiceName = "grpc.testing.TestService"

// Metadata keys the server sets on responses.
const (
	// HeaderBackend is the response header metadata key carrying the
	// backend's Config.Name on every TestService call.
	HeaderBackend = "x-backend"
	// TrailerBackend is the trailer metadata key carrying the backend's
	// Config.Name on every TestService call.
	TrailerBackend = "x-backend-trailer"
	// TrailerRequestPayloadSize is the trailer metadata key in which
	// UnaryCall reports the length of the request payload body it received,
	// so large requests can be checked end to end.
	TrailerRequestPayloadSize = "x-request-payload-size"
)

// Request metadata keys the server interprets as per-call knobs.
const (
	// MetadataDelay holds a Go duration (time.ParseDuration) added as
	// latency before the handler runs.
	MetadataDelay = "x-delay"
	// MetadataHang, when true (strconv.ParseBool, e.g. "1"), makes the call
	// block until its context is done.
	MetadataHang = "x-hang"
	// MetadataFailCode holds a decimal gRPC status code the call fails with
	// instead of running the handler; "0" means no failure.
	MetadataFailCode = "x-fail-code"
	// MetadataFailMessage holds the status message used with
	// MetadataFailCode. It is passed through as is.
	MetadataFailMessage = "x-fail-message"
	// MetadataFailMessageBin is a binary alternative to MetadataFailMessage,
	// used when that is absent. gRPC only allows printable ASCII in other
	// metadata values, so non-ASCII messages need this key.
	MetadataFailMessageBin = "x-fail-message-bin"
	// EchoPrefix marks request metadata keys echoed in response headers.
	EchoPrefix = "x-echo-"
	// EchoTrailerPrefix marks request metadata keys echoed in trailers
	// instead of headers.
	EchoTrailerPrefix = "x-echo-trailer-"
)

// defaultMaxMsgSize is the default receive and send limit, large enough
// for the 64 MiB messages the large-message tests use.
const defaultMaxMsgSize = 128 << 20

// Config configures a Server. Only Name is required.
type Config struct {
	// Name identifies the backend in HeaderBackend, TrailerBackend,
	// SimpleResponse.Hostname/ServerId and logs. Required.
	Name string

	// Latency is added to every TestService call before its handler runs.
	// It must not be negative.
	Latency time.Duration

	// ErrorRate is the fraction, in [0, 1], of TestService calls that fail
	// with ErrorCode before their handler runs.
	ErrorRate float64
	// ErrorCode is the status code of failures injected by ErrorRate.
	// Zero (codes.OK) means codes.Unavailable.
	ErrorCode codes.Code
	// Rand decides which calls fail under ErrorRate: a call fails when
	// Float64() < ErrorRate. It is called concurrently from handlers and
	// only when ErrorRate > 0. Nil means math/rand/v2.
	Rand interface{ Float64() float64 }

	// After is the clock used for Latency, x-delay and IntervalUs waits,
	// with the contract of time.After. Tests may inject a fake. Nil means
	// time.After.
	After func(d time.Duration) <-chan time.Time

	// OnCancel, if set, is called with the full method name when a
	// TestService call finishes after observing its context done (client
	// cancellation, deadline, or server stop). Counters are updated before
	// it is called. It is called from handler goroutines, possibly
	// concurrently, and should not block.
	OnCancel func(fullMethod string)

	// Handler overrides, after grpc-go's stubserver: a non-nil function
	// replaces the built-in behaviour of that method. Knobs, counters and
	// backend metadata still apply, as they are implemented by interceptors.
	EmptyCallF           func(ctx context.Context, in *testgrpc.Empty) (*testgrpc.Empty, error)
	UnaryCallF           func(ctx context.Context, in *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error)
	StreamingOutputCallF func(in *testgrpc.StreamingOutputCallRequest, stream testgrpc.TestService_StreamingOutputCallServer) error
	StreamingInputCallF  func(stream testgrpc.TestService_StreamingInputCallServer) error
	FullDuplexCallF      func(stream testgrpc.TestService_FullDuplexCallServer) error
	HalfDuplexCallF      func(stream testgrpc.TestService_HalfDuplexCallServer) error

	// ServerOptions are appended after the defaults (128 MiB receive and
	// send limits, the knob interceptors, waiting for handlers on stop), so
	// they may override the limits.
	ServerOptions []grpc.ServerOption

	// Logger receives the server's logs, with component=testserver and
	// backend=<Name> added. Nil means slog.Default().
	Logger *slog.Logger
}

// Server is a gRPC test backend. Create it with New, run it with Serve or
// Start, and stop it with Stop, GracefulStop or Shutdown. All methods are
// safe for concurrent use.
type Server struct {
	// Immutable after New.
	cfg       Config
	errorCode codes.Code
	rand      interface{ Float64() float64 }
	after     func(time.Duration) <-chan time.Time
	logger    *slog.Logger
	grpc      *grpc.Server
	health    *health.Server

	calls    atomic.Int64
	inFlight atomic.Int64
	canceled atomic.Int64

	methodsMu sync.Mutex // methodsMu guards methods.
	methods   map[string]*atomic.Int64

	mu   sync.Mutex // mu guards the fields below.
	addr string
	// done is closed when the serve goroutine started by Start exits; nil
	// until Start is called.
	done chan struct{}
}

// mathRand adapts math/rand/v2's concurrency-safe top-level source.
type mathRand struct{}

func (mathRand) Float64() float64 { return rand.Float64() }

// New validates cfg and builds a Server with the TestService, health
// (overall and ServiceName SERVING) and reflection services registered. It
// starts nothing. New takes ownership of cfg.ServerOptions.
func New(cfg Config) (*Server, error) {
	if cfg.Name == "" {
		return nil, errors.New("testserver: config: Name is required")
	}
	if !(cfg.ErrorRate >= 0 && cfg.ErrorRate <= 1) { // also rejects NaN
		return nil, fmt.Errorf("testserver: config: ErrorRate %v not in [0, 1]", cfg.ErrorRate)
	}
	if cfg.Latency < 0 {
		return nil, fmt.Errorf("testserver: config: negative Latency %v", cfg.Latency)
	}
	s := &Server{
		cfg:       cfg,
		errorCode: cfg.ErrorCode,
		rand:      cfg.Rand,
		after:     cfg.After,
		logger:    cfg.Logger,
		methods:   make(map[string]*atomic.Int64),
	}
	if s.errorCode == codes.OK {
		s.errorCode = codes.Unavailable
	}
	if s.rand == nil {
		s.rand = mathRand{}
	}
	if s.after == nil {
		s.after = time.After
	}
	if s.logger == nil {
		s.logger = slog.Default()
	}
	s.logger = s.logger.With("component", "testserver", "backend", cfg.Name)

	opts := []grpc.ServerOption{
		grpc.MaxRecvMsgSize(defaultMaxMsgSize),
		grpc.MaxSendMsgSize(defaultMaxMsgSize),
		// Stop and GracefulStop return only after handlers have exited, so
		// nothing of ours runs after they return.
		grpc.WaitForHandlers(true),
		grpc.ChainUnaryInterceptor(s.unaryInterceptor),
		grpc.ChainStreamInterceptor(s.streamInterceptor),
	}
	s.grpc = grpc.NewServer(append(opts, cfg.ServerOptions...)...)
	testgrpc.RegisterTestServiceServer(s.grpc, &service{s: s})
	s.health = health.NewServer()
	s.SetServing(true)
	healthpb.RegisterHealthServer(s.grpc, s.health)
	reflection.Register(s.grpc)
	return s, nil
}

// Name returns Config.Name.
func (s *Server) Name() string { return s.cfg.Name }

// Serve accepts connections on ln and blocks until the server is stopped,
// like grpc.Server.Serve. It returns nil after Stop, GracefulStop or
// Shutdown, and otherwise a wrapped error from ln. Serve takes ownership of
// ln and closes it. If Addr is still empty it is set to ln's address.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.addr == "" {
		s.addr = ln.Addr().String()
	}
	s.mu.Unlock()
	s.logger.Info("serving", "addr", ln.Addr().String())
	if err := s.grpc.Serve(ln); err != nil {
		return fmt.Errorf("testserver: serve %s: %w", ln.Addr(), err)
	}
	return nil
}

// Start listens on addr (for example "127.0.0.1:0") and serves in a
// goroutine owned by the Server until Stop, GracefulStop or Shutdown. It
// returns once the listener is bound, so Addr is valid and clients may
// dial. Start may be called at most once.
func (s *Server) Start(addr string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done != nil {
		return errors.New("testserver: start: already started")
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("testserver: start: %w", err)
	}
	s.addr = ln.Addr().String()
	s.done = make(chan struct{})
	go s.serveLoop(ln, s.done)
	return nil
}

// serveLoop runs Serve for Start and closes done when it returns.
func (s *Server) serveLoop(ln net.Listener, done chan<- struct{}) {
	defer close(done)
	// Serve returns grpc.ErrServerStopped when Stop won the race with it;
	// that is a normal end, like a nil return.
	if err := s.Serve(ln); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		s.logger.Error("serve failed", "err", err)
	}
}

// Addr returns the address the server listens on ("host:port") once Start
// or Serve has been called, and "" before.
func (s *Server) Addr() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addr
}

// Stop closes the listeners and all connections, cancelling in-flight
// calls, and returns once handlers and the goroutine started by Start have
// exited; a Serve call made by the caller returns nil. It is safe to call
// more than once, before Start, and together with GracefulStop or Shutdown.
func (s *Server) Stop() {
	s.grpc.Stop()
	s.waitServe()
}

// GracefulStop reports NOT_SERVING on health, stops accepting connections
// and calls, and blocks until in-flight calls finish and the serve goroutine
// has exited. Calls that never finish (x-hang) block it forever; use
// Shutdown with a deadline when such calls may be open. It is safe to call
// more than once.
func (s *Server) GracefulStop() {
	s.health.Shutdown()
	s.grpc.GracefulStop()
	s.waitServe()
}

// Shutdown is GracefulStop bounded by ctx: when ctx is done before in-flight
// calls finish, it falls back to Stop and returns the wrapped ctx error. In
// either case the server is fully stopped when Shutdown returns.
func (s *Server) Shutdown(ctx context.Context) error {
	s.health.Shutdown()
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		s.grpc.GracefulStop()
	}()
	var err error
	select {
	case <-stopped:
	case <-ctx.Done():
		s.grpc.Stop() // also ends the GracefulStop above
		<-stopped
		err = fmt.Errorf("testserver: shutdown: %w", ctx.Err())
	}
	s.waitServe()
	return err
}

// waitServe waits for the goroutine started by Start, if any.
func (s *Server) waitServe() {
	s.mu.Lock()
	done := s.done
	s.mu.Unlock()
	if done != nil {
		<-done
	}
}

// SetServing sets the health of both the server as a whole ("") and
// ServiceName to SERVING or NOT_SERVING. Health Watch streams see the
// change. It has no effect once GracefulStop or Shutdown has begun.
func (s *Server) SetServing(serving bool) {
	st := healthpb.HealthCheckResponse_NOT_SERVING
	if serving {
		st = healthpb.HealthCheckResponse_SERVING
	}
	s.health.SetServingStatus("", st)
	s.health.SetServingStatus(ServiceName, st)
	s.logger.Info("health changed", "serving", serving)
}

// Calls returns the number of TestService calls started so far.
func (s *Server) Calls() int64 { return s.calls.Load() }

// InFlight returns the number of TestService calls currently being handled.
func (s *Server) InFlight() int64 { return s.inFlight.Load() }

// Canceled returns the number of TestService calls that finished after
// observing their context done.
func (s *Server) Canceled() int64 { return s.canceled.Load() }

// MethodCalls returns the number of calls started for fullMethod, in the
// form "/grpc.testing.TestService/UnaryCall" (see the
// testgrpc.TestService_*_FullMethodName constants).
func (s *Server) MethodCalls(fullMethod string) int64 {
	s.methodsMu.Lock()
	c := s.methods[fullMethod]
	s.methodsMu.Unlock()
	if c == nil {
		return 0
	}
	return c.Load()
}

// methodCounter returns the call counter for fullMethod, creating it.
func (s *Server) methodCounter(fullMethod string) *atomic.Int64 {
	s.methodsMu.Lock()
	defer s.methodsMu.Unlock()
	c := s.methods[fullMethod]
	if c == nil {
		c = new(atomic.Int64)
		s.methods[fullMethod] = c
	}
	return c
}

// BackendFromHeader returns the backend name a Server put in response
// header metadata md under HeaderBackend, or "" if there is none. Clients
// get md with grpc.Header or ClientStream.Header.
func BackendFromHeader(md metadata.MD) string {
	if v := md.Get(HeaderBackend); len(v) > 0 {
		return v[0]
	}
	return ""
}

// payloadPeriod is the period of the PayloadBody pattern. It is prime, so
// shifts by powers of two are detected.
const payloadPeriod = 251

// PayloadBody returns n bytes of the pattern the server uses for response
// payloads: byte i is i mod 251. The caller owns the result. It panics if
// n is negative.
func PayloadBody(n int) []byte {
	b := make([]byte, n)
	for i := range min(n, payloadPeriod) {
		b[i] = byte(i)
	}
	// Double the filled prefix; every offset is a multiple of the period,
	// so the pattern continues.
	for i := payloadPeriod; i < n; i *= 2 {
		copy(b[i:], b[:i])
	}
	return b
}

// CheckPayloadBody reports the first byte of b that differs from
// PayloadBody(len(b)), or nil if b follows the pattern.
func CheckPayloadBody(b []byte) error {
	// Compare whole periods with bytes.Equal, which is much faster than a
	// byte loop on 64 MiB bodies, then locate a mismatch byte by byte.
	block := PayloadBody(payloadPeriod * 256)
	for off := 0; off < len(b); off += len(block) {
		chunk := b[off:min(off+len(block), len(b))]
		if bytes.Equal(chunk, block[:len(chunk)]) {
			continue
		}
		for i, c := range chunk {
			if want := block[i]; c != want {
				return fmt.Errorf("testserver: payload byte %d of %d is %#x, want %#x", off+i, len(b), c, want)
			}
		}
	}
	return nil
}

// clampInt32 converts n to int32, saturating at math.MaxInt32.
func clampInt32(n int64) int32 {
	return int32(min(n, math.MaxInt32))
}
