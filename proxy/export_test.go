package proxy

// RefusedConns reports the connections refused over MaxConnections, for
// tests.
func (s *Server) RefusedConns() int64 { return s.refusals.refused() }
