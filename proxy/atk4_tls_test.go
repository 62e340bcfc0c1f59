package proxy_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"io"
	"math"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// Attacks on the data paths over connections that are not plain sockets
// (TLS, net.Conn wrappers) on the client side, the backend side and both:
// the reader's small inline buffer and bursts, the writer's bufio copy, no
// views. Every message's bytes are checked with SHA-256 end to end.

// opaqueConn hides the socket type: plainSocket and parkRawConn see a
// wrapper, so the data plane takes its non-raw paths.
type opaqueConn struct{ net.Conn }

type opaqueListener struct{ net.Listener }

// chunkConn is an opaqueConn whose reads return at most a few hundred
// bytes, a varying number (one in eight a single byte), as a TLS
// connection whose peer writes small records does.
type chunkConn struct {
	net.Conn
	n int
}

func (c *chunkConn) Read(p []byte) (int, error) {
	c.n++
	k := c.n*7919%700 + 1
	if c.n%8 == 0 {
		k = 1
	}
	return c.Conn.Read(p[:min(len(p), k)])
}

type chunkListener struct{ net.Listener }

func (l chunkListener) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &chunkConn{Conn: nc}, nil
}

func (l opaqueListener) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return opaqueConn{nc}, nil
}

// atk4Body is size deterministic bytes for seed.
func atk4Body(seed uint64, size int) []byte {
	b := make([]byte, size)
	x := seed*0x9E3779B97F4A7C15 + 1
	for i := range b {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		b[i] = byte(x)
	}
	return b
}

func atk4Sum(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }

var atk4Sizes = []int{0, 1, 511, 512, 513, 4095, 4096, 16383, 16384, 16385, 65536, 1 << 20}

// atk4Backend is an echoing testserver: unary and bidi echo the request
// bodies; server streaming sends ResponseParameters sizes of atk4Body
// seeded by the request's body length and index; client streaming
// answers the SHA-256 of the concatenated bodies in trailer x-sha.
func atk4Backend(t *testing.T, name string, mod func(*testserver.Config)) *testserver.Server {
	t.Helper()
	cfg := testserver.Config{Name: name, Logger: quietLog,
		UnaryCallF: func(ctx context.Context, in *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
			return &testgrpc.SimpleResponse{Payload: &testgrpc.Payload{Body: in.GetPayload().GetBody()}}, nil
		},
		FullDuplexCallF: func(st testgrpc.TestService_FullDuplexCallServer) error {
			for {
				m, err := st.Recv()
				if err == io.EOF {
					return nil
				}
				if err != nil {
					return err
				}
				if err := st.Send(&testgrpc.StreamingOutputCallResponse{Payload: m.GetPayload()}); err != nil {
					return err
				}
			}
		},
		StreamingOutputCallF: func(in *testgrpc.StreamingOutputCallRequest, st testgrpc.TestService_StreamingOutputCallServer) error {
			for i, p := range in.GetResponseParameters() {
				body := atk4Body(uint64(len(in.GetPayload().GetBody())*1000+i), int(p.GetSize()))
				if err := st.Send(&testgrpc.StreamingOutputCallResponse{Payload: &testgrpc.Payload{Body: body}}); err != nil {
					return err
				}
			}
			return nil
		},
		StreamingInputCallF: func(st testgrpc.TestService_StreamingInputCallServer) error {
			h := sha256.New()
			n := 0
			for {
				m, err := st.Recv()
				if err == io.EOF {
					st.SetTrailer(metadata.Pairs("x-sha", hex.EncodeToString(h.Sum(nil))))
					return st.SendAndClose(&testgrpc.StreamingInputCallResponse{AggregatedPayloadSize: int32(n)})
				}
				if err != nil {
					return err
				}
				h.Write(m.GetPayload().GetBody())
				n += len(m.GetPayload().GetBody())
			}
		},
	}
	if mod != nil {
		mod(&cfg)
	}
	ts, err := testserver.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return ts
}

// atk4TLS is one CA and a server certificate for 127.0.0.1.
type atk4TLS struct {
	ca   *testkit.CA
	cert tls.Certificate
}

