package proxy

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("proxy: server closed")

// Server is the frame engine: a gRPC-aware HTTP/2 reverse proxy that picks
// a backend per stream and relays frames without decoding messages.
//
// Serve and Shutdown follow net/http.Server: Serve blocks accepting
// connections, Shutdown drains them. All methods are safe for concurrent
// use.
type Server struct {
	cfg  Config
	log  *slog.Logger
	pool pool
	// unsentMoves is maxUnsentMoves; tests lower it (export_test.go).
	unsentMoves uint8

	mu sync.Mutex
	// mu guards the fields below.
	listeners map[net.Listener]struct{}
	conns     map[*serverConn]struct{}
	shutdown  bool
	connWG    sync.WaitGroup // one per serverConn.serve, and the housekeeper
	// hkStop is non-nil while the housekeeping goroutine runs (while
	// there are connections); closing it stops that goroutine.
	hkStop chan struct{}

	// parker holds the idle client connections that gave up their
	// reader goroutine (park.go).
	parker parker

	cancelPool context.CancelFunc

	inflight atomic.Int64 // calls in flight, counted when MaxStreams is set
	up       *Upstream    // the dial and retry settings of Config; see Upstream
	upPicker UpstreamPicker
	// throttleWarned is when warnThrottled last logged, in Unix nanoseconds.
	throttleWarned atomic.Int64

	// done is closed when Shutdown or Close begins; it cuts an accept
	// back-off short.
	done chan struct{}
	now  func() time.Time
	// hopID names this proxy in the loopHeader of the requests it relays.
	hopID    string
	refusals refusalLog
	accepted atomic.Int64 // client connections accepted and served
	// writerStarts counts the writer goroutines client connections
	// started (transport.signal), for tests.
	writerStarts atomic.Int64
	ends         *endQueue      // nil without Config.OnCallEnd
	countEnd     func(CallInfo) // Config.CountCallEnd

	// afterReserve is a test hook, nil otherwise: startAttemptLocked calls
	// it with cc.mu held between reserving a stream slot on a backend
	// connection and queueing the attempt there, so a test can land a
	// GOAWAY in between. Set before Serve.
	afterReserve func(addr string)
	// beforeWatchQueue is a test hook, nil otherwise: startAttemptLocked
	// calls it with cc.mu held between queueing an attempt that may wait
	// for a slot on a backend connection to addr and bounding its wait
	// (watchQueue), so a test can move the waiting call in between.
	beforeWatchQueue func(addr string)
	// beforeEarlyReset is a test hook, nil otherwise: called between
	// queueing an answer that came before its request was all sent and
	// resetting the backend's stream (backendConn.endAnsweredEarly).
	beforeEarlyReset func()
}

// admit takes a unit of the MaxStreams budget for s, if one is left.
func (s *Server) admit(st *stream) bool {
	if s.cfg.MaxStreams == 0 {
		return true
	}
	if s.inflight.Add(1) > s.cfg.MaxStreams {
		s.inflight.Add(-1)
		return false
	}
	st.srvCount = &s.inflight
	return true
}

// RetainBackends tells the server which backends are in the set now.
// Connections to any other backend take no new streams; the streams they
// carry finish, then the connections close, or are closed after
// Config.DrainTimeout. main calls it with each set the resolver pushes, so
// removed pods are drained without clients reconnecting. The connections
// of a retired Upstream are left alone (see DrainUpstream). Safe for
// concurrent use; it does not block on the drain.
func (s *Server) RetainBackends(addrs []string) {
	keep := make(map[string]bool, len(addrs))
	for _, a := range addrs {
		keep[a] = true
	}
	s.pool.retain(keep)
}

