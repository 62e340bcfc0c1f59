package proxy

import (
	"io"
	"sync/atomic"
	"unsafe"
)

// Response payloads by reference. A backend connection's reader reads
// 64 KiB at a time into its read buffer (connReader), and a streamed
// response's DATA frames, 16 KiB each, were copied from there into pooled
// buffers for the queue toward the client (or the hold-back's): one copy
// of every relayed byte in user space, about 7% of the proxy's CPU per MiB
// streamed (perf, issue 12), and a quarter of the frames, those the read
// buffer's end cut in two, went through the Framer's own buffer first.
//
// Now a DATA payload of vecMin bytes or more in the read buffer is queued
// as a view of it (pbuf.rb): the buffer is not filled again from its
// start while a view of it lives, and goes back to its pool when the last
// view is freed, by the writer that sent the bytes on (putBuf). The reader
// takes another buffer for its next fill. A frame a read cuts is
// completed in the buffer first (fillTo: behind the part read, which no
// view covers, in the buffer's slack past connBufSize if need be), so
// large frames reach the views whole.
//
// What views may pin beyond the bytes they carry (the budgets count a
// view's bytes, not the 80 KiB buffer under it, slack included: a 4 KiB
// view can keep 80 KiB) is bounded: at most maxPinnedReadBufs read buffers
// with live views per connection, and maxPinnedReadBufsTotal in the
// process, 2.5 MiB; past either, payloads are copied into pooled buffers
// as before, which the budgets count by capacity. The bound is the process's, not a
// connection's: a backend that answers each call on a new connection,
// then closes it, leaves the views of its dead connections queued toward
// clients (attack on the first version: 256 calls of four 4 KiB frames
// toward a client that never reads, 2.7 MiB counted, 45 MiB of heap). Only
// backend connections make views. Client connections, thousands of them,
// keep copying: the budget of each counts what its peer makes it hold.

// maxPinnedReadBufs bounds the read buffers of one connection that views
// keep from reuse (readBuf): 960 KiB of 80 KiB buffers, so that one
// backend cannot take every view the process allows. It was 4: streaming
// 1 MiB answers of 64 KiB messages to four clients' streams, the
// hold-back's held frames of one backend connection pinned more than four
// buffers most of the time, and the rest were copied (runtime.memmove 4.3%
// of the proxy's CPU, 3.2% under holdback.keep). With 12, same time
// (simulab.sh, GEN="-stream -c 4", both orders, 7 rounds): 0.977 and
// 1/1.039 of the CPU per MiB; at -c 16 the process's bound decides and
// the two are the same (0.987, 1/1.003).
const maxPinnedReadBufs = 12

// maxPinnedReadBufsTotal bounds the read buffers all views of the process
// keep from reuse: 2.5 MiB of 80 KiB buffers (connBufSize and readSlack),
// beyond what the budgets count.
const maxPinnedReadBufsTotal = 32

// pinnedReadBufs counts the read buffers of the process with live views.
var pinnedReadBufs atomic.Int32

// viewsRefused counts the payloads copied because a view would have
// passed maxPinnedReadBufs or maxPinnedReadBufsTotal: the benchmarks
// report it per MiB streamed (proxy-copies/MiB), where a bound too tight
// for the hold-back shows (maxPinnedReadBufs).
var viewsRefused atomic.Int64

// readBuf is a read buffer that views were made of. refs counts the views
// alive, plus one while the reader still uses the buffer; the last to let
// go returns it to readBufPool.
type readBuf struct {
	buf    *[]byte
	refs   atomic.Int32
	pinned *atomic.Int32 // the reader's count of such buffers
}

// unref lets go of one reference.
func (r *readBuf) unref() {
	if r.refs.Add(-1) == 0 {
		r.pinned.Add(-1)
		pinnedReadBufs.Add(-1)
		if pbufDebug {
			fill((*r.buf)[:cap(*r.buf)], poisonReadBuf) // and not reused
			return
		}
		readBufPool.Put(r.buf)
	}
}

