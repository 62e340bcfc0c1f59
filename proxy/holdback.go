package proxy

import (
	"encoding/binary"

	"golang.org/x/net/http2/hpack"
)

// Response hold-back. A backend that dies in the middle of a gRPC message
// (SIGKILL, a reset connection, GOAWAY and close) has sent the first part
// of it. A direct grpc-go client would fail the call with UNAVAILABLE: its
// transport hands the parser the connection's error behind the bytes
// received (internal/transport/transport.go, recvBufferReader). Relayed as
// it arrives, the part reaches the client, and the proxy then ends the
// stream with UNAVAILABLE trailers: the client's parser (rpc_util.go,
// parser.recvMsg) finds the stream ended inside a message, io.EOF becomes
// io.ErrUnexpectedEOF, and the call fails with INTERNAL instead. Sending
// RST_STREAM(REFUSED_STREAM) instead of trailers would be worse: grpc-go
// marks such a stream unprocessed (http2_client.go, handleRSTStream) and
// retries it transparently (stream.go, shouldRetry), though the backend
// may have executed the call.
//
// So the backend reader follows the 5-byte prefixes of a gRPC response
// (flag, big-endian length; "Length-Prefixed-Message" in gRPC over
// HTTP/2) across its DATA frames, without decoding messages, and holds
// back the bytes of an incomplete message, up to Config.ResponseHoldback,
// until the message is complete. When the backend fails first, the part
// held is dropped with the attempt and the client sees the complete
// messages, then the status a direct call would see. A frame made of
// whole messages, the usual unary answer, goes on as before: the scan
// reads its prefixes and nothing else.
//
// Held bytes stay in the stream's flow-control books like bytes queued
// toward the client (recvState.held: not credited to the backend until
// written to the client), so they add nothing to what the windows already
// bound. A held message must never wait for window only its own
// forwarding would free: before a message of n bytes is held, the
// stream's window target is raised to at least holdTarget(n), 4n/3 (the
// crediting returns window in steps of 1/creditDiv of the target, so up to
// that can be unreturned), taken from the connection's response share like any
// growth (transport.growLocked); without room for it, the message goes
// on as it arrives. The buffers of held bytes count in the client
// connection's budget by capacity, as queued ones do.

// holdback is an attempt's hold-back state. The backend reader moves it;
// guarded by bc.mu, except out (backend reader only).
type holdback struct {
	on  bool       // the response is gRPC and Config.ResponseHoldback > 0
	cur holdCursor // where the response's payload is, message-wise
	// items hold the first bytes of the incomplete message, in pooled
	// buffers counted in the client connection's budget; held counts
	// them.
	items []outItem
	held  int
	// out is the storage items swap with when they are handed on: the
	// reader passes them to the client connection after releasing bc.mu,
	// while a reset from the client may release what items holds.
	out []outItem
}

// holdCursor follows the message boundaries of a gRPC payload.
type holdCursor struct {
	prefix uint8   // prefix bytes seen of the current message, 0 to 5; 0 at a boundary
	length [4]byte // its length field, as read so far
	left   uint32  // body bytes of the current message still to come
	size   uint32  // its length, once the prefix is complete
	big    bool    // its length is over the bound: it goes on as it arrives
}

// scan moves the cursor over p, a DATA payload, and returns the offset in
// p where the current message started if it is incomplete, holdable and
// began in p; -1 when it began in an earlier frame; len(p) when p ends at
// a boundary or in a message over bound. bound is
// Config.ResponseHoldback.
func (c *holdCursor) scan(p []byte, bound uint32) (start int) {
	start = -1
	i := 0
	for i < len(p) {
		if c.prefix == 0 {
			start = i
			if len(p)-i >= 5 {
				// The whole prefix is here: the common case.
				n := binary.BigEndian.Uint32(p[i+1:])
				if body := uint64(len(p) - i - 5); body >= uint64(n) {
					i += 5 + int(n) // a whole message
					continue
				}
				c.prefix, c.size, c.big = 5, n, n > bound
				c.left = n - uint32(len(p)-i-5)
				break
			}
		}
		if c.prefix < 5 {
			if c.prefix > 0 {
				c.length[c.prefix-1] = p[i]
			}
			c.prefix++
			i++
			if c.prefix == 5 {
				c.size = binary.BigEndian.Uint32(c.length[:])
				c.left, c.big = c.size, c.size > bound
				if c.left == 0 {
					*c = holdCursor{}
				}
			}
			continue
		}
		n := min(uint64(len(p)-i), uint64(c.left))
		c.left -= uint32(n)
		i += int(n)
		if c.left == 0 {
			*c = holdCursor{}
		}
	}
	if c.prefix == 0 || c.big {
		return len(p)
	}
	return start
}

