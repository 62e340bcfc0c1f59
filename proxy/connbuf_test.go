package proxy

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"testing"
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
