package proxy

import (
	"encoding/binary"
	"math/rand/v2"
	"sync/atomic"
)

// bufBudget is the one budget of buffered bytes of a client connection
// (Config.MaxConnBufferedBytes). It counts, by the capacity of the buffers
// that hold them:
//
//   - request DATA queued toward backends (the attempts' up queues),
//   - the replay kept for retries (the attempts' replay),
//   - response DATA queued toward the client (the streams' down queues):
//     how much of it there can be is set by the windows granted to the
//     backends, which grow only within the budget (grown, and
//     transport.growLocked),
//   - the request header blocks kept for retries (reqFields), by their
//     HPACK size,
//   - the backends' response header and trailer blocks queued toward the
//     client (stream.respSize), by their HPACK size, until the call ends;
//     a block that would take the count past the limit is not queued
//     and its call fails RESOURCE_EXHAUSTED (responseOverBudgetLocked),
//   - the response headers held back while a call may still be retried
//     (attempt.heldSize), by their HPACK size, from when they are held;
//     their count moves to respSize when they are queued. Headers that
//     would take the count past the limit are not held but queued at
//     once, where the limit refuses them (holdHeadersLocked).
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
	// grown is the window granted to backends for this connection's
	// response streams beyond their initial window (transport.growLocked),
	// bounded by responseShare. It is what the connection's draining
	// streams may have in flight and queued beyond the initial windows.
	grown atomic.Int64
	// windows is the window granted to backends for this connection's
	// open response streams, their initial windows and growth together:
	// what they may make the proxy hold. New streams are refused past the
	// limit (windowRoom): a window granted by SETTINGS cannot be withheld,
	// so the number of streams is what bounds it.
	windows atomic.Int64

	// The drain probe: a stream's window grows only on evidence that the
	// client reads what it is sent, which bytes written to the socket are
	// not (the kernel takes megabytes from a client that never reads).
	// The evidence is a PING written after them and acknowledged: the
	// client's answer comes once it has read up to it. drained counts
	// the acknowledged probes; a stream grows at most once per probe.
	drained     atomic.Uint64
	probeWanted atomic.Bool   // a stream would grow: the writer sends a probe
	probe       atomic.Uint64 // payload of the probe in flight; 0: none
}

// probeTag marks the PING payloads of drain probes: "sl" and 48 random
// bits, so that a client cannot acknowledge a probe it has not read. With
// a sequence number instead, a client that never read could send the
// acknowledgements of the next probes unasked and make its streams'
// windows grow (TestForgedProbeAcks).
const probeTag = uint64('s')<<56 | uint64('l')<<48

// drainedSince reports whether a drain probe was acknowledged since *seen,
// and moves *seen to now. When not, it asks the owner's writer for a probe.
// Called under a backend connection's mu: it only touches atomics and
// signals.
func (b *bufBudget) drainedSince(seen *uint64) bool {
	if d := b.drained.Load(); d > *seen {
		*seen = d
		return true
	}
	if b.probe.Load() == 0 && !b.probeWanted.Swap(true) {
		b.owner.signal()
	}
	return false
}

// maybeProbeLocked queues a drain probe PING if one is wanted and none is
// in flight. The owner's writer calls it on every wake-up. Caller must
// hold owner.mu.
func (t *transport) maybeProbeLocked() {
	b := t.budget
	if b == nil || !b.probeWanted.Load() || b.probe.Load() != 0 {
		return
	}
	b.probeWanted.Store(false)
	v := probeTag | rand.Uint64()&(1<<48-1)
	b.probe.Store(v)
	op := writeOp{kind: opPing}
	binary.BigEndian.PutUint64(op.ping[:], v)
	t.queueCtrlLocked(op)
}

// onProbeAck takes the client's acknowledgement of a PING: if it answers
// the drain probe in flight, the client has read everything written
// before it. Called by the reader.
func (b *bufBudget) onProbeAck(data [8]byte) {
	v := binary.BigEndian.Uint64(data[:])
	if v != 0 && b.probe.CompareAndSwap(v, 0) {
		b.drained.Add(1)
		if b.probeWanted.Load() {
			b.owner.signal()
		}
	}
}