// view returns a payload buffer of p, unread bytes of c's read buffer, that
// keeps the buffer from reuse until it is freed (putBuf). It returns nil,
// and the caller copies p, when c is not a plain socket's reader, when p is
// not in the read buffer, or when maxPinnedReadBufs of c's buffers, or
// maxPinnedReadBufsTotal of the process's, already have views. A view's length is its bytes: nothing may be appended to it.
// Reader only.
func (c *connReader) view(p []byte) *pbuf {
	if c.raw == nil || c.big == nil || len(p) == 0 {
		return nil
	}
	base := uintptr(unsafe.Pointer(unsafe.SliceData(*c.big)))
	at := uintptr(unsafe.Pointer(unsafe.SliceData(p)))
	if at < base || at+uintptr(len(p)) > base+uintptr(cap(*c.big)) {
		return nil
	}
	if c.shared == nil {
		if c.pinned.Load() >= maxPinnedReadBufs {
			viewsRefused.Add(1)
			return nil
		}
		if pinnedReadBufs.Add(1) > maxPinnedReadBufsTotal {
			pinnedReadBufs.Add(-1)
			viewsRefused.Add(1)
			return nil
		}
		// pinned is an object of its own: a view must not keep the
		// reader, and with it a closed connection, from the collector.
		c.shared = &readBuf{buf: c.big, pinned: c.pinned}
		c.shared.refs.Store(1)
		c.pinned.Add(1)
	}
	c.shared.refs.Add(1)
	return &pbuf{b: p[:len(p):len(p)], rb: c.shared}
}

// pinnedBufs is how many of c's read buffers views keep from reuse.
func (c *connReader) pinnedBufs() int32 { return c.pinned.Load() }

// detach lets go of a read buffer that views were made of: the reader's
// next fill takes another. Reader only.
func (c *connReader) detach() {
	if c.shared != nil {
		c.shared.unref()
		c.shared, c.big = nil, nil
	}
}

// fillTo reads until n bytes are unread, n <= readSlack (a frame), and
// reports whether they are. The bytes read go behind the unread ones,
// also in a buffer views of which live: a view covers bytes before the
// unread ones, which a fill never touches. When n does not fit in
// connBufSize behind the start of the unread bytes, it fits with the
// buffer's slack (readSlack): the fill reads the rest of it there and what
// follows into the front of the next buffer, in one readv(2). A read error
// is kept for Read, which returns it once the bytes are drained, as after
// any fill. Plain sockets only.
//
// Before the slack, such a frame moved to the front of the buffer, or of
// a fresh one when views of it lived, and a buffer with views was not
// filled again: streaming 1 MiB answers, the 64 KiB reads of full buffers
// cut their last frame about every time, and about 14 frame starts of 15
// KiB on average were copied per MiB, runtime.memmove's 2-4% of the
// proxy's CPU there (0.7% now). Reading only the rest of the frame into
// the slack, without readv, saved the copies but added as many reads, and
// the CPU per MiB stayed the same.
func (c *connReader) fillTo(n int) bool {
	if c.raw == nil || n > readSlack {
		return false
	}
	for c.w-c.r < n {
		if c.err != nil {
			return false
		}
		if c.r == c.w && c.advance() {
			continue
		}
		if c.nextW > 0 {
			// The last fill completed a frame's header in the slack
			// and went on into next: the bytes n needs are there, not
			// in the socket. They move here (rare, and at most a frame:
			// a header cut at connBufSize).
			if c.r+n > cap(*c.big) {
				return false // not reached, as below
			}
			k := copy((*c.big)[c.w:c.r+n], (*c.next)[c.nextR:c.nextW])
			c.w += k
			c.nextR += k
			if c.nextR == c.nextW {
				c.dropNext()
			}
			c.buf = (*c.big)[:max(len(*c.big), c.w)]
			continue
		}
		switch {
		case c.r == c.w:
			c.r, c.w = 0, 0
			c.detach() // as Read: a buffer with views alive is not filled again
		case c.r+n <= len(*c.big):
			// n fits behind: read there.
		case c.r+n <= cap(*c.big):
			// It fits with the slack: the fill reads the rest of it
			// there and goes on into the front of the next buffer
			// (readv), so that no frame is cut at the slack's end and
			// no read is added. Once this one is drained, the reader
			// moves to that one (advance).
			c.fillEnd = c.r + n
		default:
			// Not reached: while bytes are unread, they start within
			// len(*c.big), since a fill into the slack stops at the
			// end of the frame it completes. The caller takes the bytes
			// through Read instead.
			return false
		}
		c.fillAt = c.w
		m, err := c.readRaw()
		end := c.fillEnd
		c.fillAt, c.fillEnd = 0, 0
		c.stamp(m)
		if end > 0 && c.w+m > end {
			// The rest of the frame, and nextW bytes behind it.
			c.nextW = c.w + m - end
			m = end - c.w
		} else {
			c.dropNext()
		}
		if m == 0 {
			if err == nil {
				err = io.ErrNoProgress
			}
			c.err = err
			return false
		}
		c.w += m
		c.buf = (*c.big)[:max(len(*c.big), c.w)]
	}
	return true
}
