package proxy_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"os"
	"sync"
	"testing"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/resolver"
	"github.com/streamlb/streamlb/testserver"
)

// quietLog keeps test output to failures; run with -v and edit here to see
// the components' logs.
var quietLog = slog.New(slog.DiscardHandler)

// engines are the two data planes every end-to-end test runs against.
var engines = cluster.Engines()

// server is what both engines offer.
type server interface {
	Serve(net.Listener) error
	Shutdown(context.Context) error
	Close() error
}

// env is one test's world: testservers, a director over them, a proxy in
// front, and one client connection to the proxy.
type env struct {
	t        *testing.T
	backends []*testserver.Server
	dir      *director.Director
	srv      server
	addr     string
	cc       *grpc.ClientConn
	client   testgrpc.TestServiceClient
	serveErr chan error
}

type envOpts struct {
	backends int
	engine   string
	policy   string
	tscfg    func(i int, c *testserver.Config)
	pcfg     func(c *proxy.Config)
	dcfg     func(c *director.Config)
	hook     func(s *proxy.Server) // called before Serve, with the frame engine
	rcfg     func(c *proxy.ReferenceConfig)
}

func verifyNoLeaks(t *testing.T) {
	t.Helper()
	t.Cleanup(func() {
		goleak.VerifyNone(t, goleak.IgnoreCurrent())
	})
}

// newEnv builds an env and registers its teardown.
func newEnv(t *testing.T, o envOpts) *env {
	t.Helper()
	if o.backends == 0 {
		o.backends = 3
	}
	e := &env{t: t, serveErr: make(chan error, 1)}
	var addrs []string
	for i := 0; i < o.backends; i++ {
		cfg := testserver.Config{Name: fmt.Sprintf("b%d", i), Logger: quietLog}
		if o.tscfg != nil {
			o.tscfg(i, &cfg)
		}
		ts := startTestserver(t, cfg)
		e.backends = append(e.backends, ts)
		addrs = append(addrs, ts.Addr())
	}
	dc := director.Config{Policy: o.policy, Logger: quietLog}
	if o.dcfg != nil {
		o.dcfg(&dc)
	}
	d, err := director.New(dc)
	if err != nil {
		t.Fatal(err)
	}
	e.dir = d
	e.setBackends(addrs...)
	// Run decides ejections and ends them, as the wiring runs it.
	dctx, dcancel := context.WithCancel(context.Background())
	dran := make(chan error, 1)
	go func() { dran <- d.Run(dctx) }()
	t.Cleanup(func() {
		dcancel()
		if err := <-dran; err != nil {
			t.Errorf("director Run: %v", err)
		}
	})

	switch o.engine {
	case "frame", "":
		cfg := proxy.Config{Picker: d, Logger: quietLog}
		if o.pcfg != nil {
			o.pcfg(&cfg)
		}
		s, err := proxy.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if o.hook != nil {
			o.hook(s)
		}
		e.srv = s
	case "grpc-proxy":
		// Messages as large as the testservers take (TestLargeMessage).
		rc := proxy.ReferenceConfig{Picker: d, Logger: quietLog, MaxMessageSize: 128 << 20}
		if o.rcfg != nil {
			o.rcfg(&rc)
		}
		s, err := proxy.NewReference(rc)
		if err != nil {
			t.Fatal(err)
		}
		e.srv = s
	default:
		t.Fatalf("unknown engine %q", o.engine)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.addr = ln.Addr().String()
	go func() { e.serveErr <- e.srv.Serve(ln) }()
	t.Cleanup(func() {
		e.srv.Close()
		if err := <-e.serveErr; !errors.Is(err, proxy.ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	e.cc = e.dial(e.addr)
	e.client = testgrpc.NewTestServiceClient(e.cc)
	return e
}

// startTestserver starts a testserver for cfg on loopback, stopped at
// cleanup.
func startTestserver(t testing.TB, cfg testserver.Config) *testserver.Server {
	t.Helper()
	ts, err := testserver.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := ts.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ts.Stop)
	return ts
}

// envBehind is an env with one backend whose only address in the
// director's set is bad's, a raw backend; the proxy's backend stream
// window is window, as the raw backend does not watch it.
func envBehind(t *testing.T, bad string, window int32) *env {
	t.Helper()
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.BackendStreamWindow = window }})
	e.setBackends(bad)
	return e
}

