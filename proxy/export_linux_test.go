package proxy

// CallLeftovers counts the parked client connections that still hold a
// stream map (made at their first stream) or header decoding scratch
// (made at their first header block); a parking connection drops both.
// It looks under the parker's lock, which a parked connection's reader
// takes (waitLoop, takeLocked) before it runs again, so it never reads
// decoder state a running reader writes.
func (s *Server) CallLeftovers() int64 {
	p := &s.parker
	p.mu.Lock()
	defer p.mu.Unlock()
	var n int64
	for _, c := range p.conns {
		c.mu.Lock()
		if c.streams != nil || cap(c.hd.fields) > 0 || cap(c.hd.block.Fields) > 0 || c.hd.block.HeadersFrame != nil {
			n++
		}
		c.mu.Unlock()
	}
	return n
}

// ParkedReadBufBytes sums the read buffers the parked client connections'
// socket readers hold: the small buffer of a TLS connection's reader, a
// pooled buffer. Under the parker's lock, as CallLeftovers.
func (s *Server) ParkedReadBufBytes() int {
	p := &s.parker
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, c := range p.conns {
		n += cap(c.cr.small)
		if c.cr.big != nil {
			n += cap(*c.cr.big)
		}
		if c.cr.next != nil {
			n += cap(*c.cr.next)
		}
	}
	return n
}
