package proxy

import (
	"sync"
	"sync/atomic"
)

// streamPool holds streams whose last reference went (stream.unref),
// reset to their zero value: the next call's stream is one of them. A
// stream is about 95% of what a small unary call allocates.
var streamPool = sync.Pool{New: func() any { return new(stream) }}

// streamInitRefs is the count a new stream starts with: its client side,
// its backend side, and the client reader that sets it up (onHeaders).
const streamInitRefs = 3

// newStream returns a zeroed stream holding streamInitRefs references.
func newStream() *stream {
	var s *stream
	if streamDebug {
		s = new(stream) // never reused: see streamdebug.go
		sdbgLive.Add(1)
	} else {
		s = streamPool.Get().(*stream)
	}
	s.refs.Store(streamInitRefs)
	return s
}

// ref takes a reference to s for a new owner. The caller must already
// own one, directly or through a lock over a structure that owns one (a
// stream found in its client connection's table under cc.mu, a linked
// attempt found in its backend connection's tables under bc.mu): a
// stream no one owns may already be another call's.
func (s *stream) ref() {
	n := s.refs.Add(1)
	if streamDebug && n <= 1 {
		debugStreamPanic(s, "reference taken on a released stream")
	}
}

// unref lets go of a reference. The last resets s and returns it to
// streamPool: nothing may use s after its own unref.
func (s *stream) unref() {
	n := s.refs.Add(-1)
	if n > 0 {
		return
	}
	if n < 0 {
		// More releases than references: some owner let go twice,
		// and the stream may already be another call's.
		if streamDebug {
			debugStreamPanic(s, "reference released twice")
		}
		panic("proxy: stream reference released twice")
	}
	if !s.settled() {
		// An owner let go of a reference it did not hold, or one was
		// never counted: the stream is not reused, whoever still
		// refers to it finds it as it was, and the collector frees it.
		unsettledStreams.Add(1)
		if streamDebug {
			debugStreamPanic(s, "last reference released while the stream is still in use")
		}
		return
	}
	if streamDebug {
		debugReleaseStream(s)
		return
	}
	// Zeroed whole, the inline storage (reqRoom, first.fieldInl,
	// first.replayInl, triedInl, the queues' inl) included, so that
	// no string, buffer or connection of this call is kept by the pool.
	*s = stream{}
	streamPool.Put(s)
}

// unsettledStreams counts the streams whose last reference went while
// settled found them in use, left to the collector instead of reused:
// zero unless an owner was missed (tests check it).
var unsettledStreams atomic.Int64

// settled reports whether s, whose last reference just went, is as a
// stream no one uses: both sides done, no queue of it in a ready ring
// (its own or its first attempt's), its deadline timer not armed for
// it. The checks are cheap, and a stream that fails them is not reused:
// a second line behind the reference count. Caller must hold the last
// reference, or be past it.
func (s *stream) settled() bool {
	return s.sides.Load() == 2 && !s.down.ready && !s.first.up.ready &&
		(s.timer == nil || s.timer.s.Load() != s)
}

// live panics in the streamdebug build if s was released: a use that
// holds no reference. It compiles away otherwise (callers test
// streamDebug first).
func (s *stream) live(where string) {
	if s.refs.Load() <= 0 {
		debugStreamPanic(s, "released stream used by "+where)
	}
}

// owner returns the stream whose storage or attempt q is, or nil for a
// queue of neither (tests).
func (q *sendQueue) owner() *stream {
	if q.s != nil {
		return q.s
	}
	if q.a != nil {
		return q.a.s
	}
	return nil
}

// refOwner takes a reference to q's stream, if it has one.
func (q *sendQueue) refOwner() {
	if s := q.owner(); s != nil {
		s.ref()
	}
}

// unrefOwner lets go of a reference to q's stream, if it has one; q may
// be reset (or poisoned) by it.
func (q *sendQueue) unrefOwner() {
	if s := q.owner(); s != nil {
		s.unref()
	}
}
