package proxy

import (
	"bufio"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Connection buffers are held only while there is something in them, so an
// idle connection costs little memory (issue 12: 5,000 idle client
// connections). This is x/net/http2's pattern: its server's bufferedWriter
// takes a bufio.Writer from a pool on the first write and gives it back on
// Flush. The reading side here does the same with a pooled read buffer. On
// a plain TCP socket it reads through syscall.RawConn, which lets it give
// the buffer back when the socket has nothing (EAGAIN) before the goroutine
// parks, and take one again when data arrives: no buffer is held while
// waiting, and no syscall is added. On other connections (TLS, wrappers)
// it waits with a small buffer of its own and takes a pooled one for
// bursts.

// connBufSize is the size of the pooled read and write buffers: room for
// four 16 KiB DATA frames, so a busy connection reads and writes in few
// syscalls. Streaming 1 MiB answers, 64 KiB took the proxy from about 39
// to 22 reads and from 37 to 20 writes per MiB against 32 KiB, and about
// a tenth of its CPU per MiB (BENCHMARKS.md); an idle connection holds
// neither buffer, so it costs nothing there.
const connBufSize = 64 << 10

// readSlack is the room a pooled read buffer has behind its connBufSize
// bytes, for the rest of a frame a fill cut at the end of them (fillTo):
// the largest frame we accept. Without it, a streamed answer's 16 KiB
// DATA frames, 16,393 bytes with their headers, were cut by the end of
// about every full 64 KiB read, and the part read, most of a frame, was
// copied to the front of a buffer before the frame could be taken whole:
// about 14 copies of 15 KiB per MiB streamed, a fifth of the bytes
// relayed. The buffers a connection holds while busy are 16 KiB larger
// for it.
const readSlack = frameHeaderLen + maxFrameSize

// smallReadSize is the connection's own read buffer. A read that waits on
// an idle socket uses it, so no pooled buffer is pinned while nothing
// arrives; a small call (HEADERS and a short DATA frame, a PING, a
// WINDOW_UPDATE) fits it in one read. A parked connection lets go of it
// (parked), and the next read that waits makes it again.
const smallReadSize = 512

var (
	readBufPool   = sync.Pool{New: func() any { b := make([]byte, connBufSize, connBufSize+readSlack); return &b }}
	bufWriterPool = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, connBufSize) }}
)

// connReader is a buffered reader of a socket that holds a pooled buffer
// only while it has unread bytes in it, or while the connection is busy. A
// read on an empty buffer goes into the small inline buffer, unless the
// previous fill brought more than that holds (a burst: the next fill is
// likely to come at once) or the caller wants more, in which case it takes
// a pooled buffer. So a connection that waits for its next frame after a
// trickle of small ones holds no pooled buffer; one that goes quiet right
// after a burst holds one until its next fill. Reads at least as large as
// the pooled buffer go straight into the caller's slice, as bufio.Reader's
// do. It is used by the reader goroutine only.
type connReader struct {
	nc  net.Conn
	raw syscall.RawConn // set when nc is a plain socket: see readRaw
	// rawFill is fillRaw bound to c; rawN and rawErr are its results.
	rawFill func(fd uintptr) bool
	rawN    int
	rawErr  error
	big     *[]byte // pooled buffer: held while it has unread bytes, or while burst
	buf     []byte  // the buffer being drained: small or *big
	r, w    int     // buf[r:w] is unread
	burst   bool    // the last fill filled its buffer
	err     error   // read error that came with bytes, returned once they are drained
	small   []byte  // smallReadSize, when raw is nil; nil after parked
	// shared is set once views of *big were made (readref.go): the
	// buffer is not filled again from its start (fillTo may complete a
	// frame behind the unread bytes); pinned counts c's buffers with views
	// alive. fillAt is where the next raw fill goes in *big (fillTo), and
	// fillEnd, if not 0, where it stops: in the slack behind len(*big),
	// at the end of a frame, the fill going on into next (readv). next
	// holds the bytes [nextR, nextW) that follow *big's, for when it is
	// drained (advance).
	shared  *readBuf
	pinned  *atomic.Int32 // its own object: see view
	fillAt  int
	fillEnd int
	next    *[]byte
	nextR   int
	nextW   int
	// lastRead, when set (with now), is stamped with the time of every
	// read that brought bytes: once per syscall, not per frame. Backend
	// connections use it for keepalive.
	lastRead *atomic.Int64
	now      func() time.Time
}