// New validates cfg and returns a Server. It starts nothing.
func New(cfg Config) (*Server, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	s := &Server{
		cfg:       cfg,
		log:       cfg.Logger.With("component", "proxy"),
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[*serverConn]struct{}),
		done:      make(chan struct{}),
		now:       time.Now,
		hopID:     hopIDUnless(cfg.NoLoopHeader),
	}
	s.unsentMoves = maxUnsentMoves
	if cfg.OnCallEnd != nil {
		s.ends = newEndQueue(cfg.OnCallEnd)
	}
	s.countEnd = cfg.CountCallEnd
	up, err := NewUpstream(UpstreamConfig{
		Dial: cfg.Dial, RetryOn: cfg.RetryOn, MaxRetries: cfg.MaxRetries,
		RetryBudget: cfg.RetryBudget, RetryBudgetRatio: cfg.RetryBudgetRatio,
	})
	if err != nil {
		return nil, err
	}
	if cfg.MaxRetries == 0 { // setDefaults said none (negative, or no retry buffer)
		up.maxRetries = 0
	}
	s.up = up
	s.upPicker, _ = cfg.Picker.(UpstreamPicker)
	s.pool.srv = s
	s.parker.init(s)
	s.pool.conns = make(map[poolKey][]*backendConn)
	s.pool.inflight = make(map[string]*atomic.Int64)
	s.pool.ctx, s.cancelPool = context.WithCancel(context.Background())
	return s, nil
}

// Serve accepts client connections on ln until Shutdown or Close, serving
// each on its own goroutines. It always returns a non-nil error;
// ErrServerClosed after Shutdown or Close. ln is closed when Serve returns.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.shutdown {
		s.mu.Unlock()
		ln.Close()
		return ErrServerClosed
	}
	s.listeners[ln] = struct{}{}
	if s.ends != nil {
		s.ends.start(s.log)
	}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
		ln.Close()
	}()
	var bo acceptBackoff
	for {
		nc, err := ln.Accept()
		if err != nil {
			if s.isShutdown() {
				return ErrServerClosed
			}
			if !temporaryAcceptError(err) {
				return err
			}
			// Out of file descriptors, or a connection aborted before we
			// took it: the listener is fine, so wait and try again, as
			// net/http does, instead of ending Serve (and the proxy).
			d := bo.fail()
			if bo.failures == 1 {
				s.log.Warn("accept failing; backing off", "err", err)
			}
			t := time.NewTimer(d)
			select {
			case <-t.C:
			case <-s.done:
				t.Stop()
				return ErrServerClosed
			}
			continue
		}
		if n := bo.failures; n > 0 {
			s.log.Info("accepting again", "failed_accepts", n)
			bo = acceptBackoff{}
		}
		if tc, ok := nc.(*net.TCPConn); ok {
			tc.SetNoDelay(true)
		}
		s.mu.Lock()
		if s.shutdown {
			s.mu.Unlock()
			nc.Close()
			return ErrServerClosed
		}
		if max := s.cfg.MaxConnections; max > 0 && len(s.conns) >= max {
			s.mu.Unlock()
			// Before the preface nothing HTTP/2 can be said without
			// waiting on the peer: a close is the cheapest clear answer.
			nc.Close()
			s.refusals.note(s.now(), s.log, slog.LevelDebug, "connections refused: at max connections", max)
			continue
		}
		c := newServerConn(s, nc)
		s.conns[c] = struct{}{}
		s.accepted.Add(1)
		s.connWG.Add(1)
		s.startHousekeeperLocked()
		s.mu.Unlock()
		go s.serveConn(c)
	}
}

// serveConn serves c on its own goroutine. A connection whose reader parks
// (park.go) stays in conns and in connWG: the goroutine that resumes it
// ends it.
func (s *Server) serveConn(c *serverConn) {
	if c.serve() {
		return
	}
	s.connEnded(c)
}

// connEnded removes c, which ended, from the server.
func (s *Server) connEnded(c *serverConn) {
	s.mu.Lock()
	delete(s.conns, c)
	if len(s.conns) == 0 {
		if s.hkStop != nil {
			close(s.hkStop)
			s.hkStop = nil
		}
		s.parker.stop() // nothing is parked: no connection is left
	}
	s.mu.Unlock()
	s.connWG.Done()
}

