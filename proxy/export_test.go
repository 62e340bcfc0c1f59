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
