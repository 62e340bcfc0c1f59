package testkit

import (
	"io"
	"net"
	"sync"
	"testing"
)

// Forwarder relays the TCP connections it accepts on its address to
// another: a server (ZooKeeper, say) reachable at a second address, as a
// name that moves between hosts sees it. Close stops it, its connections
// with it, as a server that went away; the test's end closes it too.
type Forwarder struct {
	ln       net.Listener
	to       string
	wg       sync.WaitGroup
	mu       sync.Mutex // guards the fields below
	conns    []net.Conn
	accepted int
}

// StartForwarder listens on addr and relays each connection to to.
func StartForwarder(t testing.TB, addr, to string) *Forwarder {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	f := &Forwarder{ln: ln, to: to}
	f.wg.Add(1)
	go f.acceptLoop()
	t.Cleanup(f.Close)
	return f
}

// Addr is the address the forwarder listens on.
func (f *Forwarder) Addr() string { return f.ln.Addr().String() }

func (f *Forwarder) acceptLoop() {
	defer f.wg.Done()
	for {
		c, err := f.ln.Accept()
		if err != nil {
			return
		}
		up, err := net.Dial("tcp", f.to)
		if err != nil {
			c.Close()
			continue
		}
		f.mu.Lock()
		f.conns = append(f.conns, c, up)
		f.accepted++
		f.mu.Unlock()
		f.wg.Add(2)
		go f.copy(up, c)
		go f.copy(c, up)
	}
}

func (f *Forwarder) copy(dst, src net.Conn) {
	defer f.wg.Done()
	_, _ = io.Copy(dst, src)
	dst.Close()
	src.Close()
}

// Accepted counts the connections relayed so far.
func (f *Forwarder) Accepted() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.accepted
}

// Close stops listening, closes every connection and waits for the relays.
func (f *Forwarder) Close() {
	f.ln.Close()
	f.mu.Lock()
	for _, c := range f.conns {
		c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
}