// isGRPCResponse reports whether the response headers fields announce a
// gRPC payload (content-type application/grpc or application/grpc+...).
func isGRPCResponse(fields []hpack.HeaderField) bool {
	for i := range fields {
		if fields[i].Name == "content-type" {
			return isGRPCContentType(fields[i].Value)
		}
	}
	return false
}

// holdLocked decides what of the DATA payload p of attempt a goes on now:
// the first fwd bytes of p, after the held items returned (nil when none
// complete). The rest of p is held. Caller must hold b.mu; the returned
// items are the reader's until passed to enqueueHeld or freed.
//
// rd, when set, is the reader whose read buffer p is in: large parts of p
// are then held as views of it (readref.go), not copied.
func (b *backendConn) holdLocked(a *attempt, p []byte, end bool, rd *connReader) (items []outItem, fwd int) {
	h := &a.hold
	start := h.cur.scan(p, b.holdBound)
	if end {
		// The backend ended the stream normally: everything goes on as
		// it came, a partial message included, as a direct client would
		// read it.
		start = len(p)
	}
	if start < len(p) && !b.roomToHoldLocked(a) {
		// No window for the message to arrive while held: it goes on
		// as it arrives, as a message over the bound does.
		h.cur.big = true
		start = len(p)
	}
	if h.held == 0 && start == len(p) {
		return nil, len(p) // whole messages, or one not held
	}
	if start < 0 {
		h.keep(p, &a.s.cc.bufs, rd) // more of the message held
		return nil, 0
	}
	if h.held > 0 {
		items = h.take() // the held message is complete, or goes on
	}
	if start < len(p) {
		h.keep(p[start:], &a.s.cc.bufs, rd)
	}
	return items, start
}

// holdTarget is the smallest stream window target with which a message of n
// bytes, prefix included, can arrive whole while none of it is returned:
// besides it, up to target/creditDiv of credited bytes may not be returned
// yet (transport.creditLocked).
func holdTarget(n int64) int64 {
	return n*creditDiv/(creditDiv-1) + 1
}

// holdFits is the largest ResponseHoldback whose messages, prefix
// included, can arrive whole within a window target of window bytes: the
// inverse of holdTarget (0 when none can).
func holdFits(window int32) int {
	return max(0, int((int64(window)-1)*(creditDiv-1)/creditDiv)-5)
}

// roomToHoldLocked makes sure the backend can send the whole of a's
// current message while the part received is held, raising the stream's
// window target when it is too small (see the file comment), and reports
// whether it could. Caller must hold b.mu.
func (b *backendConn) roomToHoldLocked(a *attempt) bool {
	c := &a.hold.cur
	if c.prefix < 5 {
		return true // at most 4 bytes: any window lets the prefix complete
	}
	r := &a.downRecv
	n := int64(c.size) + 5
	need := holdTarget(n)
	target := int64(r.target)
	if target == 0 {
		target = int64(b.streamWindow)
	}
	if need <= target {
		return true
	}
	if need > int64(b.maxStreamWindow) || r.grow == nil || r.done {
		return false
	}
	d := need - target
	if got := r.grow.takeGrowth(d); got < d {
		r.grow.giveGrowth(got)
		return false
	}
	r.target = int32(need)
	r.window += int32(d)
	b.queueCtrlLocked(writeOp{kind: opWindowUpdate, streamID: r.id, val: uint32(d)})
	return true
}