// stamp notes that a read brought n bytes; see lastRead.
func (c *connReader) stamp(n int) {
	if n > 0 && c.lastRead != nil {
		c.lastRead.Store(c.now().UnixNano())
	}
}

// plainSocket returns the syscall.RawConn of a plain TCP or Unix socket,
// nil for any other connection. Only the exact socket types: a wrapper
// that embeds one may do more in its Read and Write (count, inject
// faults, TLS), which using the descriptor would skip.
func plainSocket(nc net.Conn) syscall.RawConn {
	if runtime.GOOS == "windows" {
		// RawConn.Read there waits with a zero-byte overlapped read and
		// hands over a socket handle opened for overlapped I/O, which a
		// plain ReadFile (syscall.Read) must not be given: Windows reads
		// through nc, as any other connection.
		return nil
	}
	var sc syscall.Conn
	switch v := nc.(type) {
	case *net.TCPConn:
		sc = v
	case *net.UnixConn:
		sc = v
	default:
		return nil
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return raw
}

func newConnReader(nc net.Conn) *connReader {
	c := &connReader{nc: nc, pinned: new(atomic.Int32)}
	if raw := plainSocket(nc); raw != nil {
		c.raw = raw
		c.rawFill = c.fillRaw
	}
	if c.raw == nil {
		c.small = make([]byte, smallReadSize)
	}
	return c
}

// readRaw fills the pooled buffer straight from the socket. The buffer is
// taken only once the socket has bytes: when a read finds none (EAGAIN)
// the buffer goes back to the pool before RawConn.Read parks the goroutine
// until the socket is readable, so a connection waiting for its next frame
// holds no buffer. Deadlines and Close work as for nc.Read.
func (c *connReader) readRaw() (int, error) {
	err := c.raw.Read(c.rawFill)
	n, serr := c.rawN, c.rawErr
	c.rawN, c.rawErr = 0, nil
	switch {
	case err != nil: // closed, deadline
		return 0, err
	case serr != nil:
		return 0, &net.OpError{Op: "read", Net: c.nc.LocalAddr().Network(), Source: c.nc.LocalAddr(), Addr: c.nc.RemoteAddr(), Err: os.NewSyscallError("read", serr)}
	case n <= 0:
		return 0, io.EOF
	}
	return n, nil
}

// fillRaw is RawConn.Read's callback (made once, as rawFill, so a read
// allocates no closure): one read(2) into the pooled buffer, taken here,
// given back if the socket had nothing.
func (c *connReader) fillRaw(fd uintptr) bool {
	if c.big == nil {
		c.big = readBufPool.Get().(*[]byte)
	}
	for {
		if c.fillEnd > 0 {
			if c.next == nil {
				c.next = readBufPool.Get().(*[]byte)
			}
			c.rawN, c.rawErr = rawReadv(fd, (*c.big)[c.fillAt:c.fillEnd], *c.next)
		} else {
			c.rawN, c.rawErr = rawRead(fd, (*c.big)[c.fillAt:])
		}
		if c.rawErr != syscall.EINTR {
			break
		}
	}
	if c.rawErr == syscall.EAGAIN {
		c.rawN, c.rawErr = 0, nil
		if c.fillAt == 0 {
			c.release() // nothing unread in it
		} else if c.fillEnd > 0 {
			// A fill of the slack: next is still empty (nextW is 0
			// while a fill runs), and a connection that stalls here
			// would hold it beside big. Taken again when the socket
			// has bytes.
			c.dropNext()
		}
		return false // wait until readable, then call again
	}
	return true
}

// Read implements io.Reader.
func (c *connReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if c.r == c.w {
		if c.advance() {
			return c.copyOut(p), nil
		}
		c.r, c.w = 0, 0
		if err := c.err; err != nil {
			c.err = nil // as bufio.Reader: an error is returned once
			c.release()
			return 0, err
		}
		if c.raw != nil {
			// The buffer is kept from one fill to the next: readRaw
			// lets go of it when the socket has nothing. One with views
			// alive is not filled again.
			c.detach()
			n, err := c.readRaw()
			c.stamp(n)
			if n == 0 {
				c.release()
				if err == nil {
					err = io.ErrNoProgress
				}
				return 0, err
			}
			c.buf, c.w = *c.big, n
			return c.copyOut(p), nil
		}
		if len(p) >= connBufSize {
			// Large read: straight into p, no copy, as bufio.Reader does.
			c.release()
			n, err := c.nc.Read(p)
			c.stamp(n)
			c.burst = n > smallReadSize
			return n, err
		}
		if c.small == nil {
			c.small = make([]byte, smallReadSize) // let go of by parked
		}
		buf := c.small
		if c.burst || len(p) > len(buf) {
			if c.big == nil {
				c.big = readBufPool.Get().(*[]byte)
			}
			buf = *c.big
		} else {
			c.release()
		}
		n, err := c.nc.Read(buf)
		c.stamp(n)
		// A fill that filled the small buffer, or brought more than it
		// holds, says the connection is busy: keep reading into the pooled
		// buffer until a fill brings little again.
		c.burst = n == len(buf) || n > smallReadSize
		c.buf, c.w, c.err = buf, n, err
		if n == 0 {
			c.err = nil
			c.release()
			if err == nil {
				err = io.ErrNoProgress
			}
			return 0, err
		}
	}
	return c.copyOut(p), nil
}

// copyOut hands unread bytes to p, and lets go of the pooled buffer once
// it is drained, unless a burst (non-raw) or the next fill (raw) will use
// it.
func (c *connReader) copyOut(p []byte) int {
	n := copy(p, c.buf[c.r:c.w])
	c.r += n
	if c.r == c.w && !c.burst && c.raw == nil {
		c.release()
	}
	return n
}

// buffered returns the unread bytes, valid until the next Read or
// discard.
func (c *connReader) buffered() []byte {
	if c.r == c.w {
		return nil // buf may be gone with the pooled buffer (release)
	}
	return c.buf[c.r:c.w]
}

// discard drops the first n unread bytes, n <= len(buffered()), letting
// go of the pooled buffer as copyOut does.
func (c *connReader) discard(n int) {
	c.r += n
	if c.r == c.w && !c.burst && c.raw == nil {
		c.release()
	}
}

// release returns the pooled buffer, or lets go of it if views of it live.
// Caller must have drained it.
func (c *connReader) release() {
	c.buf = nil
	c.detach()
	if c.big != nil {
		readBufPool.Put(c.big)
		c.big = nil
	}
	c.dropNext()
}

// parked lets go of the small buffer of a connection that parks with
// nothing unread (the reader goroutine ends): 512 bytes every idle TLS
// connection kept, about 0.6 of its 14 KiB of RSS (loadtest/bench/idleab.sh
// with TLS_DIR). A raw socket's reader has none, and holds no pooled
// buffer between reads. Reader only.
func (c *connReader) parked() {
	if c.r == c.w && c.big == nil {
		c.buf, c.r, c.w = nil, 0, 0
		c.small = nil
	}
}

// dropNext returns next, which holds no unread bytes, to the pool.
func (c *connReader) dropNext() {
	if c.next != nil {
		readBufPool.Put(c.next)
		c.next, c.nextR, c.nextW = nil, 0, 0
	}
}

// advance moves to the buffer the last fill went on into (next), once
// the current one is drained, and reports whether it did. The drained
// buffer goes back to the pool, or stays with its views.
func (c *connReader) advance() bool {
	if c.nextW == 0 {
		return false
	}
	if c.shared != nil {
		c.detach()
	} else if c.big != nil {
		readBufPool.Put(c.big)
	}
	c.big, c.next = c.next, nil
	c.buf, c.r, c.w = *c.big, c.nextR, c.nextW
	c.nextR, c.nextW = 0, 0
	return true
}

// connWriter is a buffered writer of a socket that takes its buffer from a
// pool on the first write and gives it back on Flush, like x/net's
// bufferedWriter. It is used by the writer goroutine only.
//
// On a plain socket (rs set) it gathers instead of copying large DATA
// payloads: writePayload keeps a reference to the payload's pooled buffer,
// and the flush writes the small writes buffered so far and the payloads
// between them with one writev(2), in order. Every relayed byte of a
// stream would otherwise be copied once more, into the write buffer (issue
// 12: about 5% of the proxy's CPU per MiB streamed). The referenced
// buffers go back to their pool, through their budget, once written.
type connWriter struct {
	nc  net.Conn
	out io.Writer     // nc, or a rawSock writing nc's descriptor
	bw  *bufio.Writer // nil while nothing is buffered; not used when rs is set

	// The gathering writer, on a plain socket.
	rs  *rawSock
	vb  *[]byte // buffer of the small writes; nil while nothing is pending
	vn  int     // bytes of *vb used
	vsm bool    // the last segment is a run of *vb ending at vn
	// segs is what is pending, in order: runs of *vb and payloads
	// written by reference; pending counts their bytes, refd is set when
	// one of them is a payload's.
	segs    [][]byte
	pending int
	refd    bool
	// refs are the pooled buffers of payloads in segs, freed once written.
	refs []bufRef
	// dbgBufs are the buffers of every payload in segs, checked before
	// the write in the pbufdebug build (pbufdebug.go).
	dbgBufs []*pbuf
	// corked is set when a write made because the pending bytes reached
	// a limit went out with MSG_MORE, and the kernel may be keeping its
	// last packet for the next write: Flush must push it.
	corked bool
	// progress counts the socket writes begun, those of their system
	// calls that moved bytes, and the batches the writer finished
	// (writeStep); inWrite is set during a socket write. They are what
	// another goroutine sees of the writer: going on, or stuck in a write
	// to a client that does not read (serverConn.drainAfterError).
	progress atomic.Uint32
	inWrite  atomic.Bool
}

// sockWrite brackets a write to the socket (progress, inWrite).
func (c *connWriter) sockWrite(begin bool) {
	if begin {
		c.progress.Add(1)
	}
	c.inWrite.Store(begin)
}

// progressWriter is a connWriter's socket where it is not a rawSock: TLS,
// a wrapper, any socket off Linux. It hands the socket at most
// progressChunk bytes per Write, so that progress moves with the bytes,
// as a rawSock's does with each system call that moved some: a Write of
// the whole 64 KiB buffer ticked once, and to a client reading it at 50
// KB/s it took over a second, so that drainAfterError took the writer
// for stuck on a client that does not read, closed the connection, and
// the client lost the GOAWAY (TestGoAwayReachesSlowReaderStreams, "opaque").
// 16 KiB is a whole TLS record (crypto/tls writes each record to the
// socket on its own anyway); a client reading at least that much per
// goAwayWait is never taken for one that does not read.
type progressWriter struct {
	w io.Writer
	c *connWriter
}

const progressChunk = 16 << 10

func (p progressWriter) Write(b []byte) (int, error) {
	n := 0
	for {
		k := min(len(b)-n, progressChunk)
		p.c.sockWrite(true)
		m, err := p.w.Write(b[n : n+k])
		p.c.sockWrite(false)
		n += m
		if err != nil || n == len(b) {
			return n, err
		}
	}
}

// bufRef is a pooled DATA buffer and the budget it counts in.
type bufRef struct {
	buf *pbuf
	mem *bufBudget
}

// Gathering limits: a payload shorter than vecMin is copied (a writev
// segment costs about as much as copying a few KiB); the pending bytes are
// written once they reach vecFlushAt, or once there are maxSegs segments.
//
// vecFlushAt is four times the gathering buffer: payloads written by
// reference are already in the queues' pooled buffers, so gathering more
// of them costs no memory, only their release a little later. Streaming 1
// MiB answers, 256 KiB took the writes to the client from 19 to 7 per MiB
// (144 KB each) and the proxy's CPU per MiB down by about 3% against 64
// KiB (loadtest/bench/simulab.sh with GEN="-stream -c 4", both orders;
// BENCHMARKS.md). 16 KiB frames make 32 segments of 256 KiB, within
// maxSegs.
const (
	vecMin     = 4 << 10
	vecFlushAt = 256 << 10
	maxSegs    = 64
)

func newConnWriter(nc net.Conn) *connWriter {
	c := &connWriter{nc: nc}
	c.out = progressWriter{nc, c}
	if s := newRawSock(nc); s != nil {
		s.progress = &c.progress
		c.out = s
		c.rs = s
	}
	return c
}

// Write implements io.Writer.
func (c *connWriter) Write(p []byte) (int, error) {
	if c.rs != nil {
		return c.writeSmall(p)
	}
	if c.bw == nil {
		c.bw = bufWriterPool.Get().(*bufio.Writer)
		c.bw.Reset(c.out)
	}
	return c.bw.Write(p)
}

// WriteString implements io.StringWriter.
func (c *connWriter) WriteString(s string) (int, error) {
	if c.rs != nil {
		return c.writeSmall([]byte(s))
	}
	if c.bw == nil {
		c.bw = bufWriterPool.Get().(*bufio.Writer)
		c.bw.Reset(c.out)
	}
	return c.bw.WriteString(s)
}

// writeSmall copies p into the gathering buffer, writing what is pending
// first when it does not fit.
func (c *connWriter) writeSmall(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if c.vb == nil {
		c.vb = readBufPool.Get().(*[]byte)
	}
	if c.vn+len(p) > len(*c.vb) || len(c.segs) >= maxSegs {
		if err := c.flushSegs(true); err != nil {
			return 0, err
		}
		if len(p) > len(*c.vb) {
			c.corked = false // write(2) pushes
			c.sockWrite(true)
			n, err := c.rs.Write(p) // larger than the buffer: nothing is pending
			c.sockWrite(false)
			return n, err
		}
	}
	start := c.vn
	c.vn += copy((*c.vb)[start:], p)
	if c.vsm {
		last := &c.segs[len(c.segs)-1]
		*last = (*last)[:len(*last)+len(p)] // the run goes on in *vb
	} else {
		c.segs = append(c.segs, (*c.vb)[start:c.vn])
		c.vsm = true
	}
	c.pending += len(p)
	return len(p), nil
}

// writePayload writes p, DATA payload bytes from the pooled buffer buf
// that is freed (mem.freeBuf) once written if free is set; buf and mem may
// be nil. On a plain socket a payload of vecMin bytes or more is written by
// reference: p must stay unchanged until the next Flush, or the next
// writePayload, which may write it (see transport.toRelease). Otherwise p
// is copied, and buf freed at once unless a payload written by reference
// is pending, which may be in buf too: then it is freed with those. On
// error, buf is freed all the same.
func (c *connWriter) writePayload(p []byte, buf *pbuf, mem *bufBudget, free bool) error {
	if c.rs == nil || len(p) < vecMin {
		_, err := c.Write(p)
		if free {
			if c.refd && err == nil {
				// An earlier part of buf may be pending by reference:
				// a DATA item the window cut in two, whose first
				// frame was large and whose last is small. Freed now,
				// the buffer could be refilled by another stream
				// before the flush writes that part (the replay test's
				// wrong bytes, attack8_replay_test.go).
				c.refs = append(c.refs, bufRef{buf, mem})
			} else {
				mem.freeBuf(buf)
			}
		}
		return err
	}
	if c.vb == nil {
		c.vb = readBufPool.Get().(*[]byte) // for the frame headers around p
	}
	c.segs = append(c.segs, p)
	if pbufDebug {
		c.dbgBufs = append(c.dbgBufs, buf)
	}
	c.vsm = false
	c.pending += len(p)
	c.refd = true
	if free {
		c.refs = append(c.refs, bufRef{buf, mem})
	}
	// A buffer whose budget is past half its limit is written and freed
	// now: the source's window was credited when the frame was taken
	// (writeFrames), so gathered until the flush it would be counted, up
	// to vecFlushAt, beside the bytes that window let in (a 1 MiB request
	// through a 32 KiB budget failed RESOURCE_EXHAUSTED on its answer's
	// headers, TestConnWriterOverBudgetFreesAtOnce).
	if c.pending >= vecFlushAt || len(c.segs) >= maxSegs || (free && !mem.belowHalf()) {
		return c.flushSegs(true)
	}
	return nil
}

// freeAfterWrite returns b, which no budget counts any more, to its pool
// once what is pending is written: a pending payload may be in it.
func (c *connWriter) freeAfterWrite(b *pbuf) { c.refs = append(c.refs, bufRef{buf: b}) }

// holdsRefs reports whether a payload written by reference is still
// pending: the buffers it may be in must not be reused yet.
func (c *connWriter) holdsRefs() bool { return c.refd }

// flushSegs writes what is pending and frees the referenced buffers, also
// when the write fails; it keeps the gathering buffer. more is set on the
// writes made because the pending bytes reached a limit, in the middle of
// a batch: they go out with MSG_MORE. A write of 64 KiB and a few frame
// headers is one packet of the loopback's 64 KiB MTU and one of a hundred
// bytes, each costing the kernel as much to send and receive, and each
// waking the receiver; with MSG_MORE the small one waits for the bytes
// that follow, and the packets are full ones.
func (c *connWriter) flushSegs(more bool) error {
	var err error
	if pbufDebug {
		for _, b := range c.dbgBufs {
			debugCheck(b, "connWriter.flushSegs")
		}
	}
	if c.pending > 0 {
		c.sockWrite(true)
		err = c.rs.writeSegs(c.segs, more)
		c.sockWrite(false)
		c.corked = more
	}
	c.resetSegs()
	return err
}

// resetSegs forgets what is pending and frees the referenced buffers.
func (c *connWriter) resetSegs() {
	if pbufDebug {
		clear(c.dbgBufs)
		c.dbgBufs = c.dbgBufs[:0]
	}
	clear(c.segs)
	c.segs = c.segs[:0]
	c.pending, c.vn, c.vsm, c.refd = 0, 0, false, false
	for i, r := range c.refs {
		r.mem.freeBuf(r.buf)
		c.refs[i] = bufRef{}
	}
	c.refs = c.refs[:0]
}

// discard drops what is pending without writing it, freeing the
// referenced buffers: the connection is closed. Writer only.
func (c *connWriter) discard() {
	if c.rs == nil {
		return
	}
	c.resetSegs()
	c.corked = false
	if c.vb != nil {
		readBufPool.Put(c.vb)
		c.vb = nil
	}
}

// Flush writes what is buffered and returns the buffer to the pool.
func (c *connWriter) Flush() error {
	if c.rs != nil {
		var err error
		if c.vb != nil {
			err = c.flushSegs(false) // pushes what MSG_MORE kept, if anything was pending
			readBufPool.Put(c.vb)
			c.vb = nil
		}
		if c.corked {
			c.corked = false
			c.rs.push() // nothing was pending: push it alone
		}
		return err
	}
	bw := c.bw
	if bw == nil {
		return nil
	}
	err := bw.Flush()
	bw.Reset(nil) // drops the socket and a sticky error
	bufWriterPool.Put(bw)
	c.bw = nil
	return err
}
