package proxy

// RefusedConns reports the connections refused over MaxConnections, for
// tests.
func (s *Server) RefusedConns() int64 { return s.refusals.refused() }

// ClientConns reports the client connections being served, for tests.
func (s *Server) ClientConns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// MaxHeldBytes reports the largest count of request bytes held by any of
// its client connections now, for tests.
func (s *Server) MaxHeldBytes() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var m int64
	for c := range s.conns {
		c.mu.Lock()
		m = max(m, c.held)
		c.mu.Unlock()
	}
	return m
}

// BackendPings reports the keepalive PINGs sent to backends, for tests.
func (s *Server) BackendPings() int64 { return s.pool.pings.Load() }

// BackendConns reports the connections the pool holds to addr, for tests.
func (s *Server) BackendConns(addr string) int {
	s.pool.mu.Lock()
	defer s.pool.mu.Unlock()
	return len(s.pool.conns[addr])
}
