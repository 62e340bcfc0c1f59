package proxy

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

// chunkConn is a net.Conn whose reads return the scripted chunks one by
// one (each at most as long as the caller's slice), then err.
type chunkConn struct {
	net.Conn
	chunks [][]byte
	err    error
	writes bytes.Buffer
}

func (c *chunkConn) Read(p []byte) (int, error) {
	if len(c.chunks) == 0 {
		return 0, c.err
	}
	n := copy(p, c.chunks[0])
	c.chunks[0] = c.chunks[0][n:]
	if len(c.chunks[0]) == 0 {
		c.chunks = c.chunks[1:]
	}
	return n, nil
}

func (c *chunkConn) Write(p []byte) (int, error) { return c.writes.Write(p) }

func TestConnReader(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		chunks []int // sizes of what the socket has ready at each read
		reads  []int // sizes the caller asks for, cycled
	}{
		{name: "frame headers and small payloads", chunks: []int{9, 100, 9, 5, 300}, reads: []int{9, 100, 9, 5}},
		{name: "burst larger than the small buffer", chunks: []int{40000, 10}, reads: []int{9, 16384}},
		{name: "exactly the small buffer", chunks: []int{smallReadSize, smallReadSize, 7}, reads: []int{9, 3}},
		{name: "large reads go straight through", chunks: []int{70000}, reads: []int{connBufSize + 1, 9}},
		{name: "one byte at a time", chunks: []int{1, 1, 1, 1, 1, 1}, reads: []int{2}},
		{name: "burst then trickle", chunks: []int{50000, 30, 9, 20}, reads: []int{9, 1000, 9}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			rng := rand.New(rand.NewPCG(1, 2))
			var want []byte
			conn := &chunkConn{err: io.EOF}
			for _, n := range tc.chunks {
				b := make([]byte, n)
				for i := range b {
					b[i] = byte(rng.IntN(256))
				}
				want = append(want, b...)
				conn.chunks = append(conn.chunks, b)
			}
			r := newConnReader(conn)
			var got []byte
			for i := 0; ; i++ {
				p := make([]byte, tc.reads[i%len(tc.reads)])
				n, err := r.Read(p)
				got = append(got, p[:n]...)
				if r.r == r.w && r.big != nil && !r.burst {
					t.Fatalf("read %d: drained after a small fill, but the pooled buffer is still held", i)
				}
				if err != nil {
					if !errors.Is(err, io.EOF) {
						t.Fatalf("read %d: err %v, want io.EOF", i, err)
					}
					break
				}
				if i > 1_000_000 {
					t.Fatal("no EOF")
				}
			}
			if !bytes.Equal(got, want) {
				t.Errorf("got %d bytes, want %d, or they differ", len(got), len(want))
			}
			if r.big != nil {
				t.Error("pooled buffer held at EOF")
			}
		})
	}
}

// TestConnReaderErrorAfterBytes checks that an error that comes with bytes
// is returned after them, once, as bufio.Reader does.
func TestConnReaderErrorAfterBytes(t *testing.T) {
	t.Parallel()
	conn := &errWithBytesConn{data: []byte("abcdef"), err: io.ErrUnexpectedEOF}
	r := newConnReader(conn)
	p := make([]byte, 4)
	n, err := r.Read(p)
	if n != 4 || err != nil || string(p[:n]) != "abcd" {
		t.Fatalf("first read: %d %v %q, want 4 nil abcd", n, err, p[:n])
	}
	n, err = r.Read(p)
	if n != 2 || err != nil || string(p[:n]) != "ef" {
		t.Fatalf("second read: %d %v %q, want 2 nil ef", n, err, p[:n])
	}
	if n, err = r.Read(p); n != 0 || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("third read: %d %v, want 0 %v", n, err, io.ErrUnexpectedEOF)
	}
}

type errWithBytesConn struct {
	net.Conn
	data []byte
	err  error
}

func (c *errWithBytesConn) Read(p []byte) (int, error) {
	n := copy(p, c.data)
	c.data = c.data[n:]
	return n, c.err
}

func TestConnWriter(t *testing.T) {
	t.Parallel()
	conn := &chunkConn{}
	w := newConnWriter(conn)
	if err := w.Flush(); err != nil {
		t.Fatalf("flush of nothing: %v", err)
	}
	if _, err := w.WriteString("PRI"); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte(" * HTTP/2.0")); err != nil {
		t.Fatal(err)
	}
	if w.bw == nil || conn.writes.Len() != 0 {
		t.Fatalf("before flush: buffer held %v, %d bytes written; want held, 0", w.bw != nil, conn.writes.Len())
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if got, want := conn.writes.String(), "PRI * HTTP/2.0"; got != want {
		t.Errorf("written %q, want %q", got, want)
	}
	if w.bw != nil {
		t.Error("after flush the pooled buffer is still held")
	}
}

