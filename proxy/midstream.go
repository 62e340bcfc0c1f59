package proxy

import (
	"encoding/binary"

	"golang.org/x/net/http2"
)

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
	if s.att != a || s.down.closed || s.cst.ended() {
		c.mu.Unlock()
		return
	}
	if cut := s.msgs.partial; cut > 0 && c.trimDownLocked(s, cut) {
		// The backend died in the middle of a message: a client reading
		// half of it would fail the call with INTERNAL ("unexpected EOF")
		// instead of the connection's UNAVAILABLE, so the half goes.
		s.msgs = msgCursor{}
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
		c.stepLocked(s, evSendReset)
		return
	}
	queueResetLocked(s, code)
	s.down.closed = true
	c.markReadyLocked(&s.down)
}

// trimDownLocked removes the last n response bytes queued in s.down, if
// none of them has been written yet, and reports whether it did. Caller
// must hold mu.
func (c *serverConn) trimDownLocked(s *stream, n int64) bool {
	q := &s.down
	var queued int64
	for i := q.head; i < len(q.items); i++ {
		if it := &q.items[i]; it.kind == itemData {
			queued += int64(it.n - it.off)
		}
	}
	if queued < n {
		return false // part of the message is on its way: nothing to save
	}
	for n > 0 {
		it := &q.items[len(q.items)-1]
		if it.kind != itemData {
			return true // unreachable: nothing follows a response's DATA but its end
		}
		take := min(n, int64(it.n-it.off))
		it.n -= int(take)
		n -= take
		if it.n == it.off {
			if it.buf != nil {
				q.mem.sub(len(*it.buf)) // counted by capacity while queued (budget.go)
				c.releaseLocked(it.buf) // the writer may still be reading its head
			}
			*it = outItem{}
			q.items = q.items[:len(q.items)-1]
			if len(q.items) == q.head {
				q.items = q.items[:0]
				q.head = 0
				break
			}
		}
	}
	return true
}

// msgCursor follows the gRPC message boundaries in a response's DATA
// payload (each message is a 5-byte prefix, a flag and a big-endian
// length, then that many bytes: gRPC over HTTP/2, "Length-Prefixed-
// Message"), without copying or decoding it. It only reads the prefixes.
type msgCursor struct {
	prefix  uint8   // prefix bytes seen of the current message, 0 to 5
	length  [4]byte // its length, as read so far
	left    uint32  // body bytes of the current message still to come
	partial int64   // bytes of the current message seen, prefix included; 0 at a boundary
}

// advance moves the cursor over p.
func (m *msgCursor) advance(p []byte) {
	for len(p) > 0 {
		if m.prefix < 5 {
			if m.prefix > 0 {
				m.length[m.prefix-1] = p[0]
			}
			m.prefix++
			m.partial++
			p = p[1:]
			if m.prefix == 5 {
				m.left = binary.BigEndian.Uint32(m.length[:])
			}
		} else {
			n := uint32(min(uint64(len(p)), uint64(m.left)))
			m.left -= n
			m.partial += int64(n)
			p = p[n:]
		}
		if m.prefix == 5 && m.left == 0 {
			*m = msgCursor{}
		}
	}
}