// Shutdown stops accepting connections, sends GOAWAY on every client
// connection and waits for in-flight streams to finish, then closes the
// backend connections. If ctx ends first, remaining connections are closed
// (their calls fail: the backends see cancellation) and ctx's error is
// returned.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.markShutdownLocked()
	for ln := range s.listeners {
		ln.Close()
	}
	for c := range s.conns {
		c.shutdown()
	}
	s.mu.Unlock()

	done := make(chan struct{})
	go func() {
		s.connWG.Wait()
		close(done)
	}()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = ctx.Err()
		// The calls left end with a status that says why, rather than
		// with the connection closed under them; the writers get a
		// moment to send it before the connections close.
		s.mu.Lock()
		for c := range s.conns {
			c.abortCalls()
		}
		s.mu.Unlock()
		grace := time.NewTimer(shutdownAbortGrace)
		select {
		case <-done:
		case <-grace.C:
		}
		grace.Stop()
		s.closeConns()
		<-done
	}
	s.cancelPool()
	s.pool.closeAll()
	s.stopEnds()
	return err
}

// Close closes every listener and connection at once, failing calls in
// flight, and waits for the server's goroutines to exit.
func (s *Server) Close() error {
	s.mu.Lock()
	s.markShutdownLocked()
	for ln := range s.listeners {
		ln.Close()
	}
	s.mu.Unlock()
	s.closeConns()
	s.connWG.Wait()
	s.cancelPool()
	s.pool.closeAll()
	s.stopEnds()
	return nil
}

// markShutdownLocked records that the server is closing. Caller must hold
// mu.
func (s *Server) markShutdownLocked() {
	if !s.shutdown {
		s.shutdown = true
		close(s.done)
	}
}

func (s *Server) isShutdown() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.shutdown
}

// closeConns closes every client connection. They close at the same
// time, and not under mu: closing a TLS connection sends close_notify,
// which crypto/tls lets wait up to 5 s for a peer that does not read
// (tls.Conn.Close); one after the other, under mu, a few hundred such
// clients would have held Close, and every accept, for that many times
// 5 s.
func (s *Server) closeConns() {
	s.mu.Lock()
	conns := make([]*serverConn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.close(errServerClosing)
		}()
	}
	wg.Wait()
}

var errServerClosing = errors.New("proxy: server closing")

// shutdownAbortGrace is how long Shutdown, once its context ended, lets
// the writers send the calls it cut their UNAVAILABLE status before it
// closes the connections: a client that reads takes them at once, one
// that does not is not waited for.
const shutdownAbortGrace = 250 * time.Millisecond

// housekeepPeriod is how often the housekeeper looks at every client
// connection: every second (parked writers exit, idle readers park), or a
// quarter of the shortest of IdleTimeout and RequestIdleTimeout in force,
// or ParkAfter, if shorter.
func (s *Server) housekeepPeriod() time.Duration {
	p := time.Second
	for _, d := range []time.Duration{s.cfg.IdleTimeout, s.cfg.RequestIdleTimeout} {
		if d > 0 && d/4 < p {
			p = d / 4
		}
	}
	if d := s.cfg.ParkAfter; d > 0 && d < p {
		p = d
	}
	return p
}

// startHousekeeperLocked starts the housekeeping goroutine if it does not
// run. One goroutine and one ticker per server do the idle and
// request-idle checks of every client connection, rather than two timers
// per connection (issue 12: what an idle connection costs), and make the
// writers parked since the last tick exit. It runs while
// there are connections and is counted in connWG, so Close waits for it.
// Caller must hold mu.
func (s *Server) startHousekeeperLocked() {
	p := s.housekeepPeriod()
	if p <= 0 || s.hkStop != nil {
		return
	}
	stop := make(chan struct{})
	s.hkStop = stop
	s.connWG.Add(1)
	go func() {
		defer s.connWG.Done()
		s.housekeep(p, stop)
	}()
}

// housekeep runs the checks of every connection every period p until stop
// is closed.
func (s *Server) housekeep(p time.Duration, stop <-chan struct{}) {
	tick := time.NewTicker(p)
	defer tick.Stop()
	var conns []*serverConn
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		s.mu.Lock()
		for c := range s.conns {
			conns = append(conns, c)
		}
		s.mu.Unlock()
		now := time.Now()
		for i, c := range conns {
			c.housekeep(now)
			conns[i] = nil
		}
		conns = conns[:0]
		s.collectParkedStacks(now)
	}
}
