package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// rawConn is an HTTP/2 client written frame by frame, for peer behaviour
// grpc-go never shows.
type rawConn struct {
	t  *testing.T
	nc net.Conn
	fr *http2.Framer
}

func dialRaw(t *testing.T, addr string) *rawConn {
	t.Helper()
	r := dialRawPreface(t, addr)
	r.fr.WriteSettings()
	return r
}

// dialRawWide is dialRaw with 1 GiB stream and connection windows granted
// to the proxy, so that only the socket (a client that does not read)
// stops what the proxy sends.
func dialRawWide(t *testing.T, addr string) *rawConn {
	t.Helper()
	r := dialRaw(t, addr)
	r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 30})
	r.fr.WriteWindowUpdate(0, 1<<30)
	return r
}

// dialRawPreface is dialRaw without the client's SETTINGS: only the
// connection preface's magic has been written.
func dialRawPreface(t *testing.T, addr string) *rawConn {
	t.Helper()
	nc := dialTCP(t, addr)
	nc.SetDeadline(time.Now().Add(20 * time.Second))
	r := rawOver(t, nc)
	r.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	return r
}

// dialTCP dials addr; the connection is closed at cleanup.
func dialTCP(t *testing.T, addr string) net.Conn {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	return nc
}

// rawOver is a rawConn on nc (a TLS connection, say), over which it has
// written the client preface's magic. Its Framer hands on header blocks
// as HEADERS and CONTINUATION frames, not merged as dialRawPreface's.
func rawOver(t *testing.T, nc net.Conn) *rawConn {
	io.WriteString(nc, http2.ClientPreface)
	return &rawConn{t: t, nc: nc, fr: http2.NewFramer(nc, nc)}
}

// dialRawBuffered is dialRawPreface for goroutines other than the test's:
// it returns its errors and leaves closing nc to the caller. The
// connection's deadline is 30 s away, and the Framer writes to bw (64 KiB),
// which the caller flushes.
func dialRawBuffered(addr string) (nc net.Conn, bw *bufio.Writer, fr *http2.Framer, err error) {
	nc, err = net.Dial("tcp", addr)
	if err != nil {
		return nil, nil, nil, err
	}
	nc.SetDeadline(time.Now().Add(30 * time.Second))
	nc.Write([]byte(http2.ClientPreface))
	bw = bufio.NewWriterSize(nc, 64<<10)
	fr = http2.NewFramer(bw, nc)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	return nc, bw, fr, nil
}

func (r *rawConn) headers(id uint32, path string, end bool) {
	r.t.Helper()
	if err := r.writeHeaders(id, path, end); err != nil {
		r.t.Fatal(err)
	}
}

// writeHeaders is headers for goroutines other than the test's.
func (r *rawConn) writeHeaders(id uint32, path string, end bool) error {
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	f := []string{":method", "POST", ":scheme", "http", ":path", path, ":authority", "x", "content-type", "application/grpc", "te", "trailers"}
	for i := 0; i < len(f); i += 2 {
		enc.WriteField(hpack.HeaderField{Name: f[i], Value: f[i+1]})
	}
	return r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true, EndStream: end})
}

// next reads frames until one that fn accepts, failing on GOAWAY.
func (r *rawConn) next(fn func(http2.Frame) bool) http2.Frame {
	r.t.Helper()
	for {
		f, err := r.fr.ReadFrame()
		if err != nil {
			r.t.Fatalf("reading: %v", err)
		}
		if g, ok := f.(*http2.GoAwayFrame); ok && !fn(f) {
			r.t.Fatalf("unexpected GOAWAY %v %q", g.ErrCode, g.DebugData())
		}
		if fn(f) {
			return f
		}
	}
}

// streamEnd reads frames until stream id ends: its RST_STREAM, or its
// header block with END_STREAM, which it returns.
func (r *rawConn) streamEnd(id uint32) http2.Frame {
	r.t.Helper()
	return r.next(func(f http2.Frame) bool {
		switch f := f.(type) {
		case *http2.RSTStreamFrame:
			return f.StreamID == id
		case *http2.MetaHeadersFrame:
			return f.StreamID == id && f.StreamEnded()
		}
		return false
	})
}

func grpcMsg(m proto.Message) []byte {
	b, _ := proto.Marshal(m)
	out := make([]byte, 5+len(b))
	binary.BigEndian.PutUint32(out[1:], uint32(len(b)))
	copy(out[5:], b)
	return out
}

// TestLoweredInitialWindow: a client may lower SETTINGS_INITIAL_WINDOW_SIZE
// while a response waits for window, driving the stream's window negative
// (RFC 9113 §6.9.2). The stream waits for WINDOW_UPDATE; the connection
// lives on.
func TestLoweredInitialWindow(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	r := dialRaw(t, e.addr)
	const size = 200000
	r.headers(1, "/grpc.testing.TestService/UnaryCall", false)
	r.fr.WriteData(1, true, grpcMsg(&testgrpc.SimpleRequest{ResponseSize: size}))
	got := 0
	for got < 65535 { // both windows spent
		if d, ok := r.next(func(f http2.Frame) bool { _, ok := f.(*http2.DataFrame); return ok }).(*http2.DataFrame); ok {
			got += len(d.Data())
		}
	}
	r.fr.WriteWindowUpdate(1, 30000) // the stream may go on; the connection may not
	r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 65535 - 40000})
	r.next(func(f http2.Frame) bool { s, ok := f.(*http2.SettingsFrame); return ok && s.IsAck() })
	// The connection window opens while the stream's is negative: the
	// writer must leave the stream alone. A PING round trip lets it run.
	r.fr.WriteWindowUpdate(0, 1<<30)
	r.fr.WritePing(false, [8]byte{1})
	r.next(func(f http2.Frame) bool { p, ok := f.(*http2.PingFrame); return ok && p.IsAck() })
	r.fr.WriteWindowUpdate(1, 1<<20)
	end := r.next(func(f http2.Frame) bool {
		switch f := f.(type) {
		case *http2.DataFrame:
			got += len(f.Data())
		case *http2.RSTStreamFrame:
			t.Fatalf("stream reset: %v", f.ErrCode)
		case *http2.MetaHeadersFrame:
			return f.StreamEnded()
		}
		return false
	}).(*http2.MetaHeadersFrame)
	if st := end.PseudoValue("status"); st != "" || len(end.Fields) == 0 || end.Fields[0].Value != "0" {
		t.Errorf("trailers %v, want grpc-status 0", end.Fields)
	}
	if got < size {
		t.Errorf("received %d response bytes, want at least %d", got, size)
	}
}

