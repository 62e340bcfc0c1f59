package proxy

import (
	"runtime/debug"
	"sync"
)

// A checking mode for the lifetime of payload buffers, built with
// `-tags pbufdebug` (CI runs the package's tests so): a buffer freed
// (putBuf) is filled with a poison byte and never reused, the stack that
// freed it is kept, and every place that reads or writes a buffer's bytes
// on behalf of a queue (the writers, the replay, the hold-back, the
// coalescing of small DATA) panics, naming both stacks, if the buffer was
// freed. A buffer freed twice panics at the second free. In the normal
// build pbufDebug is false and all of it compiles away.
//
// Why: a buffer freed while a queue or a pending write still refers to
// it goes back to its pool and is filled by another stream's reader, and
// the peer gets that stream's bytes, or, when the length prefix is hit,
// an unexplained RESOURCE_EXHAUSTED, once in thousands of calls. The race
// detector does not see it (every access is ordered by the locks); the
// poison and the check make it deterministic where the tests reach.

// Poison bytes, one per kind of buffer, so a failure's bytes say which
// pool the freed buffer came from.
const (
	poisonSmall   = 0xAB // smallBufPool
	poisonFrame   = 0xAC // bufPool
	poisonReadBuf = 0xAD // a read buffer that views were made of
)

// dbgKeep bounds how many freed buffers the check remembers (16 MiB of frame buffers at most): older ones
// are let go to the collector, and are then found only by their poison.
const dbgKeep = 1024

var dbg struct {
	mu    sync.Mutex
	freed map[*pbuf]string // freed buffer → the stack that freed it
	ring  [dbgKeep]*pbuf   // the last freed, next is the oldest
	next  int
}

// debugFree is putBuf in the checking mode.
func debugFree(b *pbuf) {
	stack := string(debug.Stack())
	dbg.mu.Lock()
	defer dbg.mu.Unlock()
	if first, ok := dbg.freed[b]; ok {
		panic("pbufdebug: buffer freed twice; first by:\n" + first + "\nnow by:\n" + stack)
	}
	if dbg.freed == nil {
		dbg.freed = make(map[*pbuf]string)
	}
	if old := dbg.ring[dbg.next]; old != nil {
		delete(dbg.freed, old)
	}
	dbg.freed[b] = stack
	dbg.ring[dbg.next] = b
	dbg.next = (dbg.next + 1) % dbgKeep
	if b.rb != nil {
		b.rb.unref()
		b.rb = nil
		return // a view: its read buffer is poisoned when its last view goes
	}
	poison := byte(poisonFrame)
	if len(b.b) == smallBufSize {
		poison = poisonSmall
	}
	fill(b.b, poison)
}

// debugCheck panics if b was freed. where names the use.
func debugCheck(b *pbuf, where string) {
	if b == nil {
		return
	}
	dbg.mu.Lock()
	stack, ok := dbg.freed[b]
	dbg.mu.Unlock()
	if ok {
		panic("pbufdebug: freed buffer used by " + where + "; freed by:\n" + stack)
	}
}

func fill(p []byte, v byte) {
	for i := range p {
		p[i] = v
	}
}
