package director

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/streamlb/streamlb/resolver"
)

// TestAtkProberHonoursCancel: without health checks, a backend ejected
// after connection failures is probed with handshakes bounded by
// HealthCheckTimeout. When the backend accepts TCP but never answers (a
// black hole) and Run is cancelled mid-probe, Run must return promptly and
// close the probe's connection, not wait the whole timeout; likewise a
// backend that leaves the set must not keep a connection open to it.
func TestProberHonoursCancel(t *testing.T) {
	srv := startBackends(t, 2)
	bh := newBlackHole(t)
	addr := bh.ln.Addr().String()
	d, err := New(Config{Logger: discardLogger(), HealthCheckTimeout: 20 * time.Second, MaxEjectionPercent: 100})
	if err != nil {
		t.Fatal(err)
	}
	st := stateOf(srv...)
	st.Addresses = append(st.Addresses, resolver.Address{Addr: addr})
	mustUpdate(t, d, st)
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- d.Run(ctx) }()
	returned := false
	defer func() {
		cancel()
		if !returned {
			select {
			case <-errc:
			case <-time.After(30 * time.Second):
			}
		}
	}()
	failN(t, d, addr, errRefused, 3)
	waitFor(t, 5*time.Second, "black hole ejected", func() bool { return ejectedOf(d, addr) })
	waitFor(t, 5*time.Second, "probe connected", func() bool { return bh.open.Load() >= 1 })

	// The backend leaves the set: its prober is cancelled.
	mustUpdate(t, d, stateOf(srv...))
	if took := waitForOK(3*time.Second, func() bool { return bh.closed.Load() == bh.open.Load() }); took < 0 {
		t.Errorf("removed backend's probe connection still open 3s after it left the set (%d open, %d closed)", bh.open.Load(), bh.closed.Load())
	}

	// Again, and Run is cancelled mid-probe.
	mustUpdate(t, d, st)
	failN(t, d, addr, errRefused, 3)
	waitFor(t, 5*time.Second, "black hole ejected again", func() bool { return ejectedOf(d, addr) })
	n := bh.open.Load()
	waitFor(t, 5*time.Second, "probe connected again", func() bool { return bh.open.Load() > n })
	start := time.Now()
	cancel()
	select {
	case <-errc:
		returned = true
		if took := time.Since(start); took > 2*time.Second {
			t.Errorf("Run returned %v after cancel, want promptly", took)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return")
	}
}

// waitForOK polls cond until it holds (returns the time taken) or within
// passes (returns -1).
func waitForOK(within time.Duration, cond func() bool) time.Duration {
	start := time.Now()
	for !cond() {
		if time.Since(start) > within {
			return -1
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}

// blackHole accepts TCP connections and never writes.
type blackHole struct {
	ln     net.Listener
	mu     sync.Mutex
	conns  []net.Conn
	open   atomic.Int64
	closed atomic.Int64
}

func newBlackHole(t *testing.T) *blackHole {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &blackHole{ln: ln}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.open.Add(1)
			b.mu.Lock()
			b.conns = append(b.conns, c)
			b.mu.Unlock()
			go func() {
				buf := make([]byte, 4096)
				for {
					if _, err := c.Read(buf); err != nil {
						b.closed.Add(1)
						return
					}
				}
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		b.mu.Lock()
		for _, c := range b.conns {
			c.Close()
		}
		b.mu.Unlock()
	})
	return b
}
