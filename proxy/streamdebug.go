package proxy

import (
	"runtime/debug"
	"sync"
	"sync/atomic"
	"weak"

	"golang.org/x/net/http2/hpack"
)

// A checking mode for the lifetime of streams, built with
// `-tags streamdebug`, as pbufdebug.go is for payload buffers: a stream
// whose last reference went (stream.unref) is never reused. It is
// cleared as for reuse, and poisoned: its reference count is set far
// below zero, so that a later ref or unref panics, its header fields and
// method are set to poisonStream, which no header block may carry, its
// connection is nil, and the stack that released it is kept (for the
// last sdbgKeep streams released; the stream itself is not kept). The places that use a
// stream on behalf of an owner (the writers, the backend reader's
// handoffs to the client connection, the timers, retries, resets) check
// it is live first (stream.live) and panic, naming that stack, if not.
// In the normal build streamDebug is false and all of it compiles away.
//
// Why: a stream is reused for another call once its last owner let go.
// An owner that was missed (a writer's batch still encoding its trailers,
// a queue left in a ready ring, an attempt still on a backend's pending
// list, a timer) would then act on the next call of that memory: send it
// the old call's frames, credit its windows, end it. The race detector
// does not see it (every access is ordered by the locks); the poison and
// the checks make it deterministic where the tests reach.

// poisonStream is the name and value the fields of a released stream are
// set to.
const poisonStream = "\x00streamdebug: released stream"

// streamPoisonRefs is the reference count of a released stream.
const streamPoisonRefs = -1 << 30

// sdbgKeep bounds how many released streams the check remembers the
// stacks of.
const sdbgKeep = 4096

var sdbg struct {
	mu    sync.Mutex
	freed map[weak.Pointer[stream]]string
	ring  [sdbgKeep]weak.Pointer[stream]
	next  int
}

// sdbgLive counts the streams made and not yet released, in the
// streamdebug build: tests check that none is held past its call
// (LiveStreams in export_test.go).
var sdbgLive atomic.Int64

// debugReleaseStream is the end of a stream's last reference in the
// checking mode.
func debugReleaseStream(s *stream) {
	sdbgLive.Add(-1)
	stack := string(debug.Stack())
	w := weak.Make(s)
	sdbg.mu.Lock()
	if first, ok := sdbg.freed[w]; ok {
		sdbg.mu.Unlock()
		panic("streamdebug: stream released twice; first by:\n" + first + "\nnow by:\n" + stack)
	}
	if sdbg.freed == nil {
		sdbg.freed = make(map[weak.Pointer[stream]]string)
	}
	if old := sdbg.ring[sdbg.next]; old != (weak.Pointer[stream]{}) {
		delete(sdbg.freed, old)
	}
	sdbg.freed[w] = stack
	sdbg.ring[sdbg.next] = w
	sdbg.next = (sdbg.next + 1) % sdbgKeep
	sdbg.mu.Unlock()

	*s = stream{} // what it kept goes, as in the pool
	s.refs.Store(streamPoisonRefs)
	s.method = poisonStream
	poisonFields(s.reqRoom[:])
	poisonFields(s.first.fieldInl[:])
	for i := range s.triedInl {
		s.triedInl[i] = poisonStream
	}
}

func poisonFields(fs []hpack.HeaderField) {
	for i := range fs {
		fs[i] = hpack.HeaderField{Name: poisonStream, Value: poisonStream}
	}
}

// debugStreamPanic panics with why, and the stack that released s if it
// is still remembered.
func debugStreamPanic(s *stream, why string) {
	sdbg.mu.Lock()
	stack, ok := sdbg.freed[weak.Make(s)]
	sdbg.mu.Unlock()
	if ok {
		panic("streamdebug: " + why + "; released by:\n" + stack)
	}
	panic("streamdebug: " + why)
}

// debugCheckFields panics if fields are a released stream's, poisoned:
// their stream was released while a header block of it was on its way.
func debugCheckFields(fields []hpack.HeaderField, where string) {
	for _, f := range fields {
		if f.Name == poisonStream {
			panic("streamdebug: " + where + ": a header block of a released stream")
		}
	}
}