func newAtk4TLS(t *testing.T) *atk4TLS {
	ca := testkit.NewCA(t, "atk4-ca")
	certPEM, keyPEM := ca.Issue(t, "127.0.0.1", true)
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return &atk4TLS{ca: ca, cert: cert}
}

func (a *atk4TLS) server() *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{a.cert}, NextProtos: []string{"h2"}}
}

func (a *atk4TLS) client() *tls.Config {
	return &tls.Config{RootCAs: a.ca.Pool(), ServerName: "127.0.0.1", NextProtos: []string{"h2"}}
}

// atk4Listen listens on loopback in mode: "plain", "wrap" (opaqueConn),
// "tls" (crypto/tls over WrapSocket, as the cluster package serves) or
// "tlswrap" (crypto/tls over an opaqueConn).
func atk4Listen(t *testing.T, a *atk4TLS, mode string) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	switch mode {
	case "plain":
		return ln
	case "wrap":
		return opaqueListener{ln}
	case "chunk":
		return chunkListener{ln}
	case "tls":
		return tls.NewListener(wrapListener{ln}, a.server())
	case "tlswrap":
		return tls.NewListener(opaqueListener{ln}, a.server())
	}
	t.Fatalf("mode %q", mode)
	return nil
}

// atk4Dial returns a proxy.Config.Dial for backends served in mode.
func atk4Dial(a *atk4TLS, mode string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var d net.Dialer
		nc, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		switch mode {
		case "wrap":
			return opaqueConn{nc}, nil
		case "chunk":
			return &chunkConn{Conn: nc}, nil
		case "tls", "tlswrap":
			if mode == "tls" {
				nc = proxy.WrapSocket(nc)
			} else {
				nc = opaqueConn{nc}
			}
			tc := tls.Client(nc, a.client())
			if err := tc.HandshakeContext(ctx); err != nil {
				nc.Close()
				return nil, err
			}
			return tc, nil
		}
		return nc, nil
	}
}

type atk4World struct {
	t        *testing.T
	a        *atk4TLS
	backends []*testserver.Server
	srv      *proxy.Server
	addr     string
	cmode    string
}

// newAtk4World serves n backends in bmode behind a proxy served in cmode.
func newAtk4World(t *testing.T, cmode, bmode string, n int, bmod func(i int, c *testserver.Config), pcfg func(*proxy.Config)) *atk4World {
	t.Helper()
	w := &atk4World{t: t, a: newAtk4TLS(t), cmode: cmode}
	var addrs []string
	for i := range n {
		ts := atk4Backend(t, fmt.Sprintf("b%d", i), func(c *testserver.Config) {
			if bmod != nil {
				bmod(i, c)
			}
		})
		ln := atk4Listen(t, w.a, bmode)
		go ts.Serve(ln)
		t.Cleanup(ts.Stop)
		w.backends = append(w.backends, ts)
		addrs = append(addrs, ln.Addr().String())
	}
	var next atomic.Uint32
	cfg := proxy.Config{Logger: quietLog, Dial: atk4Dial(w.a, bmode),
		Picker: proxy.PickerFunc(func(context.Context, string) (string, func(error), error) {
			return addrs[int(next.Add(1))%len(addrs)], nil, nil
		})}
	if pcfg != nil {
		pcfg(&cfg)
	}
	s, err := proxy.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	w.srv = s
	ln := atk4Listen(t, w.a, cmode)
	w.addr = ln.Addr().String()
	serveOn(t, s, ln)
	return w
}

// client opens a client connection to the proxy.
func (w *atk4World) client(opts ...grpc.DialOption) testgrpc.TestServiceClient {
	w.t.Helper()
	creds := insecure.NewCredentials()
	if w.cmode == "tls" || w.cmode == "tlswrap" {
		creds = credentials.NewTLS(w.a.client())
	}
	cc, err := grpc.NewClient("passthrough:///"+w.addr, append([]grpc.DialOption{grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(math.MaxInt32), grpc.MaxCallSendMsgSize(math.MaxInt32))}, opts...)...)
	if err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(func() { cc.Close() })
	return testgrpc.NewTestServiceClient(cc)
}