// responseShare is the part of the budget the growth of a connection's
// backend stream windows may take: a quarter, so a connection's response
// bytes are bounded by its streams' initial windows plus 4 MiB with the
// default budget, and the rest stays for the request direction.
func (b *bufBudget) responseShare() int64 { return b.limit / 4 }

// windowRoom reports whether a new stream's initial backend window w0
// fits in the budget beside the windows of the connection's open streams.
// Nil-safe.
func (b *bufBudget) windowRoom(w0 int32) bool {
	return b == nil || b.limit <= 0 || b.windows.Load()+int64(w0) <= b.limit
}

// shareFull reports whether the response share is all taken, so no window
// can grow now.
func (b *bufBudget) shareFull() bool {
	return b.limit > 0 && b.grown.Load() >= b.responseShare()
}

// takeGrowth counts up to d bytes more of window growth, as much as fits
// in the response share and beside the windows granted in the budget,
// in both grown and windows, and returns how much it counted. With no
// budget limit growth is not bounded here (only by
// Config.BackendMaxStreamWindow).
//
// The growths of one client connection's streams run concurrently, on
// the readers of their backend connections, each under its own lock, so
// the check against the budget and the count are one step: a CAS on
// windows reserves the growth within the budget, a CAS on grown takes it
// from the share, and what the share refuses is given back to windows.
// With the check here and the count of windows in the callers after it,
// two growths that both read the windows before either counted fitted
// together and went past the budget by a growth each
// (TestConcurrentGrowthWithinBudget). The reservation can make a
// concurrent growth see less room than there turns out to be, never more.
func (b *bufBudget) takeGrowth(d int64) int64 {
	if b.limit <= 0 {
		b.grown.Add(d)
		b.windows.Add(d)
		return d
	}
	// Within the budget beside the windows already granted: windowRoom
	// keeps the windows of a connection's streams within the budget when
	// each opens, and growth after that took them past it by up to the
	// share (a client that drained once, then opened 869 streams and
	// stopped reading, made the proxy hold 18.5 MiB of a 16 MiB budget).
	var take int64
	for {
		w := b.windows.Load()
		take = min(d, b.limit-w)
		if take <= 0 {
			return 0
		}
		if b.windows.CompareAndSwap(w, w+take) {
			break
		}
	}
	// And within the share.
	for {
		g := b.grown.Load()
		got := min(take, b.responseShare()-g)
		if got <= 0 {
			b.windows.Add(-take)
			return 0
		}
		if b.grown.CompareAndSwap(g, g+got) {
			if got < take {
				b.windows.Add(got - take)
			}
			return got
		}
	}
}

// giveGrowth gives back n bytes of growth takeGrowth counted and the
// stream did not use.
func (b *bufBudget) giveGrowth(n int64) {
	b.grown.Add(-n)
	b.windows.Add(-n)
}

// add counts n more bytes. Nil-safe: backend-only buffers have no budget.
func (b *bufBudget) add(n int) {
	if b != nil {
		b.used.Add(int64(n))
	}
}

// tryAdd counts n more bytes if that keeps the count within the limit,
// and reports whether it did. Without a limit it always counts them.
func (b *bufBudget) tryAdd(n int64) bool {
	if b.limit <= 0 {
		b.used.Add(n)
		return true
	}
	for {
		u := b.used.Load()
		if u+n > b.limit {
			return false
		}
		if b.used.CompareAndSwap(u, u+n) {
			return true
		}
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
func (b *bufBudget) freeBuf(buf *pbuf) {
	b.sub(len(buf.b))
	putBuf(buf)
}

// maybeGiveBackLocked gives back the connection window withheld because
// of the budget once the count fell to half of it, and sends a drain
// probe if one is wanted (maybeProbeLocked). The client connection's
// writer calls it on every wake-up, which is how a release on a backend
// connection reaches it. Caller must hold mu.
func (t *transport) maybeGiveBackLocked() {
	t.maybeProbeLocked()
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
