package proxy

// PinnedReadBufs reports the read buffers pinned by views (readref.go) of
// the backend connections the pool holds now, for the attack tests.
func (s *Server) PinnedReadBufs() int {
	s.pool.mu.Lock()
	cs := []*backendConn{}
	for _, l := range s.pool.conns {
		cs = append(cs, l...)
	}
	s.pool.mu.Unlock()
	n := 0
	for _, b := range cs {
		b.mu.Lock()
		ok := b.gotSettings // its reader runs: cr is set
		b.mu.Unlock()
		if ok {
			n += int(b.cr.pinnedBufs())
		}
	}
	return n
}

// PinnedReadBufsTotal reports the read buffers of the process with live
// views (readref.go).
func PinnedReadBufsTotal() int32 { return pinnedReadBufs.Load() }
