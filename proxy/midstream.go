package proxy

import (
	"encoding/binary"

	"golang.org/x/net/http2"
	"google.golang.org/grpc/codes"
)

// A backend that dies or resets a stream mid-response has usually sent
// messages the client has not read yet: they sit in the stream's queue
// toward the client, waiting for its flow-control window. A direct client
// would read them before it learned of the failure (grpc-go's transport
// queues the error behind the data it received), so the proxy relays them
// first and ends the stream after them, never instead of them.
//
// The same holds for most failures the proxy detects itself once a
// response started (endStatusLocked): a stream error of the backend's (a
// second response HEADERS block without END_STREAM), trailers over the
// client's SETTINGS_MAX_HEADER_LIST_SIZE or over the connection's buffer
// budget. A direct grpc-go client reads every message received before
// such an error too, and the messages kept are already counted in the
// budget they are queued under. Whatever the failure, the client must
// never find the stream ending inside a message: its parser turns that
// into INTERNAL "unexpected EOF" (rpc_util.go, recvMsg) and the status
// the proxy sent after it is lost.

// failLost ends a call whose backend connection ended after the response
// started (the attempt was forwarded): the response bytes received are
// still relayed, then the status of f in trailers (see endStatusLocked).
// Nothing happens if the response already ended or a is no longer the
// stream's attempt.
func (c *serverConn) failLost(a *attempt, f failure) {
	s := a.s
	if streamDebug {
		s.live("failLost")
	}
	c.mu.Lock()
	if s.att != a || s.down.closed || s.cst.ended() {
		c.mu.Unlock()
		return
	}
	c.endStatusLocked(s, f)
	c.mu.Unlock()
	c.signal()
}

// endStatusLocked ends s's response with the status of f, a failure of
// the proxy's own, and records the outcome for Picker.done; the response
// must not have ended yet. Caller must hold mu.
//
// What was queued toward the client depends on the failure kind
// (keepsQueued). Most keep it: the complete messages go, then the
// status. The incomplete message at the end of the queue, if any, is
// dropped: a client reading half of it would fail the call with INTERNAL
// ("unexpected EOF") instead of the status. If part of that message was
// written already, nothing can save it, and the stream is reset after the
// rest of the queue instead of ending with trailers: grpc-go's client
// reports the reset's status (resetCodeOf) rather than "unexpected EOF".
//
// A deadline, a request left idle or an expired shutdown drain mean stop
// now, and grpc-go's server drops what it queued for the stream when its
// deadline passes (http2_server.go: closeStream, RST_STREAM(CANCEL)): so
// the queue goes, but for the rest of a message already partly written
// (cutQueuedLocked), then the status in trailers. When where that message
// ends is not known, or it is not all queued, the queue goes and the
// stream is reset at once, as grpc-go's server does: CANCEL for a
// deadline, which grpc-go's client reports as DEADLINE_EXCEEDED once its
// own deadline passed.
func (c *serverConn) endStatusLocked(s *stream, f failure) {
	s.failKind = f.kind
	torn := false
	if f.keepsQueued() {
		if cut := s.msgs.partial; cut > 0 {
			if c.trimDownLocked(s, cut) {
				s.msgs = msgCursor{}
			} else {
				torn = true // part of the message is on its way
			}
		}
	} else {
		if !c.cutQueuedLocked(s) {
			s.down.drop(&c.transport)
			torn = true
		}
		// The backend stream is cancelled next (resetUp), and the
		// request bytes held for it go with it (discardLocked): they
		// are held no more, though the client's stream may stay in
		// the table until the client reads the rest of the message
		// being written and the status, or never does. DATA the client
		// sends meanwhile is credited as it arrives (onData).
		if s.upRecv.held > 0 {
			c.unholdLocked(&s.upRecv, s.upRecv.held)
		}
	}
	// A response whose HEADERS are queued but not yet written is not
	// trailers-only.
	blocks, result := endBlocks(f, !s.headersSent && !s.down.queuedHeaders(), nil)
	s.result = result
	if torn {
		code := resetCodeOf(f)
		s.result = sentAs(result, code) // the client reports the reset's code
		if f.kind == failRouteTimeout {
			// sentAs takes a CANCEL for a deadline as reported
			// DEADLINE_EXCEEDED, by a client whose own deadline passed;
			// the route's came first, so this client's has not (or it
			// has none): it reports CANCELLED.
			s.result = clientStatusError{err: result, code: codes.Canceled}
		}
		c.resetAfterQueuedLocked(s, code)
		return
	}
	c.endDownLocked(s, blocks...)
}

// keepsQueued reports whether the response messages queued toward the
// client still go when the proxy ends the call for f (endStatusLocked).
func (f failure) keepsQueued() bool {
	switch f.kind {
	case failDeadline, failRouteTimeout, failRequestIdle, failShuttingDown:
		return false
	}
	return true
}

