//go:build unix

package proxy_test

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestGoAwayReachesSlowReader: a client whose connection ends in a
// connection error (here the glitch budget, spent on header lists over
// the limit) while it is still sending, and that reads the proxy's
// answers slowly (a 4 KiB receive buffer, 25 KB/s), still gets the GOAWAY
// that says why. It takes the proxy's writer more than a second to get
// through the answers queued before it. Before, the reader gave the
// writer a second, then closed the socket with the client's frames unread,
// so the kernel answered with a TCP RST and dropped what the client had
// not taken yet: the client saw "connection reset by peer" and no GOAWAY.
// The reader now waits while the writer makes progress, reading and
// dropping what the client sends (transport.drainAfterError).
func TestGoAwayReachesSlowReader(t *testing.T) {
	verifyNoLeaks(t)
	const call = "/grpc.testing.TestService/UnaryCall"
	huge := []string{testserver.MetadataHang, "1"}
	for range 70 {
		huge = append(huge, "x-a", strings.Repeat("v", 1000))
	}
	// The linger after the GOAWAY is long enough for the slow client
	// to read up to it on a loaded machine; what comes after it, the
	// proxy's close, resets a client still sending.
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.ShutdownLinger = 10 * time.Second }})
	r := dialRaw(t, e.addr)
	if err := r.nc.(*net.TCPConn).SetReadBuffer(4 << 10); err != nil {
		t.Fatal(err)
	}
	r.nc.SetReadDeadline(time.Now().Add(30 * time.Second))
	r.fr = http2.NewFramer(r.nc, bufio.NewReader(&pacedReader{r: r.nc, n: 256, every: 10 * time.Millisecond}))
	r.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	w := newReqWriter(r)
	start := time.Now()
	sent := r.flood(4096, func(i int) error { return w.write(uint32(2*i+1), call, huge...) })
	g := r.awaitGoAway()
	r.nc.Close()
	<-sent
	if g == nil || g.ErrCode != http2.ErrCodeEnhanceYourCalm {
		t.Fatalf("got GOAWAY %+v after %v, want ENHANCE_YOUR_CALM", g, time.Since(start))
	}
	t.Logf("GOAWAY (last stream %d) read after %v", g.LastStreamID, time.Since(start))
}

// pacedReader reads at most n bytes per every.
type pacedReader struct {
	r     io.Reader
	n     int
	every time.Duration
}

func (p *pacedReader) Read(b []byte) (int, error) {
	time.Sleep(p.every)
	return p.r.Read(b[:min(len(b), p.n)])
}