func (e *env) setBackends(addrs ...string) {
	e.t.Helper()
	var st resolver.State
	for _, a := range addrs {
		st.Addresses = append(st.Addresses, resolver.Address{Addr: a})
	}
	if err := e.dir.UpdateState(st); err != nil {
		e.t.Fatal(err)
	}
}

// dial opens a client connection, closed at cleanup.
func (e *env) dial(addr string) *grpc.ClientConn {
	e.t.Helper()
	cc, err := grpc.NewClient("passthrough:///"+addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(math.MaxInt32), grpc.MaxCallSendMsgSize(math.MaxInt32)))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { cc.Close() })
	return cc
}

// fixedWindowConn opens a client connection to addr with fixed stream and
// connection windows of window bytes, closed at cleanup: a fixed window
// turns grpc-go's BDP estimation off, so what the client does not read
// waits in the proxy.
func fixedWindowConn(t *testing.T, addr string, window int32, opts ...grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient("passthrough:///"+addr, append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithInitialWindowSize(window), grpc.WithInitialConnWindowSize(window)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// direct returns a client straight to backend i, for comparisons.
func (e *env) direct(i int) testgrpc.TestServiceClient {
	return testgrpc.NewTestServiceClient(e.dial(e.backends[i].Addr()))
}

func (e *env) backendByName(name string) *testserver.Server {
	for _, b := range e.backends {
		if b.Name() == name {
			return b
		}
	}
	return nil
}

// drain reads a stream to its end and returns the messages and final error.
func drain[T any](recv func() (*T, error)) ([]*T, error) {
	var out []*T
	for {
		m, err := recv()
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		out = append(out, m)
	}
}

// recvLater calls recv once, in a goroutine of its own, and sends the
// error it returns on the channel (buffered, one).
func recvLater[T any](recv func() (T, error)) <-chan error {
	got := make(chan error, 1)
	go func() {
		_, err := recv()
		got <- err
	}()
	return got
}

// newProxyListener makes the frame engine for cfg and serves it as
// serveProxy does.
func newProxyListener(t testing.TB, cfg proxy.Config) net.Listener {
	t.Helper()
	srv, err := proxy.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return serveProxy(t, srv)
}

// serveProxy serves srv on a new loopback listener until the test ends,
// then closes srv and checks that Serve returned ErrServerClosed.
func serveProxy(t testing.TB, srv *proxy.Server) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serveOn(t, srv, ln)
	return ln
}

// serveOn serves srv, either engine, on ln until the test ends, then
// closes srv and checks that Serve returned ErrServerClosed.
func serveOn(t testing.TB, srv interface {
	Serve(net.Listener) error
	Close() error
}, ln net.Listener) {
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-served; !errors.Is(err, proxy.ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
}

// wrapListener gives its connections to proxy.WrapSocket.
type wrapListener struct{ net.Listener }

func (l wrapListener) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return proxy.WrapSocket(nc), nil
}

// attackCount is short, or long when STREAMLB_ATTACKS is set: how many
// calls, connections or rounds an attack runs.
func attackCount(short, long int) int {
	if os.Getenv("STREAMLB_ATTACKS") != "" {
		return long
	}
	return short
}

// concurrently runs call(0) to call(n-1), each in its own goroutine and
// at most par at a time, waits for them all, then fails the test with
// every error they returned.
func concurrently(t *testing.T, n, par int, call func(i int) error) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	sem := make(chan struct{}, par)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			if err := call(i); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