var atk4Modes = [][2]string{
	{"tls", "plain"}, {"wrap", "plain"}, {"plain", "tls"}, {"plain", "wrap"},
	{"tls", "tls"}, {"wrap", "wrap"}, {"tlswrap", "tlswrap"}, {"tls", "wrap"},
	{"chunk", "plain"}, {"plain", "chunk"}, {"chunk", "chunk"}, {"chunk", "tls"},
}

// atk4Calls runs every call kind for every size, concurrently, on c and
// checks every message's bytes. slow makes readers sleep between
// messages.
func atk4Calls(ctx context.Context, t *testing.T, c testgrpc.TestServiceClient, sizes []int, slow time.Duration) {
	t.Helper()
	// Call i is of kind i%4 for size i/4.
	concurrently(t, 4*len(sizes), 4*len(sizes), func(i int) error {
		si, size := i/4, sizes[i/4]
		switch i % 4 {
		case 0:
			return atk4Unary(ctx, c, si, size)
		case 1:
			return atk4ServerStream(ctx, c, size, slow)
		case 2:
			return atk4ClientStream(ctx, c, si, size)
		default:
			return atk4Bidi(ctx, c, si, size, slow)
		}
	})
}

func atk4Unary(ctx context.Context, c testgrpc.TestServiceClient, si, size int) error {
	body := atk4Body(uint64(si), size)
	r, err := c.UnaryCall(ctx, &testgrpc.SimpleRequest{Payload: &testgrpc.Payload{Body: body}})
	if err != nil {
		return fmt.Errorf("unary %d: %v", size, err)
	}
	if atk4Sum(r.GetPayload().GetBody()) != atk4Sum(body) {
		return fmt.Errorf("unary %d: wrong bytes (got %d)", size, len(r.GetPayload().GetBody()))
	}
	return nil
}

func atk4ServerStream(ctx context.Context, c testgrpc.TestServiceClient, size int, slow time.Duration) error {
	req := &testgrpc.StreamingOutputCallRequest{Payload: &testgrpc.Payload{Body: make([]byte, size%7)}}
	for range 3 {
		req.ResponseParameters = append(req.ResponseParameters, &testgrpc.ResponseParameters{Size: int32(size)})
	}
	st, err := c.StreamingOutputCall(ctx, req)
	if err != nil {
		return fmt.Errorf("server-stream %d: %v", size, err)
	}
	for i := 0; ; i++ {
		m, err := st.Recv()
		if err == io.EOF {
			if i != 3 {
				return fmt.Errorf("server-stream %d: %d messages", size, i)
			}
			return nil
		}
		if err != nil {
			return fmt.Errorf("server-stream %d msg %d: %v", size, i, err)
		}
		if atk4Sum(m.GetPayload().GetBody()) != atk4Sum(atk4Body(uint64((size%7)*1000+i), size)) {
			return fmt.Errorf("server-stream %d msg %d: wrong bytes", size, i)
		}
		time.Sleep(slow)
	}
}

func atk4ClientStream(ctx context.Context, c testgrpc.TestServiceClient, si, size int) error {
	st, err := c.StreamingInputCall(ctx)
	if err != nil {
		return fmt.Errorf("client-stream %d: %v", size, err)
	}
	h := sha256.New()
	for i := range 3 {
		b := atk4Body(uint64(si*10+i), size)
		h.Write(b)
		if err := st.Send(&testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: b}}); err != nil {
			break // the status comes with CloseAndRecv
		}
	}
	r, err := st.CloseAndRecv()
	if err != nil {
		return fmt.Errorf("client-stream %d: %v", size, err)
	}
	if got, want := st.Trailer().Get("x-sha"), hex.EncodeToString(h.Sum(nil)); len(got) != 1 || got[0] != want || int(r.GetAggregatedPayloadSize()) != 3*size {
		return fmt.Errorf("client-stream %d: wrong bytes (size %d)", size, r.GetAggregatedPayloadSize())
	}
	return nil
}

