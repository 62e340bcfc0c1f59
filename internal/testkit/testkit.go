// Package testkit holds the few helpers that tests of several streamlb
// packages share: a bounded context, polling for a condition, an address
// that refuses connections, a loopback server for hand-written peers, a
// TCP forwarder that stands for a server moving between addresses, a
// certificate authority made in the test and the acknowledgements a raw
// HTTP/2 peer owes.
// It is imported only by tests and imports nothing of streamlb's.
package testkit

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"
)

// Context returns a context that ends after d or when the test ends,
// whichever is first, so that no test hangs.
func Context(t testing.TB, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// WaitFor polls cond every millisecond until it holds, and fails the test
// if ctx ends first. It never waits a fixed time (grpc-go's
// roundrobin.CheckRoundRobinRPCs habit).
func WaitFor(ctx context.Context, t testing.TB, what string, cond func() bool) {
	t.Helper()
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s", what)
		case <-tick.C:
		}
	}
}

// DeadAddr returns a loopback address that refuses connections: bound,
// then closed (Caddy's deadUpstreamAddr). Another process may take the port
// later; tests that start a server on it count on that being rare.
func DeadAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// FreeAddr returns a loopback address, "127.0.0.1:PORT", that was free a
// moment ago: for a server the test starts as a process of its own, or
// that needs its address before it listens.
func FreeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// ServeTCP listens on a loopback port and runs handle on a goroutine of
// its own for each connection accepted, until the test ends: then the
// listener and every connection are closed, and it waits for the accept
// loop and the handlers, which must return once their connection is
// closed. It returns the listener's address: a backend that speaks raw
// TCP or hand-written HTTP/2 frames.
func ServeTCP(t testing.TB, handle func(c net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	closed := false
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		closed = true
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			if closed {
				// Accepted as the test ended: no handler to wait for.
				mu.Unlock()
				c.Close()
				return
			}
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				handle(c)
			}()
		}
	}()
	return ln.Addr().String()
}