// keep copies p to the held items, filling the last one's room first.
// The buffers are sized by what is left of the message when its length is
// known.
func (h *holdback) keep(p []byte, mem *bufBudget, rd *connReader) {
	if len(p) > 0 && h.items == nil {
		// The first message held on this attempt: one allocation for
		// both item slices, each with room for a message of this size
		// in full frames' buffers.
		c := 2
		if h.cur.prefix == 5 {
			c = int(h.cur.size+5)/maxFrameSize + 2
		}
		both := make([]outItem, 2*c)
		h.items, h.out = both[:0:c], both[c:c:2*c]
	}
	if rd != nil && len(p) >= vecMin {
		if v := rd.view(p); v != nil {
			mem.add(len(v.b))
			h.items = append(h.items, outItem{kind: itemData, buf: v, n: len(p)})
			h.held += len(p)
			return
		}
	}
	for len(p) > 0 {
		if n := len(h.items); n > 0 {
			t := &h.items[n-1]
			if pbufDebug {
				debugCheck(t.buf, "holdback.keep")
			}
			if c := copy(t.buf.b[t.n:], p); c > 0 {
				t.n += c
				h.held += c
				p = p[c:]
				continue
			}
		}
		want := len(p)
		if h.cur.prefix == 5 {
			want = max(want, int(h.cur.left)+len(p)) // what is left of the message
		}
		buf := getBuf(want)
		mem.add(len(buf.b))
		h.items = append(h.items, outItem{kind: itemData, buf: buf})
	}
}

// take hands the held items on: they swap with out, which the reader
// passes to the client connection. Caller must hold b.mu.
func (h *holdback) take() []outItem {
	items := h.items
	h.items, h.out = h.out[:0], items
	h.held = 0
	return items
}

// releaseLocked drops what a holds: its response side is over. The
// buffers were never seen by a writer. Caller must hold b.mu.
func (h *holdback) releaseLocked(mem *bufBudget) {
	for i := range h.items {
		mem.freeBuf(h.items[i].buf)
		h.items[i] = outItem{}
	}
	h.items = h.items[:0]
	h.held = 0
	h.on = false
}

// heldBytes is the payload in items.
func heldBytes(items []outItem) int {
	n := 0
	for i := range items {
		n += items[i].n
	}
	return n
}

// enqueueHeld queues toward the client the held items of attempt a, then
// data (copied) with end: complete messages. It reports false when the
// attempt is no longer the stream's or its response is over: the caller
// then frees the items and credits the bytes back. On success the items'
// buffers belong to the queue. Called by the backend reader, not holding
// b.mu.
func (c *serverConn) enqueueHeld(a *attempt, items []outItem, data []byte, v *pbuf, end bool) bool {
	s := a.s
	if streamDebug {
		s.live("enqueueHeld")
	}
	c.mu.Lock()
	if s.att != a || s.down.closed {
		c.mu.Unlock()
		return false
	}
	s.active = true
	for i := range items {
		it := items[i]
		if pbufDebug {
			debugCheck(it.buf, "enqueueHeld")
		}
		it.msgAt = s.msgs.nextAt(it.buf.b[:it.n])
		s.countDown(it.buf.b[:it.n])
		s.down.push(it)
	}
	switch {
	case v != nil:
		s.pushDownView(v, end)
	case len(data) > 0 || end:
		s.pushDownData(data, end)
	}
	if end {
		s.endedByDataLocked()
		s.down.closed = true
	}
	c.markReadyLocked(&s.down)
	c.mu.Unlock()
	c.signal()
	return true
}

// relayHeld passes the held items of a, then data and end, to the client
// connection; when the attempt is over it frees them and credits the
// bytes back to the backend. items are cleared for their storage's reuse.
// Backend reader only, not holding b.mu.
func (b *backendConn) relayHeld(a *attempt, items []outItem, data []byte, v *pbuf, end bool) {
	if !a.s.cc.enqueueHeld(a, items, data, v, end) {
		n := heldBytes(items) + len(data)
		for i := range items {
			a.s.cc.bufs.freeBuf(items[i].buf)
		}
		if v != nil {
			putBuf(v) // not counted yet
		}
		b.creditStream(&a.downRecv, int32(n))
	}
	clear(items)
}
