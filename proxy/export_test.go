package proxy

import (
	"slices"
	"time"
)

// RefusedConns reports the connections refused over MaxConnections, for
// tests.
func (s *Server) RefusedConns() int64 { return s.refusals.refused() }

// ClientConns reports the client connections being served, for tests.
func (s *Server) ClientConns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// MaxBufferedBytes reports the largest buffer budget use (budget.go) of
// any of its client connections now, for tests.
func (s *Server) MaxBufferedBytes() int64 {
	return s.maxOverConns(func(c *serverConn) int64 { return c.bufs.used.Load() })
}

// AnyWindowWithheld reports whether a client connection withholds its
// connection window for its buffer budget, for tests.
func (s *Server) AnyWindowWithheld() bool {
	return s.maxOverConns(func(c *serverConn) int64 {
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.withheld {
			return 1
		}
		return 0
	}) > 0
}

// MaxHeldBytes reports the largest count of request bytes held by any of
// its client connections now, for tests.
func (s *Server) MaxHeldBytes() int64 {
	return s.maxOverConns(func(c *serverConn) int64 {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.held
	})
}

// SetAfterReserve sets a hook called, with the client connection's lock
// held, between reserving a stream slot on a backend connection to addr
// and queueing the attempt on it. Call before Serve.
func SetAfterReserve(s *Server, fn func(addr string)) { s.afterReserve = fn }

// SetBeforeWatchQueue sets a hook called, with the client connection's
// lock held, between queueing an attempt that may wait for a slot on a
// backend connection to addr and bounding its wait. Call before Serve.
func SetBeforeWatchQueue(s *Server, fn func(addr string)) { s.beforeWatchQueue = fn }

// SetBeforeEarlyReset sets a hook called between queueing toward the
// client an answer that came before its request was all sent and
// resetting the backend's stream. Call before Serve.
func SetBeforeEarlyReset(s *Server, fn func()) { s.beforeEarlyReset = fn }

// WriterStarts reports how many writer goroutines client connections
// started, for tests.
func (s *Server) WriterStarts() int64 { return s.writerStarts.Load() }

// BackendPings reports the keepalive PINGs sent to backends, for tests.
func (s *Server) BackendPings() int64 { return s.pool.pings.Load() }

// BackendConns reports how many connections to the backend at addr the
// pool holds, for tests: zero once the proxy has noticed that a killed
// backend's connections are gone.
func (s *Server) BackendConns(addr string) int {
	s.pool.mu.Lock()
	defer s.pool.mu.Unlock()
	n := 0
	for k, cs := range s.pool.conns {
		if k.addr == addr {
			n += len(cs)
		}
	}
	return n
}

// MaxWindowGrowth reports the largest growth of backend stream windows
// beyond their initial window that any of its client connections counts
// now (bufBudget.grown), for tests.
func (s *Server) MaxWindowGrowth() int64 {
	return s.maxOverConns(func(c *serverConn) int64 { return c.bufs.grown.Load() })
}

// MaxBackendWindows reports the largest sum of the windows granted to
// backends for one client connection's open response streams
// (bufBudget.windows), for tests.
func (s *Server) MaxBackendWindows() int64 {
	return s.maxOverConns(func(c *serverConn) int64 { return c.bufs.windows.Load() })
}

// maxOverConns is the largest of f over the client connections served now.
func (s *Server) maxOverConns(f func(c *serverConn) int64) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var m int64
	for c := range s.conns {
		m = max(m, f(c))
	}
	return m
}

// ZeroStreamBackends lists the backends the pick path avoids because they
// advertise SETTINGS_MAX_CONCURRENT_STREAMS=0.
func (s *Server) ZeroStreamBackends() []string {
	if l := s.pool.zeroAddrs.Load(); l != nil {
		return slices.Clone(*l)
	}
	return nil
}

// ParkedConns reports the client connections whose reader goroutine is
// parked (park.go), for tests.
func (s *Server) ParkedConns() int { return s.parker.parked() }