func atk4Bidi(ctx context.Context, c testgrpc.TestServiceClient, si, size int, slow time.Duration) error {
	st, err := c.FullDuplexCall(ctx)
	if err != nil {
		return fmt.Errorf("bidi %d: %v", size, err)
	}
	for i := range 3 {
		b := atk4Body(uint64(si*100+i), size)
		if err := st.Send(&testgrpc.StreamingOutputCallRequest{Payload: &testgrpc.Payload{Body: b}}); err != nil {
			return fmt.Errorf("bidi %d send %d: %v", size, i, err)
		}
		m, err := st.Recv()
		if err != nil {
			return fmt.Errorf("bidi %d recv %d: %v", size, i, err)
		}
		if !bytes.Equal(m.GetPayload().GetBody(), b) {
			return fmt.Errorf("bidi %d msg %d: wrong bytes", size, i)
		}
		time.Sleep(slow)
	}
	st.CloseSend()
	if _, err := st.Recv(); err != io.EOF {
		return fmt.Errorf("bidi %d end: %v", size, err)
	}
	return nil
}

// TestAtk4NonRawBytesExact: every call kind and message size, concurrent,
// over TLS and wrapped connections on either side and both.
func TestAtk4NonRawBytesExact(t *testing.T) {
	for _, m := range atk4Modes {
		t.Run(m[0]+"-"+m[1], func(t *testing.T) {
			verifyNoLeaks(t)
			w := newAtk4World(t, m[0], m[1], 2, nil, nil)
			ctx := testkit.Context(t, 30*time.Second)
			atk4Calls(ctx, t, w.client(), atk4Sizes, 0)
		})
	}
}

// TestAtk4NonRawSmallWindows: the same with the smallest backend window
// (256-byte DATA frames from the backend side), a client with a fixed
// 64 KiB window that reads slowly, and a small buffered-bytes cap.
func TestAtk4NonRawSmallWindows(t *testing.T) {
	for _, m := range [][2]string{{"tls", "tls"}, {"wrap", "wrap"}, {"chunk", "chunk"}} {
		t.Run(m[0]+"-"+m[1], func(t *testing.T) {
			verifyNoLeaks(t)
			w := newAtk4World(t, m[0], m[1], 2, nil, func(c *proxy.Config) {
				c.BackendStreamWindow = 256
				c.BackendMaxStreamWindow = 256
				c.StreamWindow = 65535
				c.ConnWindow = 65535
			})
			ctx := testkit.Context(t, 60*time.Second)
			c := w.client(grpc.WithInitialWindowSize(65535), grpc.WithInitialConnWindowSize(65535))
			atk4Calls(ctx, t, c, []int{0, 1, 511, 513, 4096, 16385, 65536, 200 << 10}, time.Millisecond)
		})
	}
}

// TestAtk4NonRawRetryAfterReading: a retried method whose first backend
// reads the request's messages and answers UNAVAILABLE; the retry on the
// other backend gets the same bytes.
func TestAtk4NonRawRetryAfterReading(t *testing.T) {
	for _, m := range [][2]string{{"tls", "tls"}, {"wrap", "wrap"}, {"tlswrap", "plain"}, {"chunk", "chunk"}} {
		t.Run(m[0]+"-"+m[1], func(t *testing.T) {
			verifyNoLeaks(t)
			var failed atomic.Int64
			w := newAtk4World(t, m[0], m[1], 2, func(i int, c *testserver.Config) {
				if i != 0 {
					return
				}
				c.StreamingInputCallF = func(st testgrpc.TestService_StreamingInputCallServer) error {
					for range 2 {
						if _, err := st.Recv(); err != nil {
							return err
						}
					}
					failed.Add(1)
					return status.Error(codes.Unavailable, "read some, then gave up")
				}
				c.UnaryCallF = func(context.Context, *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
					failed.Add(1)
					return nil, status.Error(codes.Unavailable, "gave up")
				}
			}, func(c *proxy.Config) {
				c.RetryOn = []string{"/grpc.testing.TestService/"}
				c.RetryBudget = 1000
				c.RetryBufferSize = 1 << 20
			})
			ctx := testkit.Context(t, 30*time.Second)
			c := w.client()
			for _, size := range []int{1, 513, 4096, 16385, 65536} {
				for k := range 4 {
					b := atk4Body(uint64(size+k), size)
					r, err := c.UnaryCall(ctx, &testgrpc.SimpleRequest{Payload: &testgrpc.Payload{Body: b}})
					if err != nil {
						t.Fatalf("unary %d: %v", size, err)
					}
					if !bytes.Equal(r.GetPayload().GetBody(), b) {
						t.Fatalf("unary %d: wrong bytes", size)
					}
					st, err := c.StreamingInputCall(ctx)
					if err != nil {
						t.Fatal(err)
					}
					h := sha256.New()
					for i := range 3 {
						b := atk4Body(uint64(size*3+i), size)
						h.Write(b)
						if err := st.Send(&testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: b}}); err != nil {
							break
						}
					}
					if _, err := st.CloseAndRecv(); err != nil {
						t.Fatalf("client-stream %d: %v", size, err)
					}
					if got := st.Trailer().Get("x-sha"); len(got) != 1 || got[0] != hex.EncodeToString(h.Sum(nil)) {
						t.Fatalf("client-stream %d: wrong bytes", size)
					}
				}
			}
			if failed.Load() == 0 {
				t.Fatal("no call reached the failing backend")
			}
		})
	}
}

