package proxy

import "sync/atomic"

// bufBudget is the one budget of buffered bytes of a client connection
// (Config.MaxConnBufferedBytes). It counts, by the capacity of the buffers
// that hold them:
//
//   - request DATA queued toward backends (the attempts' up queues),
//   - the replay kept for retries (the attempts' replay),
//   - response DATA queued toward the client (the streams' down queues),
//   - the request header blocks kept for retries (reqFields), by their
//     HPACK size.
//
// A 1-byte payload in a 16 KiB buffer counts 16 KiB: the memory is what
// is bounded. The counter is an atomic because the buffers are taken and
// released under the locks of several connections: the client's (its
// reader and writer) and the backends' (theirs), which are never held
// together in the other order (see stream.go), so no lock of its own fits.
//
// Past the limit the client connection withholds its connection-level
// WINDOW_UPDATE (the client stops sending DATA, RFC 9113 §6.9.1) until the
// count falls to half of it, new streams are refused with
// RESOURCE_EXHAUSTED, and retries keep no more replay; see Config.
type bufBudget struct {
	used  atomic.Int64
	limit int64 // immutable; 0: counted, never enforced
	// waiting is set while the owner withholds its window: a release that
	// brings used to half the limit wakes its writer, which gives the
	// window back (the release may run under a backend's lock, which must
	// not take the client connection's).
	waiting atomic.Bool
	owner   *transport // the client connection
}

// add counts n more bytes. Nil-safe: backend-only buffers have no budget.
func (b *bufBudget) add(n int) {
	if b != nil {
		b.used.Add(int64(n))
	}
}

// sub counts n bytes released.
func (b *bufBudget) sub(n int) {
	if b == nil {
		return
	}
	if u := b.used.Add(-int64(n)); b.waiting.Load() && u <= b.limit/2 {
		b.owner.signal()
	}
}

// over reports whether the connection is past its limit.
func (b *bufBudget) over() bool {
	return b != nil && b.limit > 0 && b.used.Load() > b.limit
}

// belowHalf reports whether the connection is at or under half its limit,
// where a withheld window is given back and replay may still be kept.
func (b *bufBudget) belowHalf() bool {
	return b == nil || b.limit == 0 || b.used.Load() <= b.limit/2
}

// freeBuf returns a pooled buffer counted in b to the pool. For buffers no
// writer can be reading.
func (b *bufBudget) freeBuf(buf *[]byte) {
	b.sub(len(*buf))
	putBuf(buf)
}

// maybeGiveBackLocked gives back the connection window withheld because
// of the budget once the count fell to half of it. The client connection's
// writer calls it on every wake-up, which is how a release on a backend
// connection reaches it. Caller must hold mu.
func (t *transport) maybeGiveBackLocked() {
	if !t.withheld || !t.budget.belowHalf() {
		return
	}
	t.withheld = false
	t.budget.waiting.Store(false)
	if t.recvUnacked > 0 {
		t.queueCtrlLocked(writeOp{kind: opWindowUpdate, val: uint32(t.recvUnacked)})
		t.recvWindow += t.recvUnacked
		t.recvUnacked = 0
	}
}
