package proxy

import "golang.org/x/net/http2"

// A backend that dies or resets a stream mid-response has usually sent
// messages the client has not read yet: they sit in the stream's queue
// toward the client, waiting for its flow-control window. A direct client
// would read them before it learned of the failure (grpc-go's transport
// queues the error behind the data it received), so the proxy relays them
// first and ends the stream after them, never instead of them.

// failLost ends a call whose backend connection ended after the response
// started (the attempt was forwarded): the response bytes received are
// still relayed, then the status of f in trailers. Nothing happens if the
// response already ended or a is no longer the stream's attempt.
func (c *serverConn) failLost(a *attempt, f failure) {
	s := a.s
	c.mu.Lock()
	if s.att != a || s.down.closed || s.cClosed {
		c.mu.Unlock()
		return
	}
	blocks, result := endBlocks(f, !s.headersSent && !s.down.queuedHeaders(), nil)
	s.result = result
	s.failKind = f.kind
	c.endDownLocked(s, blocks...)
	c.mu.Unlock()
	c.signal()
}

// queuedHeaders reports whether a header block waits in q: a response
// whose HEADERS are queued but not yet written is not trailers-only.
func (q *sendQueue) queuedHeaders() bool {
	for i := q.head; i < len(q.items); i++ {
		if q.items[i].kind == itemHeaders {
			return true
		}
	}
	return false
}

// resetAfterQueuedLocked relays a backend's RST_STREAM to the client
// after the response bytes already queued, or at once when none are.
// Caller must hold mu; the response must not have ended.
func (c *serverConn) resetAfterQueuedLocked(s *stream, code http2.ErrCode) {
	if s.down.empty() {
		c.queueCtrlLocked(writeOp{kind: opReset, streamID: s.down.id, code: code})
		c.closeSideLocked(s)
		return
	}
	s.rstQueued = true
	s.rstCode = code
	s.down.push(outItem{kind: itemReset, code: code})
	s.down.closed = true
	c.markReadyLocked(&s.down)
}