// TestConnErrorNonReaderClosed: a client that does not read, with
// streams of responses queued toward it, then makes a connection error:
// the proxy closes it within a couple of seconds, although its reader
// now goes on draining the client's bytes after the error
// (drainAfterError): once the writer has written the GOAWAY into the
// socket's buffer, at the end of its linger (ShutdownLinger); if it is
// stuck in a write, once the write moved no byte for a second; never
// at drainAfterError's ten-second bound. Which of the two it takes
// depends on where the writer is at the error: in runs measured it was
// between writes, wrote the GOAWAY and closed at the end of its 1 s
// linger, also with the stuck-write judgement disabled;
// TestConnErrorStuckWriterClosed waits for a blocked write and tests
// that judgement alone.
func TestConnErrorNonReaderClosed(t *testing.T) {
	verifyNoLeaks(t)
	addr := rawStreamServer(t)
	srv, err := proxy.New(proxy.Config{Picker: pickerTo(addr), Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	ln := serveProxy(t, srv)
	ctx := testkit.Context(t, 30*time.Second)
	r := dialTiny(t, ln.Addr().String())
	const streams = 8
	for i := range streams {
		id := uint32(2*i + 1)
		r.headers(id, "/x.Y/Z", false)
		r.fr.WriteData(id, true, streamRequest(uint32(i), 4000, 16379, 8000, 5000))
	}
	testkit.WaitFor(ctx, t, "a blocked writer", func() bool { return srv.MaxBufferedBytes() > 100_000 })
	// A WINDOW_UPDATE of 0 on the connection: a connection error
	// PROTOCOL_ERROR (RFC 9113 §6.9).
	r.fr.AllowIllegalWrites = true
	if err := r.fr.WriteWindowUpdate(0, 0); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	testkit.WaitFor(ctx, t, "the connection to close", func() bool { return srv.ClientConns() == 0 })
	if d := time.Since(start); d > 6*time.Second {
		t.Errorf("closed %v after the connection error", d)
	}
	t.Logf("closed %v after the connection error", time.Since(start))
}

// TestConnErrorStuckWriterClosed is drainAfterError's stuck-write path on
// its own: a client that does not read (a 4 KiB receive buffer), with
// responses queued toward it, blocks the proxy's writer in a socket write;
// it then makes a connection error, so the GOAWAY is queued behind that
// write and can never be written, and goes on sending (a PING every few
// milliseconds: the reader's drain always has bytes to read). Nothing but
// the stuck-write judgement can end the connection soon: the write
// timeout is off, the linger a minute, and goAwayMaxWait (10 s) is the
// bound it must beat. The proxy must close the connection after one or two
// goAwayWait (1 s) of a write that moved no byte, well within
// goAwayMaxWait; its writer goroutine must be gone once it did, and the
// client, reading at last, must find the socket closed (EOF or reset, not
// a read that waits).
func TestConnErrorStuckWriterClosed(t *testing.T) {
	for _, tc := range []struct {
		name   string
		opaque bool
	}{{"plain", false}, {"opaque", true}} {
		t.Run(tc.name, func(t *testing.T) { testConnErrorStuckWriterClosed(t, tc.opaque) })
	}
}

// testConnErrorStuckWriterClosed is TestConnErrorStuckWriterClosed on a
// socket the proxy's writer writes with raw system calls, or, opaque, on
// one it writes through progressWriter.
func testConnErrorStuckWriterClosed(t *testing.T, opaque bool) {
	verifyNoLeaks(t)
	addr := rawStreamServer(t)
	srv, err := proxy.New(proxy.Config{Picker: pickerTo(addr), Logger: quietLog,
		WriteTimeout: -1, ShutdownLinger: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serveOn(t, srv, sockListener{ln, 0, opaque})
	ctx := testkit.Context(t, 40*time.Second)
	writers0, _ := goroutinesIn(writerFrame) // left by earlier tests, if any
	r := dialTiny(t, ln.Addr().String())
	r.nc.SetDeadline(time.Now().Add(40 * time.Second))
	const streams = 8
	for i := range streams {
		id := uint32(2*i + 1)
		r.headers(id, "/x.Y/Z", false)
		r.fr.WriteData(id, true, streamRequest(uint32(i), 4000, 16379, 8000, 5000))
	}
	// Until the writer waits for the socket to take more: the client
	// never reads, so it waits for good, and what it queues next, the
	// GOAWAY among it, is never written. (Data queued on the streams is
	// not enough: a writer between writes, with room in the socket,
	// writes the GOAWAY and lingers, ShutdownLinger.)
	testkit.WaitFor(ctx, t, "the writer blocked in a socket write", func() bool {
		return srv.MaxBufferedBytes() > 100_000 && writersWaitingToWrite() > 0
	})
	if w, _ := goroutinesIn(writerFrame); w <= writers0 {
		t.Fatalf("%d writer goroutines with a writer blocked, %d before the client came", w, writers0)
	}
	// A WINDOW_UPDATE of 0 on the connection: a connection error
	// PROTOCOL_ERROR (RFC 9113 §6.9).
	r.fr.AllowIllegalWrites = true
	if err := r.fr.WriteWindowUpdate(0, 0); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	stop := make(chan struct{})
	pinged := make(chan int, 1)
	go func() {
		n := 0
		defer func() { pinged <- n }()
		tk := time.NewTicker(5 * time.Millisecond)
		defer tk.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tk.C:
			}
			if r.fr.WritePing(false, [8]byte{byte(n)}) != nil {
				return // the proxy closed the connection
			}
			n++
		}
	}()
	testkit.WaitFor(ctx, t, "the connection to close", func() bool { return srv.ClientConns() == 0 })
	closed := time.Since(start)
	close(stop)
	n := <-pinged
	t.Logf("closed %v after the connection error; %d PINGs sent meanwhile", closed, n)
	// Stuck from the first look: closed at the second, after goAwayWait;
	// at the third if the writer only blocked after the first. 5 s leaves
	// room for a loaded race build and is half of goAwayMaxWait.
	if closed > 5*time.Second {
		t.Errorf("closed %v after the connection error, want the stuck write judged within 2 x goAwayWait (1 s), long before goAwayMaxWait (10 s)", closed)
	}
	testkit.WaitFor(ctx, t, "the writer goroutine to exit", func() bool {
		w, _ := goroutinesIn(writerFrame)
		return w <= writers0
	})
	// The socket is closed: what the proxy's kernel still had for the
	// client comes, then the end, or a reset (our PINGs were unread).
	r.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.Copy(io.Discard, r.nc)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("connection still open after the proxy ended it (%d bytes read): %v", got, err)
	}
	t.Logf("read %d bytes, then %v", got, err)
}

// writersWaitingToWrite counts the client connections' writer goroutines
// that wait in the netpoller for their socket to take more bytes.
func writersWaitingToWrite() int {
	buf := make([]byte, 1<<20)
	for {
		k := runtime.Stack(buf, true)
		if k < len(buf) {
			buf = buf[:k]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	n := 0
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		if bytes.Contains(g, []byte(writerFrame)) && bytes.Contains(g, []byte("waitWrite")) {
			n++
		}
	}
	return n
}

// TestGoAwayReachesSlowReaderStreams: a client that stopped reading, with
// the proxy's writer blocked in a write of stream data toward it, makes a
// connection error and then reads again, slowly (50 KB/s, a 4 KiB
// receive buffer; the proxy's send buffer is 8 KiB, so what is in flight
// is mostly in the writer's hands). It must get the GOAWAY, on a plain
// socket and on one the writer cannot write with raw system calls (TLS,
// and every platform but Linux, write through progressWriter). There a
// Write of the whole 64 KiB buffer counted as one step of progress, took
// more than a second at that pace, and drainAfterError took the writer
// for stuck on a client that does not read: it closed the connection
// before the GOAWAY went (3 runs of 4 failed, "unexpected EOF").
func TestGoAwayReachesSlowReaderStreams(t *testing.T) {
	for _, tc := range []struct {
		name   string
		opaque bool
	}{{"plain", false}, {"opaque", true}} {
		t.Run(tc.name, func(t *testing.T) {
			verifyNoLeaks(t)
			addr := rawStreamServer(t)
			srv, err := proxy.New(proxy.Config{Picker: pickerTo(addr), Logger: quietLog, ShutdownLinger: 10 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			serveOn(t, srv, sockListener{ln, 8 << 10, tc.opaque})
			ctx := testkit.Context(t, 30*time.Second)
			r := dialTiny(t, ln.Addr().String())
			for i := range 4 {
				id := uint32(2*i + 1)
				r.headers(id, "/x.Y/Z", false)
				r.fr.WriteData(id, true, streamRequest(uint32(i), 4000, 16379, 8000, 5000))
			}
			testkit.WaitFor(ctx, t, "the writer blocked in a socket write", func() bool {
				return srv.MaxBufferedBytes() > 10_000 && writersWaitingToWrite() > 0
			})
			// A WINDOW_UPDATE of 0 on the connection: a connection
			// error PROTOCOL_ERROR (RFC 9113 §6.9).
			r.fr.AllowIllegalWrites = true
			if err := r.fr.WriteWindowUpdate(0, 0); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			r.fr = http2.NewFramer(r.nc, bufio.NewReader(&pacedReader{r: r.nc, n: 256, every: 5 * time.Millisecond}))
			r.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
			r.fr.MaxHeaderListSize = 1 << 20
			for n := 0; ; n++ {
				f, err := r.fr.ReadFrame()
				if err != nil {
					t.Fatalf("read %d frames, then %v, %v after the connection error: no GOAWAY", n, err, time.Since(start))
				}
				if g, ok := f.(*http2.GoAwayFrame); ok {
					if g.ErrCode != http2.ErrCodeProtocol {
						t.Errorf("GOAWAY %v, want PROTOCOL_ERROR", g.ErrCode)
					}
					t.Logf("GOAWAY after %d frames, %v after the connection error", n, time.Since(start))
					return
				}
			}
		})
	}
}

// sockListener gives the connections it accepts a send buffer of sendBuf
// bytes (0: the kernel's) and, if opaque is set, hides their socket from
// the proxy (opaqueConn), whose writer then writes them through
// progressWriter, as it writes TLS and every socket off Linux.
type sockListener struct {
	net.Listener
	sendBuf int
	opaque  bool
}

func (l sockListener) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	if l.sendBuf > 0 {
		nc.(*net.TCPConn).SetWriteBuffer(l.sendBuf)
	}
	if l.opaque {
		return opaqueConn{nc}, nil
	}
	return nc, nil
}