// TestAtk4NonRawBackendDies: backends stopped in the middle of streams
// over TLS: every call ends with a gRPC status, nothing hangs, no
// goroutine is left.
func TestAtk4NonRawBackendDies(t *testing.T) {
	for _, m := range [][2]string{{"tls", "tls"}, {"wrap", "wrap"}, {"chunk", "chunk"}} {
		t.Run(m[0]+"-"+m[1], func(t *testing.T) {
			verifyNoLeaks(t)
			started := make(chan struct{}, 64)
			w := newAtk4World(t, m[0], m[1], 1, func(i int, c *testserver.Config) {
				c.FullDuplexCallF = func(st testgrpc.TestService_FullDuplexCallServer) error {
					started <- struct{}{}
					for {
						m, err := st.Recv()
						if err != nil {
							return err
						}
						if err := st.Send(&testgrpc.StreamingOutputCallResponse{Payload: m.GetPayload()}); err != nil {
							return err
						}
					}
				}
			}, nil)
			ctx := testkit.Context(t, 30*time.Second)
			c := w.client()
			var wg sync.WaitGroup
			for k := range 8 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					st, err := c.FullDuplexCall(ctx)
					if err != nil {
						t.Error(err)
						return
					}
					for i := 0; i < 10000; i++ {
						b := atk4Body(uint64(k*1000+i), []int{513, 16385, 70000}[i%3])
						if err := st.Send(&testgrpc.StreamingOutputCallRequest{Payload: &testgrpc.Payload{Body: b}}); err != nil {
							break
						}
						m, err := st.Recv()
						if err != nil {
							if status.Code(err) == codes.Unknown || status.Code(err) == codes.OK {
								t.Errorf("stream %d: %v, want a proper status", k, err)
							}
							return
						}
						if !bytes.Equal(m.GetPayload().GetBody(), b) {
							t.Errorf("stream %d: wrong bytes", k)
							return
						}
					}
					_, err = st.Recv()
					if status.Code(err) == codes.Unknown || status.Code(err) == codes.OK {
						t.Errorf("stream %d end: %v, want a proper status", k, err)
					}
				}()
			}
			for range 8 {
				<-started
			}
			time.Sleep(50 * time.Millisecond)
			w.backends[0].Stop()
			wg.Wait()
		})
	}
}

// atk4Closed waits until the peer closes nc (a read returns an error
// other than our deadline's) and returns how long it took.
func atk4Closed(t *testing.T, nc net.Conn, bound time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	nc.SetReadDeadline(start.Add(bound))
	buf := make([]byte, 4096)
	for {
		_, err := nc.Read(buf)
		if err == nil {
			continue
		}
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			t.Errorf("connection still open after %v", bound)
		}
		return time.Since(start)
	}
}