// TestConnReaderLetsGoWhenQuiet checks the point of connReader: after a
// burst, a fill that brings little releases the pooled buffer, so a
// connection waiting for its next frame holds only its small buffer.
func TestConnReaderLetsGoWhenQuiet(t *testing.T) {
	t.Parallel()
	conn := &chunkConn{chunks: [][]byte{make([]byte, 3*connBufSize/2), make([]byte, 17)}, err: io.EOF}
	r := newConnReader(conn)
	p := make([]byte, 9)
	total := 0
	for total < 3*connBufSize/2 {
		n, err := r.Read(p)
		if err != nil {
			t.Fatal(err)
		}
		total += n
	}
	if r.big == nil {
		t.Fatal("during the burst: no pooled buffer; want one kept between fills")
	}
	for total < 3*connBufSize/2+17 {
		n, err := r.Read(p)
		if err != nil {
			t.Fatal(err)
		}
		total += n
	}
	if r.big != nil {
		t.Error("after a 17-byte fill drained: pooled buffer still held")
	}
}

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	return tcpPairWith(t, net.ListenConfig{}, net.Dialer{})
}

// tcpPairWith is tcpPair with the listener and the client socket made by
// lc and d (their Control functions can set socket options before the
// connection is made).
func tcpPairWith(t *testing.T, lc net.ListenConfig, d net.Dialer) (client, server net.Conn) {
	t.Helper()
	ln, err := lc.Listen(t.Context(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	client, err = d.DialContext(t.Context(), "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server = <-accepted
	if server == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// TestConnReaderRaw reads a plain socket through syscall.RawConn: the
// bytes come through whole and in order, whatever the sizes of writes and
// reads, and EOF ends them.
func TestConnReaderRaw(t *testing.T) {
	t.Parallel()
	client, server := tcpPair(t)
	r := newConnReader(server)
	if r.raw == nil {
		t.Fatal("a *net.TCPConn is not read raw")
	}
	rng := rand.New(rand.NewPCG(3, 4))
	want := make([]byte, 300_000)
	for i := range want {
		want[i] = byte(rng.IntN(256))
	}
	done := make(chan error, 1)
	go func() {
		rest := want
		for len(rest) > 0 {
			k := min(len(rest), 1+rng.IntN(40_000))
			if _, err := client.Write(rest[:k]); err != nil {
				done <- err
				return
			}
			rest = rest[k:]
		}
		done <- client.Close()
	}()
	var got []byte
	sizes := []int{9, 16384, 9, 100, 1, 9, 70000}
	for i := 0; ; i++ {
		p := make([]byte, sizes[i%len(sizes)])
		n, err := r.Read(p)
		got = append(got, p[:n]...)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("read %d: %v", i, err)
		}
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("got %d bytes, want %d, or they differ", len(got), len(want))
	}
	if r.big != nil {
		t.Error("pooled buffer held after EOF")
	}
}

// TestConnReaderRawLetsGoWhileWaiting checks that a raw reader that has
// drained its buffer gives it back when it has to wait for the socket,
// and that read deadlines and Close still end the wait with the usual
// errors.
func TestConnReaderRawLetsGoWhileWaiting(t *testing.T) {
	t.Parallel()
	client, server := tcpPair(t)
	r := newConnReader(server)
	if _, err := client.Write(make([]byte, 5000)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(r, make([]byte, 5000)); err != nil {
		t.Fatal(err)
	}
	server.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if _, err := r.Read(make([]byte, 9)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past the deadline: %v, want %v", err, os.ErrDeadlineExceeded)
	}
	if r.big != nil {
		t.Error("the reader waited on an empty socket holding a pooled buffer")
	}
	server.SetReadDeadline(time.Time{})
	if _, err := client.Write([]byte("after")); err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 5)
	if _, err := io.ReadFull(r, p); err != nil || string(p) != "after" {
		t.Fatalf("read after the deadline: %q %v, want \"after\" nil", p, err)
	}
	server.Close()
	if _, err := r.Read(p); !errors.Is(err, net.ErrClosed) {
		t.Errorf("read after Close: %v, want %v", err, net.ErrClosed)
	}
}

// TestConnReaderRawReset checks that a reset connection reads as the same
// kind of error net.Conn.Read returns.
func TestConnReaderRawReset(t *testing.T) {
	t.Parallel()
	client, server := tcpPair(t)
	r := newConnReader(server)
	client.(*net.TCPConn).SetLinger(0) // close with RST
	client.Write([]byte("x"))
	client.Close()
	var err error
	for err == nil {
		_, err = r.Read(make([]byte, 9))
	}
	var op *net.OpError
	reset := errors.As(err, &op) && errors.Is(err, syscall.ECONNRESET)
	if !reset && !errors.Is(err, io.EOF) {
		t.Errorf("read of a reset connection: %v (%T), want a *net.OpError with ECONNRESET, or EOF", err, err)
	}
}