// resetCodeOf is the RST_STREAM code that ends a call failing for f when
// trailers cannot (endStatusLocked): one grpc-go's client turns into the
// status's code (rstCode) where there is one. UNAVAILABLE has none but
// REFUSED_STREAM, which grpc-go's client takes for a stream never
// processed and may retry transparently: INTERNAL_ERROR instead.
func resetCodeOf(f failure) http2.ErrCode {
	st, _ := statusOf(f)
	switch st.Code() {
	case codes.Canceled, codes.DeadlineExceeded:
		// grpc-go's client reports CANCEL as DEADLINE_EXCEEDED once its
		// deadline passed (http2_client.go, handleRSTStream).
		return http2.ErrCodeCancel
	case codes.ResourceExhausted:
		return http2.ErrCodeEnhanceYourCalm
	}
	return http2.ErrCodeInternal
}

// cutQueuedLocked drops what s's response queued, but for the rest of the
// gRPC message the writer is in the middle of, which stays queued so that
// the client never finds the stream ending inside a message. It reports
// false, leaving the queue as it is, when where that message ends is not
// known or the queue does not hold all of it. Caller must hold mu.
func (c *serverConn) cutQueuedLocked(s *stream) bool {
	q := &s.down
	if q.empty() {
		// Nothing queued, but the first part of a message may have been
		// written already (one over the hold-back goes on as it
		// arrives): the rest will never come.
		return s.msgs.partial == 0
	}
	h := &q.items[q.head]
	if h.kind != itemData || h.buf == nil {
		// Response HEADERS not yet written: nothing of a message went.
		q.drop(&c.transport)
		return true
	}
	if h.msgAt == 0 {
		return false
	}
	// Offsets count from the first byte of the head item's buffer, whose
	// bytes stay there until the item is done, written or not; the items
	// behind it start at their first byte.
	pos, off := int64(h.msgAt-1), int64(h.off)
	var prefix [5]byte
	for pos < off {
		if !q.readData(pos, prefix[:]) {
			return false
		}
		pos += 5 + int64(binary.BigEndian.Uint32(prefix[1:]))
	}
	if pos == off {
		q.drop(&c.transport)
		return true
	}
	// The message being written ends at pos: keep what comes before it.
	var base int64
	keep := -1
	for i := q.head; i < len(q.items); i++ {
		it := &q.items[i]
		if it.kind != itemData {
			return false // unreachable: the response has not ended
		}
		end := base + int64(it.n)
		if pos <= end {
			it.n = int(pos - base)
			it.end = false
			keep = i + 1
			break
		}
		base = end
	}
	if keep < 0 {
		return false // the rest of the message is not all here
	}
	for i := keep; i < len(q.items); i++ {
		q.freeLocked(&c.transport, &q.items[i])
	}
	q.items = q.items[:keep]
	return true
}

// readData copies into p the DATA bytes of q at offset pos, counted from
// the first byte of the head item's buffer (see cutQueuedLocked), and
// reports whether q holds them all.
func (q *sendQueue) readData(pos int64, p []byte) bool {
	var base int64
	for i := q.head; i < len(q.items) && len(p) > 0; i++ {
		it := &q.items[i]
		if it.kind != itemData || it.buf == nil {
			continue
		}
		end := base + int64(it.n)
		if pos < end {
			k := copy(p, it.buf.b[pos-base:it.n])
			p = p[k:]
			pos += int64(k)
		}
		base = end
	}
	return len(p) == 0
}

// queuedHeaders reports whether a header block other than an
// informational (1xx) one waits in q: a response whose HEADERS are queued
// but not yet written is not trailers-only.
func (q *sendQueue) queuedHeaders() bool {
	for i := q.head; i < len(q.items); i++ {
		if q.items[i].kind == itemHeaders && !interimBlock(q.items[i].fields) {
			return true
		}
	}
	return false
}

// onlyInterim reports whether q holds nothing but informational (1xx)
// header blocks, if anything: nothing of the answer itself is queued.
func (q *sendQueue) onlyInterim() bool {
	for i := q.head; i < len(q.items); i++ {
		if it := &q.items[i]; it.kind != itemHeaders || !interimBlock(it.fields) {
			return false
		}
	}
	return true
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
			q.freeLocked(&c.transport, it)
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

// nextAt returns 1 + the offset in p, the payload that follows the bytes
// the cursor has seen, where the next message starts (past len(p) when the
// current message goes on after p), or 0 when that is not known: p ends
// inside the current message's prefix, or the offset is too large.
func (m *msgCursor) nextAt(p []byte) uint32 {
	var at uint64
	switch m.prefix {
	case 0:
	case 5:
		at = uint64(m.left)
	default:
		// The rest of the prefix, length bytes m.prefix-1 to 3, opens p.
		need := 5 - int(m.prefix)
		if len(p) < need {
			return 0
		}
		l := m.length
		copy(l[m.prefix-1:], p[:need])
		at = uint64(need) + uint64(binary.BigEndian.Uint32(l[:]))
	}
	if at >= 1<<32-1 {
		return 0
	}
	return uint32(at + 1)
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
