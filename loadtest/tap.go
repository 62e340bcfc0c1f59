package loadtest

import (
	"context"
	"errors"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/balancer"
	"google.golang.org/grpc/credentials"
	grpcresolver "google.golang.org/grpc/resolver"
)

// Why a tap: ghz (v0.121.0) records each call's status and latency with its
// own grpc stats handler and offers no hook that sees a call's response
// headers: it takes no dial options, and a call option such as grpc.Header
// would be shared by all calls of a connection. What it does take is the name
// of a load-balancing policy for its connections. So Run registers the policy
// tapPolicy, which is pick_first except that every subchannel it creates gets
// credentials that wrap the connection in a tapConn. The tap follows the
// HTTP/2 frames in both directions (frameReader) and records, per stream of
// the method under test, the backend header, the grpc-status and the time
// from the request's HEADERS leaving to the response's end arriving. It never
// changes a byte.
//
// gRPC's balancer registry is global, so the policy is registered once, and
// Run finds its collector through the dial target: ghz dials
// "passthrough://<run id>/<host:port>". The passthrough resolver ignores the
// URL authority, and the :authority of the calls is still host:port.

// tapPolicy is the name of the load-balancing policy that taps connections.
const tapPolicy = "streamlb_loadtest_tap"

// tapRuns maps a run id (the authority of the dial target) to the collector
// of the Run in progress.
var (
	tapRuns   sync.Map // string -> *collector
	tapRunSeq atomic.Uint64
)

func init() {
	balancer.Register(tapBuilder{})
}

// registerTap returns the dial target under which connections to hostport
// are tapped into col, until unregister is called.
func registerTap(col *collector, hostport string) (target string, unregister func()) {
	id := "run-" + strconv.FormatUint(tapRunSeq.Add(1), 10)
	tapRuns.Store(id, col)
	return "passthrough://" + id + "/" + hostport, func() { tapRuns.Delete(id) }
}

type tapBuilder struct{}

func (tapBuilder) Name() string { return tapPolicy }

// Build returns pick_first over a ClientConn whose subchannels are tapped.
func (tapBuilder) Build(cc balancer.ClientConn, opts balancer.BuildOptions) balancer.Balancer {
	pf := balancer.Get("pick_first")
	v, ok := tapRuns.Load(opts.Target.URL.Host)
	if !ok || opts.DialCreds == nil {
		// Not ours, or no credentials to wrap: balance untapped.
		return pf.Build(cc, opts)
	}
	return pf.Build(&tapClientConn{ClientConn: cc, col: v.(*collector), creds: opts.DialCreds}, opts)
}

// tapClientConn gives every subchannel tapping credentials.
type tapClientConn struct {
	balancer.ClientConn
	col   *collector
	creds credentials.TransportCredentials
}

func (cc *tapClientConn) NewSubConn(addrs []grpcresolver.Address, opts balancer.NewSubConnOptions) (balancer.SubConn, error) {
	opts.CredsBundle = tapBundle{creds: &tapCreds{TransportCredentials: cc.creds, col: cc.col}}
	return cc.ClientConn.NewSubConn(addrs, opts)
}

// tapBundle carries tapCreds to a subchannel.
type tapBundle struct {
	creds credentials.TransportCredentials
}

func (b tapBundle) TransportCredentials() credentials.TransportCredentials { return b.creds }
func (b tapBundle) PerRPCCredentials() credentials.PerRPCCredentials       { return nil }
func (b tapBundle) NewWithMode(string) (credentials.Bundle, error) {
	return nil, errors.New("loadtest: tap: modes not supported")
}

// tapCreds wraps the dial's credentials; the connection they hand back to
// grpc is tapped. For TLS the tap sits above the TLS layer and sees the
// plaintext frames.
type tapCreds struct {
	credentials.TransportCredentials
	col *collector
}

func (c *tapCreds) ClientHandshake(ctx context.Context, authority string, raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, info, err := c.TransportCredentials.ClientHandshake(ctx, authority, raw)
	if err != nil {
		return nil, nil, err
	}
	return c.col.tap(conn), info, nil
}

func (c *tapCreds) Clone() credentials.TransportCredentials {
	return &tapCreds{TransportCredentials: c.TransportCredentials.Clone(), col: c.col}
}

// tapStream is one stream of the method under test, from its request
// HEADERS to its end.
type tapStream struct {
	start      time.Time
	backend    string
	grpcStatus string
	httpStatus string
	answered   bool // the server sent HEADERS
}