// TestConnWindowUpdateReachesBackend: when a client stops reading, the
// backend connection's window must still be returned for the bytes the
// proxy took in, or every other stream on that backend connection stalls.
func TestConnWindowUpdateReachesBackend(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		c.StreamWindow = 65535
		c.ConnWindow = 65535
	}})
	ctx := testkit.Context(t, 20*time.Second)
	params := make([]*testgrpc.ResponseParameters, 6)
	for i := range params {
		params[i] = &testgrpc.ResponseParameters{Size: 20000, IntervalUs: 100000}
	}
	st, err := e.client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{ResponseParameters: params})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); err != nil {
		t.Fatal(err)
	}
	// A second client that grants no stream window takes a large answer
	// on the same backend connection.
	r := dialRaw(t, e.addr)
	r.fr.WriteWindowUpdate(0, 1<<30)
	r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
	r.headers(1, "/grpc.testing.TestService/UnaryCall", false)
	r.fr.WriteData(1, true, grpcMsg(&testgrpc.SimpleRequest{ResponseSize: 1 << 20}))
	go io.Copy(io.Discard, r.nc)
	for i := 1; i < len(params); i++ {
		if _, err := st.Recv(); err != nil {
			t.Fatalf("message %d of the first stream: %v (stalled behind the client that does not read?)", i, err)
		}
	}
}

// TestShutdownClosesIdleClient: after GOAWAY a drained connection is
// closed by the proxy, even if the client would keep it open.
func TestShutdownClosesIdleClient(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	r := dialRaw(t, e.addr)
	r.next(func(f http2.Frame) bool { _, ok := f.(*http2.SettingsFrame); return ok })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.srv.Shutdown(ctx); err != nil {
		t.Errorf("Shutdown with an idle client that keeps its connection: %v", err)
	}
	r.next(func(f http2.Frame) bool { _, ok := f.(*http2.GoAwayFrame); return ok })
	for {
		if _, err := r.fr.ReadFrame(); err != nil {
			break // closed, as it should be
		}
	}
}

// TestBackendWithoutHTTP2: a backend that accepts TCP but never sends
// SETTINGS does not hold calls: they go to another backend.
func TestBackendWithoutHTTP2(t *testing.T) {
	verifyNoLeaks(t)
	mute := muteBackend(t)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.ConnectTimeout = 200 * time.Millisecond }})
	e.setBackends(mute, e.backends[0].Addr())
	ctx := testkit.Context(t, 20*time.Second)
	for i := range 4 {
		if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
	}
}

// TestHandshakeWaitFollowsDeadline: a call waits on a backend's unfinished
// handshake at most a quarter of what its grpc-timeout leaves
// (Config.HandshakeTimeout), its first attempt too, then goes to another
// backend. The first attempt used to be started before the deadline was
// noted, so it waited the whole HandshakeTimeout and the call ended
// DEADLINE_EXCEEDED on a backend that never answered.
func TestHandshakeWaitFollowsDeadline(t *testing.T) {
	verifyNoLeaks(t)
	mute := muteBackend(t)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.HandshakeTimeout = time.Minute }})
	e.setBackends(mute, e.backends[0].Addr())
	ctx := testkit.Context(t, 20*time.Second)
	// Each rotation over the two backends picks the mute one once.
	for i := range 4 {
		call, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := e.client.EmptyCall(call, &testgrpc.Empty{})
		cancel()
		if err != nil {
			t.Fatalf("call %d: %v, want it answered by the serving backend", i, err)
		}
	}
}

// muteBackend is the address of a backend that accepts TCP connections
// and never sends a byte: no SETTINGS, so no handshake ever finishes.
func muteBackend(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan net.Conn, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- c
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		for c := range accepted {
			c.Close()
		}
	})
	return ln.Addr().String()
}

// TestBackendWithoutHTTP2Status: with no other backend, a call on a
// backend that never sends its SETTINGS fails UNAVAILABLE saying so, not
// with the "use of closed network connection" its reader saw when the
// proxy closed the connection.
func TestBackendWithoutHTTP2Status(t *testing.T) {
	verifyNoLeaks(t)
	mute := muteBackend(t)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.HandshakeTimeout = 300 * time.Millisecond }})
	e.setBackends(mute)
	ctx := testkit.Context(t, 20*time.Second)
	_, err := e.client.EmptyCall(ctx, &testgrpc.Empty{})
	if status.Code(err) != codes.Unavailable || !(strings.Contains(err.Error(), "SETTINGS") || strings.Contains(err.Error(), "handshake")) || strings.Contains(err.Error(), "closed network connection") {
		t.Errorf("call on a backend that never speaks HTTP/2: %v, want UNAVAILABLE naming the missing handshake", err)
	}
}
