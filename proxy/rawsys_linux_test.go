//go:build linux

package proxy

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"
)

// TestWrapSocketMovesBytes writes more than the kernel's socket buffers
// hold through a wrapped socket, so its writes meet EAGAIN and wait in the
// netpoller, and reads them back through another wrapped socket.
func TestWrapSocketMovesBytes(t *testing.T) {
	a, b := tcpPair(t)
	wa, wb := WrapSocket(a), WrapSocket(b)
	if _, ok := wa.(*rawTCPConn); !ok {
		t.Fatalf("WrapSocket(*net.TCPConn) = %T, want *rawTCPConn", wa)
	}
	want := make([]byte, 16<<20)
	for i := range want {
		want[i] = byte(i * 7)
	}
	errc := make(chan error, 1)
	go func() {
		n, err := wa.Write(want)
		if err == nil && n != len(want) {
			err = io.ErrShortWrite
		}
		if err == nil {
			err = a.(*net.TCPConn).CloseWrite()
		}
		errc <- err
	}()
	wb.SetReadDeadline(time.Now().Add(30 * time.Second))
	got, err := io.ReadAll(wb)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("write: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("read %d bytes, not the %d written", len(got), len(want))
	}
}

// TestWrapSocketDeadlines: deadlines and Close work as on the plain
// socket, with the same errors.
func TestWrapSocketDeadlines(t *testing.T) {
	a, b := tcpPair(t)
	wa, wb := WrapSocket(a), WrapSocket(b)

	wb.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	_, err := wb.Read(make([]byte, 10))
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past the deadline: %v, want a timeout", err)
	}

	// Nobody reads b: writes fill both kernel buffers, then time out.
	wa.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
	n, err := wa.Write(make([]byte, 64<<20))
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("write past the deadline: n=%d err=%v, want a timeout", n, err)
	}
	if n <= 0 || n >= 64<<20 {
		t.Fatalf("write past the deadline wrote %d bytes, want some but not all", n)
	}

	wa.Close()
	wb.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.Copy(io.Discard, wb); err != nil {
		t.Fatalf("reading to the peer's close: %v, want EOF (nil from io.Copy)", err)
	}
	if _, err := wa.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("write after Close: %v, want net.ErrClosed", err)
	}
}

// TestWrapSocketLeavesOthers: only plain TCP connections are wrapped.
func TestWrapSocketLeavesOthers(t *testing.T) {
	p1, p2 := net.Pipe()
	defer p1.Close()
	defer p2.Close()
	if got := WrapSocket(p1); got != p1 {
		t.Fatalf("WrapSocket(pipe) = %T, want the pipe itself", got)
	}
}

// TestDataPlaneUsesRawSyscalls: the data plane writes a plain socket
// through rawSock and reads it through RawConn (whose callback uses
// rawRead), so its read(2) and write(2) do not wake sysmon.
func TestDataPlaneUsesRawSyscalls(t *testing.T) {
	a, _ := tcpPair(t)
	if w := newConnWriter(a); w.out == nil {
		t.Fatal("connWriter has no output")
	} else if _, ok := w.out.(*rawSock); !ok {
		t.Fatalf("connWriter of a TCP socket writes through %T, want *rawSock", w.out)
	}
	if r := newConnReader(a); r.raw == nil {
		t.Fatal("connReader of a TCP socket does not read through RawConn")
	}
}