// PbufDebug reports whether the package is built with -tags pbufdebug
// (pbufdebug.go), whose freed buffers are kept: heap figures mean nothing.
const PbufDebug = pbufDebug

// RestartingBackends reports how many backend addresses the pool holds
// as restarting (a graceful GOAWAY not yet followed by a handshake), for
// tests.
func (s *Server) RestartingBackends() int {
	s.pool.mu.Lock()
	defer s.pool.mu.Unlock()
	return len(s.pool.goneAt)
}

// Waiting reports the calls waiting for a slot past MaxBackendConns
// (pool.queueLocked), over every backend connection, for tests.
func (s *Server) Waiting() int {
	n, _ := s.waitingPending()
	return n
}

// PendingAttempts reports the attempts in the pending lists of every
// backend connection, those that left them included, for tests.
func (s *Server) PendingAttempts() int {
	_, n := s.waitingPending()
	return n
}

func (s *Server) waitingPending() (waiting, pending int) {
	p := &s.pool
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, cs := range p.conns {
		for _, b := range cs {
			b.mu.Lock()
			waiting += int(b.queued)
			pending += len(b.pending)
			b.mu.Unlock()
		}
	}
	return waiting, pending
}

// UnsettledStreams reports how many streams lost their last reference
// while still in use (stream.settled): zero unless an owner was missed.
func UnsettledStreams() int64 { return unsettledStreams.Load() }

// LiveStreams reports how many streams were made and not released yet,
// and whether it can tell: only the streamdebug build counts them.
func LiveStreams() (n int64, counted bool) { return sdbgLive.Load(), streamDebug }

// WaitingOn reports the calls waiting for a slot on the connections to
// addr, for tests.
func (s *Server) WaitingOn(addr string) int {
	p := &s.pool
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for k, cs := range p.conns {
		if k.addr != addr {
			continue
		}
		for _, b := range cs {
			b.mu.Lock()
			n += int(b.queued)
			b.mu.Unlock()
		}
	}
	return n
}

// ClientStreams reports the streams open on every client connection, for
// tests.
func (s *Server) ClientStreams() int {
	s.mu.Lock()
	conns := make([]*serverConn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	n := 0
	for _, c := range conns {
		c.mu.Lock()
		n += len(c.streams)
		c.mu.Unlock()
	}
	return n
}

// SetMaxPendingEndBytes sets the bound on the bytes of the calls waiting
// for OnCallEnd until the test ends.
func SetMaxPendingEndBytes(t interface{ Cleanup(func()) }, n int) {
	old := maxPendingEndBytes
	maxPendingEndBytes = n
	t.Cleanup(func() { maxPendingEndBytes = old })
}

// SetMaxUnsentMoves sets how many times one call may be moved off a
// backend connection that sent GOAWAY before the call was sent there
// without counting as an attempt (maxUnsentMoves). Call it before Serve.
func (s *Server) SetMaxUnsentMoves(n uint8) { s.unsentMoves = n }

// MaxReadyQueues reports the most queues any of its client connections
// has in its ready ring now, for tests.
func (s *Server) MaxReadyQueues() int64 {
	return s.maxOverConns(func(c *serverConn) int64 {
		c.mu.Lock()
		defer c.mu.Unlock()
		return int64(len(c.ready) - c.readyHead)
	})
}

// SetHeldHeadersMax sets how long response headers held back for a retry
// wait for the first message (heldHeadersMax) until the test ends.
func SetHeldHeadersMax(t interface{ Cleanup(func()) }, d time.Duration) {
	old := heldHeadersMax
	heldHeadersMax = d
	t.Cleanup(func() { heldHeadersMax = old })
}

// ViewsRefused is how many payloads the process copied because the bounds
// on read buffers pinned by views were reached (readref.go).
func ViewsRefused() int64 { return viewsRefused.Load() }