// TestAtk4TLSHandshakeAbuse: clients that abuse the TLS handshake on a
// TLS port are closed within the preface timeout, and leave nothing.
func TestAtk4TLSHandshakeAbuse(t *testing.T) {
	verifyNoLeaks(t)
	const preface = 300 * time.Millisecond
	w := newAtk4World(t, "tls", "plain", 1, nil, func(c *proxy.Config) {
		c.PrefaceTimeout = preface
		c.WriteTimeout = 500 * time.Millisecond
	})
	ctx := testkit.Context(t, 20*time.Second)
	dial := func() net.Conn { return dialTCP(t, w.addr) }
	tlsDial := func() *tls.Conn {
		tc := tls.Client(dial(), w.a.client())
		if err := tc.Handshake(); err != nil {
			t.Fatal(err)
		}
		return tc
	}
	var wg sync.WaitGroup
	run := func(name string, f func() net.Conn) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			nc := f()
			if d := atk4Closed(t, nc, 5*time.Second); d > preface+2*time.Second {
				t.Errorf("%s: closed after %v", name, d)
			}
		}()
	}
	run("silence", dial)
	run("half a record header", func() net.Conn { nc := dial(); nc.Write([]byte{0x16, 3, 1}); return nc })
	run("record header, no body", func() net.Conn { nc := dial(); nc.Write([]byte{0x16, 3, 1, 0x40, 0}); return nc })
	run("garbage", func() net.Conn { nc := dial(); nc.Write(atk4Body(1, 600)); return nc })
	run("huge record header", func() net.Conn { nc := dial(); nc.Write([]byte{0x16, 3, 3, 0xff, 0xff}); return nc })
	run("handshake then silence", func() net.Conn { return tlsDial() })
	run("handshake, half a preface", func() net.Conn { tc := tlsDial(); tc.Write([]byte("PRI * HTTP/2.0\r\n")); return tc })
	run("slow handshake", func() net.Conn {
		nc := dial()
		// A ClientHello a byte at a time, past the preface timeout.
		var hello bytes.Buffer
		c := tls.Client(atk4Recorder{&hello}, w.a.client())
		c.SetDeadline(time.Now().Add(100 * time.Millisecond))
		c.Handshake()
		go func() {
			for i, b := range hello.Bytes() {
				if i > 40 {
					return
				}
				if _, err := nc.Write([]byte{b}); err != nil {
					return
				}
				time.Sleep(20 * time.Millisecond)
			}
		}()
		return nc
	})
	// After the handshake and the preface, b written to the socket
	// itself, outside TLS records.
	prefaceThen := func(b []byte) func() net.Conn {
		return func() net.Conn {
			raw := dial()
			tc := tls.Client(raw, w.a.client())
			if err := tc.Handshake(); err != nil {
				t.Error(err)
				return raw
			}
			tc.Write([]byte(http2ClientPreface))
			raw.Write(b)
			return raw
		}
	}
	run("handshake, preface, then an oversized record", prefaceThen(append([]byte{0x17, 3, 3, 0xff, 0xff}, atk4Body(2, 1000)...)))
	run("handshake, preface, then a cleartext frame", prefaceThen([]byte{0, 0, 0, 4, 0, 0, 0, 0, 0}))
	wg.Wait()
	testkit.WaitFor(ctx, t, "connections gone", func() bool { return w.srv.ClientConns() == 0 })
	// The port still serves.
	atk4Calls(ctx, t, w.client(), []int{1, 16385}, 0)
}

const http2ClientPreface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// atk4Recorder is a net.Conn that records what is written to it and
// reads nothing (until its deadline).
type atk4Recorder struct{ w *bytes.Buffer }

func (r atk4Recorder) Read(p []byte) (int, error) {
	time.Sleep(100 * time.Millisecond)
	return 0, io.EOF
}
func (r atk4Recorder) Write(p []byte) (int, error)      { return r.w.Write(p) }
func (r atk4Recorder) Close() error                     { return nil }
func (r atk4Recorder) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (r atk4Recorder) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (r atk4Recorder) SetDeadline(time.Time) error      { return nil }
func (r atk4Recorder) SetReadDeadline(time.Time) error  { return nil }
func (r atk4Recorder) SetWriteDeadline(time.Time) error { return nil }