// tapConn is a connection whose frames are followed in both directions. Write
// is called by grpc's writer goroutine and Read by its reader goroutine; each
// direction has its own frameReader, and mu guards the stream table they
// share.
type tapConn struct {
	net.Conn
	col *collector
	out *frameReader // client to server; fed only from Write
	in  *frameReader // server to client; fed only from Read

	mu      sync.Mutex
	streams map[uint32]*tapStream // guarded by mu
	sealed  bool                  // guarded by mu; no more records once set
}

func (c *tapConn) Write(p []byte) (int, error) {
	// Follow the bytes before they leave, so a stream is known before the
	// reader can see its response.
	if c.out.err == nil {
		c.out.feed(p)
		c.noteErr(c.out.err)
	}
	return c.Conn.Write(p)
}

func (c *tapConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 && c.in.err == nil {
		c.in.feed(p[:n])
		c.noteErr(c.in.err)
	}
	return n, err
}

// noteErr hands a frameReader's error, once it has one, to the collector.
// Each reader stops at its first error, so this happens at most twice.
func (c *tapConn) noteErr(err error) {
	if err != nil {
		c.col.tapFailed(err)
	}
}

func (c *tapConn) Close() error {
	err := c.Conn.Close()
	c.seal()
	return err
}

// seal ends the observation: streams still open are recorded as failed
// (never answered or cut), and later frames are ignored. It is idempotent.
func (c *tapConn) seal() {
	now := c.col.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sealed {
		return
	}
	c.sealed = true
	for id, s := range c.streams {
		c.col.record(s.backend, false, now, now.Sub(s.start))
		delete(c.streams, id)
	}
}

// finishLocked records stream id as ended. Caller must hold c.mu.
func (c *tapConn) finishLocked(id uint32, s *tapStream, ok bool) {
	delete(c.streams, id)
	now := c.col.now()
	c.col.record(s.backend, ok, now, now.Sub(s.start))
}

// tapOut receives the client-to-server events of a tapConn.
type tapOut struct{ c *tapConn }

func (e tapOut) headers(id uint32, _ bool, f *headerFields) {
	if f.path != e.c.col.path {
		return // reflection and other methods are not counted
	}
	now := e.c.col.now()
	c := e.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.sealed {
		c.streams[id] = &tapStream{start: now}
	}
}

func (tapOut) dataEnd(uint32) {} // half-close; the call goes on
func (tapOut) goAway(uint32)  {}

func (e tapOut) rstStream(id uint32, _ uint32) {
	// The client cancelled the call or its deadline passed.
	c := e.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if s, ok := c.streams[id]; ok && !c.sealed {
		c.finishLocked(id, s, false)
	}
}

// tapIn receives the server-to-client events of a tapConn.
type tapIn struct{ c *tapConn }

func (e tapIn) headers(id uint32, end bool, f *headerFields) {
	c := e.c
	c.mu.Lock()
	defer c.mu.Unlock()
	s, ok := c.streams[id]
	if !ok || c.sealed {
		return
	}
	s.answered = true
	if s.backend == "" {
		s.backend = f.backend
	}
	if f.httpStatus != "" {
		s.httpStatus = f.httpStatus
	}
	if f.grpcStatus != "" {
		s.grpcStatus = f.grpcStatus
	}
	if end {
		c.finishLocked(id, s, s.grpcStatus == "0" && (s.httpStatus == "" || s.httpStatus == "200"))
	}
}

func (e tapIn) dataEnd(id uint32) {
	// A response ended without trailers carries no grpc-status: the call
	// fails (gRPC over HTTP/2: "Trailers" are required).
	c := e.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if s, ok := c.streams[id]; ok && !c.sealed {
		c.finishLocked(id, s, false)
	}
}

func (e tapIn) rstStream(id uint32, code uint32) {
	c := e.c
	c.mu.Lock()
	defer c.mu.Unlock()
	s, ok := c.streams[id]
	if !ok || c.sealed {
		return
	}
	if code == errCodeRefusedStream && !s.answered {
		// Not processed; grpc-go retries it as a new stream.
		delete(c.streams, id)
		return
	}
	c.finishLocked(id, s, false)
}

func (e tapIn) goAway(last uint32) {
	// Streams above last were not processed (RFC 9113 §6.8); grpc-go retries
	// them, so they are not calls of their own.
	c := e.c
	c.mu.Lock()
	defer c.mu.Unlock()
	for id, s := range c.streams {
		if id > last && !s.answered {
			delete(c.streams, id)
		}
	}
}