// TestAtk4TLSClientNeverReads: a TLS client that opens streams of large
// answers with wide windows and never reads: the proxy's buffered bytes
// stay within MaxConnBufferedBytes, WriteTimeout ends the connection, and
// nothing is left.
func TestAtk4TLSClientNeverReads(t *testing.T) {
	for _, cm := range []string{"tls", "wrap"} {
		t.Run(cm, func(t *testing.T) {
			verifyNoLeaks(t)
			const limit = 2 << 20
			w := newAtk4World(t, cm, cm, 1, nil, func(c *proxy.Config) {
				c.WriteTimeout = 400 * time.Millisecond
				c.MaxConnBufferedBytes = limit
			})
			ctx := testkit.Context(t, 20*time.Second)
			nc := dialTCP(t, w.addr)
			if cm == "tls" {
				tc := tls.Client(nc, w.a.client())
				if err := tc.Handshake(); err != nil {
					t.Fatal(err)
				}
				nc = tc
			}
			r := rawOver(t, nc)
			r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 30})
			r.fr.WriteWindowUpdate(0, 1<<30)
			req := &testgrpc.StreamingOutputCallRequest{}
			for range 8 {
				req.ResponseParameters = append(req.ResponseParameters, &testgrpc.ResponseParameters{Size: 1 << 20})
			}
			msg, err := proto.Marshal(req)
			if err != nil {
				t.Fatal(err)
			}
			framed := append([]byte{0, byte(len(msg) >> 24), byte(len(msg) >> 16), byte(len(msg) >> 8), byte(len(msg))}, msg...)
			for i := range 8 {
				id := uint32(2*i + 1)
				if err := r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: requestBlock("/grpc.testing.TestService/StreamingOutputCall"), EndHeaders: true}); err != nil {
					t.Fatal(err)
				}
				if err := r.fr.WriteData(id, true, framed); err != nil {
					t.Fatal(err)
				}
			}
			var peak int64
			deadline := time.Now().Add(5 * time.Second)
			for w.srv.ClientConns() > 0 && time.Now().Before(deadline) {
				peak = max(peak, w.srv.MaxBufferedBytes())
				time.Sleep(5 * time.Millisecond)
			}
			if n := w.srv.ClientConns(); n != 0 {
				t.Errorf("client connections = %d after 5s of a client that does not read, want 0 (WriteTimeout)", n)
			}
			if peak > limit {
				t.Errorf("buffered bytes peaked at %d, over the %d limit", peak, limit)
			}
			t.Logf("peak buffered %d", peak)
			testkit.WaitFor(ctx, t, "backend calls to end", func() bool { return w.backends[0].InFlight() == 0 })
		})
	}
}

// TestAtk4HoldbackNonRawBackend: TestHoldbackBackendFailsMidMessage with
// the proxy's backend connections wrapped (no views), read in small
// chunks, or over TLS: the client gets the whole messages before the torn
// one and the status a direct client gets, never a torn message.
func TestAtk4HoldbackNonRawBackend(t *testing.T) {
	const size = 3000
	msg := payloadMsg(size)
	faults := []holdFault{faultClose, faultRSTInternal, faultGoAway}
	a := newAtk4TLS(t)
	for _, mode := range []string{"wrap", "chunk", "tls"} {
		for _, fault := range faults {
			for _, k := range []int{0, 3} {
				for _, unary := range []bool{true, false} {
					if unary && k > 0 {
						continue
					}
					t.Run(fmt.Sprintf("%s/%s/k=%d/unary=%v", mode, fault.name, k, unary), func(t *testing.T) {
						verifyNoLeaks(t)
						serve := halfMessageH2(msg, k, [8]byte{'h', 'o', 'l', 'd'}, fault.do)
						bad := rawBackend(t, func(nc net.Conn) {
							if mode == "tls" {
								tc := tls.Server(nc, a.server())
								defer tc.Close()
								nc = tc
							}
							serve(nc)
						})
						e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.Dial = atk4Dial(a, mode) }})
						e.setBackends(bad)
						ctx := testkit.Context(t, 30*time.Second)
						creds := insecure.NewCredentials()
						if mode == "tls" {
							creds = credentials.NewTLS(a.client())
						}
						direct, err := grpc.NewClient("passthrough:///"+bad, grpc.WithTransportCredentials(creds))
						if err != nil {
							t.Fatal(err)
						}
						defer direct.Close()
						want := callRaw(ctx, direct, unary)
						got := callRaw(ctx, e.cc, unary)
						if want.msgs != k {
							t.Fatalf("direct client: %d messages then %v, want %d", want.msgs, want.err, k)
						}
						if got.msgs != want.msgs || got.code != want.code {
							t.Errorf("through the proxy: %d messages then %v; direct: %d messages then %v", got.msgs, got.err, want.msgs, want.err)
						}
					})
				}
			}
		}
	}
}

// TestAtk4NonRawCancels: calls canceled at varying points, among calls
// that finish, over TLS and chunked connections on both sides: the
// finished calls' bytes are exact, every canceled call ends CANCELED,
// the backends see every call end, nothing is left.
func TestAtk4NonRawCancels(t *testing.T) {
	for _, m := range [][2]string{{"tls", "tls"}, {"chunk", "chunk"}, {"wrap", "tls"}} {
		t.Run(m[0]+"-"+m[1], func(t *testing.T) {
			verifyNoLeaks(t)
			w := newAtk4World(t, m[0], m[1], 2, nil, func(c *proxy.Config) {
				c.BackendStreamWindow = 4096
			})
			ctx := testkit.Context(t, 30*time.Second)
			c := w.client()
			concurrently(t, 24, 24, func(k int) error {
				cctx, cancel := context.WithCancel(ctx)
				defer cancel()
				cancelAt := k % 4 // 0: never
				size := []int{513, 16385, 65536, 300 << 10}[k%4]
				if k%3 == 0 {
					req := &testgrpc.StreamingOutputCallRequest{Payload: &testgrpc.Payload{Body: make([]byte, size%7)}}
					for range 5 {
						req.ResponseParameters = append(req.ResponseParameters, &testgrpc.ResponseParameters{Size: int32(size)})
					}
					st, err := c.StreamingOutputCall(cctx, req)
					if err != nil {
						return err
					}
					for i := 0; ; i++ {
						if cancelAt != 0 && i == cancelAt {
							cancel()
						}
						m, err := st.Recv()
						if err == io.EOF {
							// A cancel may come after the whole answer
							// arrived: then all of it is read.
							if i != 5 {
								return fmt.Errorf("stream %d: ended OK after %d messages", k, i)
							}
							return nil
						}
						if err != nil {
							if status.Code(err) != codes.Canceled || cancelAt == 0 {
								return fmt.Errorf("stream %d msg %d: %v", k, i, err)
							}
							return nil
						}
						if atk4Sum(m.GetPayload().GetBody()) != atk4Sum(atk4Body(uint64((size%7)*1000+i), size)) {
							return fmt.Errorf("stream %d msg %d: wrong bytes", k, i)
						}
					}
				}
				st, err := c.FullDuplexCall(cctx)
				if err != nil {
					return err
				}
				for i := range 5 {
					if cancelAt != 0 && i == cancelAt {
						cancel()
					}
					b := atk4Body(uint64(k*100+i), size)
					if err := st.Send(&testgrpc.StreamingOutputCallRequest{Payload: &testgrpc.Payload{Body: b}}); err != nil {
						_, err = st.Recv()
						if status.Code(err) != codes.Canceled || cancelAt == 0 {
							return fmt.Errorf("bidi %d send %d: %v", k, i, err)
						}
						return nil
					}
					m, err := st.Recv()
					if err != nil {
						if status.Code(err) != codes.Canceled || cancelAt == 0 {
							return fmt.Errorf("bidi %d recv %d: %v", k, i, err)
						}
						return nil
					}
					if !bytes.Equal(m.GetPayload().GetBody(), b) {
						return fmt.Errorf("bidi %d msg %d: wrong bytes", k, i)
					}
				}
				st.CloseSend()
				if _, err := st.Recv(); err != io.EOF && status.Code(err) != codes.Canceled {
					return fmt.Errorf("bidi %d end: %v", k, err)
				}
				return nil
			})
			testkit.WaitFor(ctx, t, "backend calls to end", func() bool {
				return w.backends[0].InFlight() == 0 && w.backends[1].InFlight() == 0
			})
			atk4Calls(ctx, t, c, []int{1, 16385, 65536}, 0)
		})
	}
}
