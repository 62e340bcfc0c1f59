package proxy

import (
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// maxFrameSize is the SETTINGS_MAX_FRAME_SIZE we advertise. We never raise
// it above the RFC default, so every DATA payload we receive fits one pooled
// buffer, and every buffer fits a frame any peer accepts (RFC 9113 §4.2).
const maxFrameSize = 16384

// pbuf is a buffer of DATA payload bytes between connections: a pooled
// one (getBuf), or a view of a backend connection's read buffer
// (readref.go), which keeps that buffer from reuse until it is freed. The
// budgets count len(b): a pooled buffer's capacity, a view's bytes.
type pbuf struct {
	b  []byte
	rb *readBuf // set on a view
}

// bufPool holds the buffers that carry DATA payloads between connections. A
// buffer is taken by the reader that receives the bytes and returned by the
// writer that sends them on, so the relay does not allocate per frame.
// smallBufPool holds smallBufSize buffers for payloads that fit one: a
// small unary message would otherwise pin a full frame's 16 KiB for as
// long as its call waits for the peer.
var (
	bufPool      = sync.Pool{New: func() any { return &pbuf{b: make([]byte, maxFrameSize)} }}
	smallBufPool = sync.Pool{New: func() any { return &pbuf{b: make([]byte, smallBufSize)} }}
)

// smallBufSize is the size of the small DATA buffers: a gRPC message of
// up to about 1 KiB with its 5-byte prefix.
const smallBufSize = 1024

// getBuf returns a pooled buffer of at least n bytes, n <= maxFrameSize.
func getBuf(n int) *pbuf {
	if n <= smallBufSize {
		return smallBufPool.Get().(*pbuf)
	}
	return bufPool.Get().(*pbuf)
}

// putBuf returns b to the pool of its size; a view lets go of its read
// buffer instead.
func putBuf(b *pbuf) {
	if pbufDebug {
		debugFree(b)
		return
	}
	if b.rb != nil {
		// A view is not reused: it lets go of the read buffer, which a
		// stale pointer to the view (a queue slot not yet cleared)
		// would otherwise keep from the collector.
		b.rb.unref()
		*b = pbuf{}
		return
	}
	if len(b.b) == smallBufSize {
		smallBufPool.Put(b)
		return
	}
	bufPool.Put(b)
}

type itemKind uint8

const (
	itemData itemKind = iota
	itemHeaders
	itemReset
)

// outItem is one entry of a stream's outbound queue: DATA bytes, a header
// block, or a RST_STREAM that must follow what was queued before it.
type outItem struct {
	kind   itemKind
	end    bool  // END_STREAM
	buf    *pbuf // DATA: pending bytes are buf.b[off:n]
	off, n int   //
	fields []hpack.HeaderField
	code   http2.ErrCode
	// msgAt, on a response's DATA toward the client, is 1 + the offset
	// in buf of the first gRPC message that starts at or after the
	// item's first byte (it may lie past n, in a later item); 0: not
	// known. It lets a failure of the proxy's end the response at a
	// message boundary (cutQueuedLocked, midstream.go).
	msgAt uint32
	// credited counts the leading bytes already returned to the sender's
	// flow-control window: bytes replayed by a retry were credited when
	// first sent and must not be credited twice.
	credited int
}

// sendQueue is a stream's outbound state on one connection. All fields are
// guarded by the owning transport's mu.
type sendQueue struct {
	s      *stream  // set on a stream's queue toward the client
	a      *attempt // set on an attempt's queue toward the backend
	id     uint32   // stream id on the owning connection; 0 until opened
	window int32    // peer's flow-control window for this stream (RFC 9113 §6.9)
	items  []outItem
	head   int
	// inl is the first storage of items: a unary call queues a header
	// block, its DATA and its trailers, so most queues never allocate.
	inl   [3]outItem
	ready bool // in the transport's ready ring
	// detached marks an attempt's queue taken off its connection for a
	// retry: the writer must not send from it any more.
	detached bool
	closed   bool // END_STREAM or RST queued: later items are dropped

	// credit is the receive state of the connection the bytes came from;
	// it is credited, under src.mu, as bytes are written here.
	src    *transport
	credit *recvState
	// mem is the budget of the client connection the stream belongs to;
	// the queue's buffers count in it by capacity (budget.go).
	mem *bufBudget
}

func (q *sendQueue) empty() bool { return q.head == len(q.items) }

// statusQueued reports whether q still holds the response's last header
// block, or DATA before it, not yet taken for writing: a RST_STREAM
// queued behind the response is all that may be left once the status
// went.
func (q *sendQueue) statusQueued() bool {
	for i := q.head; i < len(q.items); i++ {
		if q.items[i].kind != itemReset {
			return true
		}
	}
	return false
}

// push appends it to the queue, in the inline storage while it fits.
func (q *sendQueue) push(it outItem) {
	if q.items == nil {
		q.items = q.inl[:0]
	}
	q.items = append(q.items, it)
}

// eligible reports whether the head item can be written once the
// connection window allows. Header blocks and RST_STREAM are not
// flow-controlled; DATA needs stream window unless it is an empty
// END_STREAM frame. The connection window is checked by the writer, which
// stops taking DATA while it is exhausted, leaving the ring as it is.
func (q *sendQueue) eligible() bool {
	if q.empty() || q.id == 0 || q.detached {
		return false
	}
	return !q.needsWindow() || q.window > 0
}

// needsWindow reports whether the head item is DATA with bytes in it.
func (q *sendQueue) needsWindow() bool {
	it := &q.items[q.head]
	return it.kind == itemData && it.n > it.off
}

// push appends an item, coalescing DATA into the tail buffer when nothing
// of that buffer has been sent yet, so tiny frames cannot pin a pooled
// buffer each.
func (q *sendQueue) pushData(p []byte, end bool) {
	if n := len(q.items); n > q.head && len(p) > 0 {
		t := &q.items[n-1]
		// Never into a view (rb): its room past n is the backend's read
		// buffer. A view's n equals its length, but trimDownLocked and
		// cutQueuedLocked may lower it.
		if t.kind == itemData && !t.end && t.buf != nil && t.buf.rb == nil && t.off == 0 && t.n+len(p) <= len(t.buf.b) {
			if pbufDebug {
				debugCheck(t.buf, "pushData")
			}
			t.n += copy(t.buf.b[t.n:], p)
			t.end = end
			return
		}
	}
	it := outItem{kind: itemData, end: end}
	if len(p) > 0 {
		it.buf = getBuf(len(p))
		q.mem.add(len(it.buf.b))
		it.n = copy(it.buf.b, p)
	}
	q.push(it)
}

// drop discards every queued item. t is the transport whose writer drains
// q: buffers go back to the pool through it, since its writer may still be
// sending the first part of the head item. Caller must hold t.mu.
func (q *sendQueue) drop(t *transport) {
	for i := q.head; i < len(q.items); i++ {
		q.freeLocked(t, &q.items[i])
	}
	q.items = q.items[:0]
	q.head = 0
}

// freeLocked empties queued item it: its buffer, counted by capacity in
// the connection's budget while queued (budget.go), goes back to the pool
// through t, whose writer may still be reading it. Caller must hold t.mu.
func (q *sendQueue) freeLocked(t *transport, it *outItem) {
	if it.buf != nil {
		q.mem.sub(len(it.buf.b))
		t.releaseLocked(it.buf)
	}
	*it = outItem{}
}

// recvState is the inbound flow-control state of one stream on one
// connection. Guarded by the owning transport's mu.
type recvState struct {
	id      uint32 // stream id on the owning connection; 0 until opened
	window  int32  // bytes the peer may still send
	unacked int32  // bytes handed on but not yet returned with WINDOW_UPDATE
	done    bool   // stream closed on this connection: no more updates
	held    int32  // bytes received and not yet handed on (see transport.held)
	// target is the window kept open for the peer: what it may have sent
	// and we not yet handed on. Zero means the transport's streamWindow.
	// A backend stream's target starts at the initial window and grows
	// (growLocked) while its client drains what it is sent.
	target int32
	// grow is the budget of the client connection whose response the
	// stream carries, which its growth counts in; nil: the target is fixed.
	grow *bufBudget
	// drainSeen is the count of grow's acknowledged drain probes when the
	// window last grew: it grows at most once per probe.
	drainSeen uint64
}

type opKind uint8

const (
	opData opKind = iota
	opHeaders
	opReset
	opSettings
	opSettingsAck
	opPing
	opGoAway
	opWindowUpdate
	opTableSize
)

// writeOp is one frame for the writer. Ops are built under mu and written
// outside it by writeLoop, which is the only goroutine touching the socket's
// write side, the write Framer and the HPACK encoder.
type writeOp struct {
	kind     opKind
	streamID uint32
	end      bool
	buf      *pbuf // DATA from a payload buffer; released after the write when release is set
	data     []byte
	release  bool
	fields   []hpack.HeaderField
	code     http2.ErrCode
	val      uint32 // window increment, last stream id, or table size
	ping     [8]byte
	settings []http2.Setting
	debug    []byte
	src      *transport // DATA: connection to credit once written
	mem      *bufBudget // DATA: the budget buf counts in, if any
	credit   *recvState
	creditN  int32 // DATA bytes to credit, once written
}

// transport is the part of an HTTP/2 connection common to both roles: the
// client-facing serverConn and the backend-facing backendConn. It owns the
// socket, the reader's Framer, and the outbound scheduler drained by
// writeLoop, after grpc-go's loopy writer: control frames first, then one
// DATA frame per ready stream in turn, so a busy stream never starves the
// others, and a flush only when there is nothing left to write.
type transport struct {
	// ackDelay is Config.PingAckDelay (0: answer PINGs at once); ackTimer,
	// made by the reader at the first PING, fires when an answer waited
	// that long; ackArmed is set while it runs for a queued answer. See
	// signalPingAck.
	ackDelay time.Duration
	ackTimer *time.Timer
	ackArmed atomic.Bool
	nc       net.Conn      // set by attach, under mu
	rfr      *http2.Framer // reader goroutine only
	cr       *connReader   // rfr's source, the socket's buffered reader
	cg       *contGuard    // between rfr and cr
	hd       hdecState     // reader goroutine only
	df       dataFrame     // the DATA frame being handled; reader goroutine only
	// views is set on backend connections: large DATA payloads go on
	// as views of the read buffer (readref.go). Immutable.
	views bool
	// hf is the HEADERS frame read straight from the read buffer
	// (bufferedFrame, takeHeaders), reused frame after frame; reader goroutine only.
	hf  http2.HeadersFrame
	log *slog.Logger
	// sawFrame is set once the peer's first frame was read (readLoop).
	// Reader goroutine only.
	sawFrame bool

	// Writer goroutine only.
	bw   *connWriter   // holds a pooled buffer only between a write and its flush
	henc *hpackEncoder // nil until the first header block: see encoder
	// sc is the writer's scratch (Framer, header buffer, batch), taken
	// from a pool when a writer starts and given back when an on-demand
	// writer exits, so an idle connection holds none.
	sc    *writeScratch
	dirty bool // bytes sit in bw unflushed
	// armedAt is when armWrite last set the write deadline.
	armedAt time.Time
	// parkOK is set by writeStep when it found nothing to write: whether
	// more is likely to come (the owner's streamsLocked).
	parkOK bool
	credit []creditOp

	// wake is the persistent writer's "there is work" (capacity 1,
	// non-blocking sends); nil on an on-demand transport, whose writer
	// goroutine runs only while there is something to write (wstate).
	wake chan struct{}
	// wstate is the on-demand writer's state (wNotStarted ... wDone): see
	// signal and runWriter. role and finish are set before it leaves
	// wNotStarted.
	wstate atomic.Int32
	owner  writerOwner
	// starts counts the writer goroutines signal started (the server's
	// writerStarts); immutable once startOnDemand ran.
	starts *atomic.Int64
	// park is where an on-demand writer with nothing to do waits, until
	// signal or the server's housekeeper (reapWriter) wakes it; made by
	// the first writer that parks.
	park chan struct{}

	ctrlOverflow atomic.Bool // the control queue hit maxQueuedControlFrames; the reader ends the connection
	// dataSent is set by the writer when it writes HEADERS or DATA; the
	// reader clears it on each PING (see dispatch).
	dataSent atomic.Bool
	// framesSent counts the HEADERS and DATA frames the writer wrote, for
	// the WINDOW_UPDATE allowance (calm.go).
	framesSent atomic.Int64

	// Immutable after construction.
	writeTimeout  time.Duration // bound on each write to the socket; zero: none
	streamWindow  int32         // window we grant per stream
	connWindow    int32         // window we grant on the connection
	maxHeaderList uint32

	// maxStreamWindow is what a stream's window may grow to (growLocked);
	// backend connections only, zero elsewhere. Immutable.
	maxStreamWindow int32

	mu sync.Mutex
	// mu guards the fields below.
	ctrl          []writeOp
	ready         []*sendQueue // FIFO ring of streams with an eligible head item
	readyHead     int
	sendWindow    int32 // connection-level window the peer granted us
	peerInitWin   int32 // peer's SETTINGS_INITIAL_WINDOW_SIZE
	peerMaxFrame  uint32
	peerMaxStream uint32 // peer's SETTINGS_MAX_CONCURRENT_STREAMS
	// peerMaxHeaders is the peer's SETTINGS_MAX_HEADER_LIST_SIZE; zero
	// while it advertised none (RFC 9113 §6.5.2: unlimited).
	peerMaxHeaders uint32
	gotSettings    bool
	recvUnacked    int32 // connection-level bytes consumed, not yet returned
	recvWindow     int32 // connection-level bytes the peer may still send
	closed         bool
	closeErr       error
	drainAndClose  bool // writer exits once everything queued is written
	// fatal: a connection error. The writer writes its GOAWAY first (a
	// control frame), then what the streams still have queued, and
	// exits when nothing is left; once abandon is set it drops the
	// streams' frames instead (serverConn.drainAfterError).
	fatal bool
	// abandon is set after a connection error whose writer took too long
	// to finish (serverConn.drainAfterError): it writes what control
	// frames are queued (the GOAWAY among them), none of the streams'
	// frames, and exits.
	abandon bool
	// held is the DATA payload received on open streams and not yet
	// handed on (credited back), for tests and the stream's own books.
	held int64
	// withheld is set while the connection-level window is withheld
	// because budget is past its limit (budget.go).
	withheld bool
	// onWithhold, if set, is called under mu when the connection starts
	// withholding its window (client connections: see
	// serverConn.shedWaiting). Immutable after construction.
	onWithhold func()
	// budget is the client connection's buffer budget; nil on backend
	// connections. Immutable after construction.
	budget *bufBudget
	// resets are the stream ids we reset last: frames on them are ignored
	// after the streams are gone (RFC 9113 §5.1 "closed").
	resets resetRing
	// settingsOut and pingsOut count the SETTINGS and PINGs (not acks)
	// we queued and the peer has not acknowledged: an acknowledgement
	// beyond them answers nothing, and costs a glitch (ackLocked).
	settingsOut, pingsOut int
	goAways               int // GOAWAY frames received

	// toRelease holds buffers no queue needs any more but that the write in
	// progress may still be reading; the writer returns them to the pool
	// before it takes its next batch.
	toRelease []*pbuf
	// retryBuffer is Config.RetryBufferSize; backend connections keep up to
	// that many written request bytes per attempt for a retry.
	retryBuffer int
}

// stepLocked applies ev to the state st of stream id (RFC 9113 §5.1) and
// reports the result and whether the stream ended with it. A stream we
// reset while the peer could still send on it is remembered, so that its
// frames in flight are ignored once it is gone. Caller must hold mu.
func (t *transport) stepLocked(st *h2state, id uint32, ev h2event) (res h2result, ended bool) {
	prev := *st
	if res = st.apply(ev); res != resOK {
		return res, false
	}
	if ev == evSendReset && !prev.recvEnded() && id != 0 {
		t.resets.add(id)
	}
	return res, !prev.ended() && st.ended()
}

// resetAllowance is what a peer may still send on a stream we reset while
// it could send, before it learns of the reset: the largest window we
// grant a stream, and a few frames more (resetRing.spend).
func (t *transport) resetAllowance() int64 {
	return int64(max(t.streamWindow, t.maxStreamWindow)) + 4*strayCost
}

// releaseLocked returns b to the pool once the writer is past the write in
// progress. Caller must hold mu.
func (t *transport) releaseLocked(b *pbuf) {
	switch st := t.wstate.Load(); {
	case st == wDone, t.wake == nil && (st == wNotStarted || st == wIdle || st == wParked):
		// No writer runs, so no write is reading b, and the next
		// writer must take mu first: back to the pool at once,
		// rather than held by an idle connection. wDone is also the
		// persistent writer's once writeLoop returned: what is
		// released after it would otherwise wait in toRelease for
		// good.
		putBuf(b)
		return
	}
	t.toRelease = append(t.toRelease, b)
}

type creditOp struct {
	src    *transport
	credit *recvState
	n      int32
}

// writeScratch is what a writer needs only while it writes: a write Framer
// (whose buffer keeps the largest frame it wrote), the buffer header
// blocks are encoded into, and the batch. It holds no connection state:
// the HPACK encoder's table stays with the transport.
type writeScratch struct {
	out   switchWriter // the Framer's destination: the writing transport's bw
	fr    *http2.Framer
	hbuf  []byte // a header block being encoded
	batch []writeOp
	dhdr  [9]byte // a DATA frame's header: see writeData
	// blocked holds, during writeStep, the streams whose DATA waits for
	// the connection window.
	blocked []*sendQueue
	// refs holds the batch's references to the streams its ops refer to
	// (their header fields, their credit's recvState, their queues):
	// taken under mu as the ops are built, let go of once writeFrames
	// and applyCredits are done with the batch (writeStep).
	refs []*stream
}

var scratchPool = sync.Pool{New: func() any {
	sc := new(writeScratch)
	sc.fr = http2.NewFramer(&sc.out, nil)
	return sc
}}

// switchWriter is an io.Writer whose destination is set by its user.
type switchWriter struct{ w io.Writer }

func (s *switchWriter) Write(p []byte) (int, error) { return s.w.Write(p) }

// takeScratch gives the writer its scratch. Writer only.
func (t *transport) takeScratch() {
	if t.sc != nil {
		return
	}
	sc := scratchPool.Get().(*writeScratch)
	sc.out.w = t.bw
	t.sc = sc
}

// dropScratch gives the scratch back: the writer is about to exit with
// nothing written but not flushed. Writer only.
func (t *transport) dropScratch() {
	sc := t.sc
	if sc == nil {
		return
	}
	t.sc = nil
	sc.out.w = nil
	sc.hbuf = sc.hbuf[:0]
	if cap(sc.hbuf) > 4<<10 {
		sc.hbuf = nil // a rare large header block is not kept
	}
	clear(sc.batch)
	sc.batch = sc.batch[:0]
	scratchPool.Put(sc)
}

// init prepares a transport without a socket; attach adds the socket.
// Backend connections queue streams between the two, while they dial.
func (t *transport) init(streamWindow, connWindow int32, maxHeaderList uint32, log *slog.Logger) {
	t.log = log
	t.streamWindow = streamWindow
	t.connWindow = connWindow
	t.maxHeaderList = maxHeaderList
	t.sendWindow = defaultInitialWindowRFC
	t.peerInitWin = defaultInitialWindowRFC
	t.peerMaxFrame = maxFrameSize
	t.peerMaxStream = ^uint32(0)
	t.recvWindow = defaultInitialWindowRFC
}

// attach gives the transport its socket. It must be called before the
// reader and writer start.
func (t *transport) attach(nc net.Conn) {
	t.cr = newConnReader(nc)
	t.cg = &contGuard{r: t.cr}
	t.newReadFramer()
	t.bw = newConnWriter(nc)
	t.mu.Lock()
	t.nc = nc
	t.mu.Unlock()
}

// newReadFramer gives the reader a new Framer. Between frames, outside a
// header block, a new one is as good as the old: it keeps no state across
// frames but a buffer the size of the largest frame it read (x/net's
// getReadBuf), which a parking connection lets go of this way. Reader
// only.
func (t *transport) newReadFramer() {
	t.cg.largest = 0
	t.rfr = http2.NewFramer(nil, t.cg)
	// ReadMetaHeaders stays nil: readFrame assembles header blocks.
	// t.hd.dec and t.henc are made at their first header block.
	t.rfr.MaxHeaderListSize = t.maxHeaderList
	t.rfr.SetMaxReadFrameSize(maxFrameSize)
	t.rfr.SetReuseFrames()
}

// The on-demand writer's states. A connection that has nothing to write
// has no writer goroutine (issue 12: an idle client connection costs its
// reader's stack, not two): signal starts one when it finds none running.
// Once everything queued is written and flushed the writer exits if the
// connection has no stream open, and parks otherwise, so that a busy
// connection does not start a goroutine per burst; the server's
// housekeeper makes parked writers exit about once a second (reapWriter).
const (
	wNotStarted int32 = iota // serve has not started writing: signal does nothing
	wIdle                    // no writer goroutine; the next signal starts one
	wRunning                 // a writer goroutine runs
	wKicked                  // it runs, and was signalled since it last took work
	wParked                  // it waits on park with nothing to do
	wReaping                 // the housekeeper told the parked writer to exit
	wDone                    // the writer finished for good (closed, or drained)
)

// usePersistentWriter makes t's writer the long-lived writeLoop, woken by
// signal through a channel. Backend connections use it: they are few, and
// their run goroutine is the writer.
func (t *transport) usePersistentWriter() {
	t.wake = make(chan struct{}, 1)
}

// writerOwner is the connection an on-demand writer works for.
type writerOwner interface {
	role
	// streamsLocked reports whether more is likely to come (streams are
	// open, or were lately): then a writer with nothing to write parks
	// for the next burst rather than exit. Called with mu held.
	streamsLocked() bool
	// writerFinished is called on the writer goroutine, once, when
	// writing ends for good: nil after a drain completed, the error
	// otherwise.
	writerFinished(err error)
}

// startOnDemand lets signal start writers for o from now on, and starts
// one for what is queued already.
func (t *transport) startOnDemand(o writerOwner) {
	t.owner = o
	t.wstate.Store(wIdle)
	t.signal()
}

// signal tells the writer there is work, starting one if none runs. It
// never blocks. Work must be queued (under mu) before signal is called.
// signalPingAck has the answer to a PING, just queued, written within
// ackDelay (Config.PingAckDelay): with whatever the writer writes next, or
// on its own when the timer fires first.
func (t *transport) signalPingAck() {
	if t.ackDelay <= 0 {
		t.signal()
		return
	}
	if t.ackTimer == nil {
		// Made (stopped) before ackArmed is set, which publishes it to
		// the writer (ackTaken).
		t.ackTimer = time.AfterFunc(time.Hour, t.ackTimeout)
		t.ackTimer.Stop()
	}
	if !t.ackArmed.CompareAndSwap(false, true) {
		return // a timer runs for an earlier answer, still queued
	}
	t.ackTimer.Reset(t.ackDelay)
}

// ackTimeout is the PING answers' timer: nothing else was written within
// ackDelay, so the writer writes them on their own.
func (t *transport) ackTimeout() {
	if t.ackArmed.Swap(false) {
		t.signal()
	}
}

// onlyPingAnswers reports whether batch holds nothing but answers to
// PINGs.
func onlyPingAnswers(batch []writeOp) bool {
	for i := range batch {
		if batch[i].kind != opPing || !batch[i].end {
			return false
		}
	}
	return true
}

// ackTaken is called by the writer when it takes the queued PING answers
// with other frames to write: they need their timer no more.
func (t *transport) ackTaken() {
	if t.ackArmed.Swap(false) {
		t.ackTimer.Stop()
	}
}

func (t *transport) signal() {
	if t.wake != nil {
		select {
		case t.wake <- struct{}{}:
		default:
		}
		return
	}
	for {
		switch st := t.wstate.Load(); st {
		case wIdle:
			if t.wstate.CompareAndSwap(wIdle, wRunning) {
				if t.starts != nil {
					t.starts.Add(1)
				}
				go t.runWriter()
				return
			}
		case wRunning:
			if t.wstate.CompareAndSwap(wRunning, wKicked) {
				return
			}
		case wParked, wReaping:
			if t.wstate.CompareAndSwap(st, wRunning) {
				t.unpark()
				return
			}
		default: // not started, already kicked, or done
			return
		}
	}
}

// unpark wakes a parked writer. A token left over (the writer woke for
// another reason first) costs it one empty look at the queues later.
func (t *transport) unpark() {
	select {
	case t.park <- struct{}{}:
	default:
	}
}

// reapWriter makes a parked on-demand writer exit and let go of its
// scratch. The server's housekeeper calls it about once a second for
// every client connection.
func (t *transport) reapWriter() {
	if t.wstate.CompareAndSwap(wParked, wReaping) {
		t.unpark()
	}
}

// runWriter is an on-demand writer: it writes until nothing is queued and
// nothing is buffered, then parks until signalled, or exits when reaped.
// The compare-and-swap to wIdle is its last act, so at most one runs at a
// time and each hands the writer-only fields to the next through wstate.
func (t *transport) runWriter() {
	for {
		t.wstate.Store(wRunning) // work signalled before this is taken below
		switch st, err := t.writeStep(t.owner); st {
		case stepExit:
			t.wstate.Store(wDone)
			t.freeReleased()
			t.owner.writerFinished(err)
			return
		case stepIdle:
			if !t.parkOK {
				t.releaseIdle()
				if t.wstate.CompareAndSwap(wRunning, wIdle) {
					return
				}
				continue // signalled meanwhile
			}
			if t.park == nil {
				// Made by the first writer that parks; signal and
				// reapWriter read it only after they saw wParked.
				t.park = make(chan struct{}, 1)
			}
			if !t.wstate.CompareAndSwap(wRunning, wParked) {
				continue // signalled meanwhile
			}
			<-t.park
			if t.wstate.Load() != wReaping {
				continue // signalled
			}
			t.releaseIdle()
			if t.wstate.CompareAndSwap(wReaping, wIdle) {
				return
			}
			// Signalled while letting go: take the scratch again.
		}
	}
}

// freeReleased returns to their pools the buffers left for the writer to
// release (toRelease) once it has exited, when no write can read them:
// the closed connection's queues, dropped while the writer ran (or was
// blocked on a client that stopped reading), put them there, and
// releaseLocked puts a buffer back at once only after wDone. Dropping
// them to the collector was harmless for pooled buffers; a view holds its
// read buffer from reuse, and the count of pinned buffers (readref.go),
// until freed (attack: 1-3 buffers pinned for good on a live backend
// connection per client that stopped reading, then closed).
func (t *transport) freeReleased() {
	t.mu.Lock()
	t.freeReleasedLocked()
	t.mu.Unlock()
}

// freeReleasedLocked returns what toRelease holds to the pools; while the
// writer holds payloads by reference (connWriter.writePayload), it frees
// them after its next flush instead, since a pending write may read them.
// Caller must hold mu and be the writer, or run when no writer can.
func (t *transport) freeReleasedLocked() {
	for i, b := range t.toRelease {
		if t.bw != nil && t.bw.holdsRefs() { // nil: a dial that failed
			t.bw.freeAfterWrite(b)
		} else {
			putBuf(b)
		}
		t.toRelease[i] = nil
	}
	t.toRelease = t.toRelease[:0]
}

// writerGone is called when a persistent writer will not run again
// (writeLoop returned, or the connection ended before it started): from
// then on releaseLocked frees at once, and what toRelease holds is freed.
func (t *transport) writerGone() {
	t.wstate.Store(wDone)
	t.freeReleased()
}

// releaseIdle lets go of what only a writer needs, before an on-demand
// writer exits: its scratch and the control-frame storage. Writer only.
func (t *transport) releaseIdle() {
	t.dropScratch()
	t.mu.Lock()
	if len(t.ctrl) == 0 {
		t.ctrl = nil
	}
	// Released after this writer's last step began: no step of this
	// writer will free them (everything was flushed, so none is read).
	t.freeReleasedLocked()
	t.mu.Unlock()
}

// queueCtrlLocked queues a frame that is not flow-controlled. Caller must
// hold mu.
func (t *transport) queueCtrlLocked(op writeOp) {
	if t.closed {
		return
	}
	if len(t.ctrl) >= maxQueuedControlFrames {
		// A peer that makes us answer (PING, SETTINGS, resets) faster than
		// it reads: stop queueing; the reader ends the connection with
		// ENHANCE_YOUR_CALM (CVE-2019-9512/9515, as x/net/http2 does).
		t.ctrlOverflow.Store(true)
		return
	}
	t.ctrl = append(t.ctrl, op)
	switch {
	case op.kind == opSettings:
		t.settingsOut++
	case op.kind == opPing && !op.end:
		t.pingsOut++
	}
}

// ackLocked takes a peer's acknowledgement of one of our SETTINGS or
// PINGs (out is settingsOut or pingsOut) and charges p a glitch for one
// that answers nothing we sent: such acks do no work, and unbounded, a
// flood of them (9 or 17 bytes each) kept a core busy for as long as the
// peer sent them. Caller must hold mu.
func (t *transport) ackLocked(p errorPolicy, out *int, what string) error {
	if *out > 0 {
		*out--
		return nil
	}
	return p.glitchLocked(1, what)
}

// maxQueuedControlFrames bounds the control frames waiting for the writer.
const maxQueuedControlFrames = 10000

// markReadyLocked puts q in the ready ring if its head item can be written.
// Caller must hold mu.
//
// The ring owns a reference to q's stream while q is in it (q.ready):
// the writer pops and inspects queues that were emptied (removeLocked,
// discardLocked) after their stream may have ended, and must not find
// them another call's. readyPopLocked hands the reference to its caller.
// A closed connection's ring stays empty (close, dropReadyLocked): it
// will not be written.
func (t *transport) markReadyLocked(q *sendQueue) {
	if !q.ready && !t.closed && q.eligible() {
		q.ready = true
		q.refOwner() // the ring's
		t.ready = append(t.ready, q)
	}
}

// creditDiv is how finely windows are returned: a WINDOW_UPDATE goes once
// 1/creditDiv of the window is unreturned, for a stream (of its target)
// and for the connection, so that a steady stream costs few control
// frames. The hold-back's window target rests on it (holdTarget). Half
// would halve the WINDOW_UPDATEs of a 1 MiB answer (8 to 4 per stream),
// for no CPU per MiB a same-time A/B could tell here (BENCHMARKS.md,
// "Session 11"), and would double the window a held message needs,
// refusing settings that worked.
const creditDiv = 4

// creditLocked returns n handed-on bytes of stream r to the peer, sending a
// WINDOW_UPDATE once 1/creditDiv of the stream's window (its target) has
// accumulated so that a steady stream costs few control frames; with it,
// the window may grow (growLocked). Caller must hold mu.
func (t *transport) creditLocked(r *recvState, n int32) {
	if r == nil || n <= 0 {
		return
	}
	if r.held > 0 {
		t.unholdLocked(r, min(n, r.held))
	}
	if r.done {
		return
	}
	r.unacked += n
	target := r.target
	if target == 0 {
		target = t.streamWindow
	}
	if r.id != 0 && r.unacked >= target/creditDiv {
		inc := r.unacked + t.growLocked(r, target)
		// RFC 9113 §6.9.1: a window never exceeds 2^31-1. target is
		// bounded by maxStreamWindow (<= maxWindow), and window+unacked
		// never exceeds the target; the clamp is the rule made explicit.
		if int64(r.window)+int64(inc) > maxWindow {
			inc = maxWindow - r.window
		}
		t.queueCtrlLocked(writeOp{kind: opWindowUpdate, streamID: r.id, val: uint32(inc)})
		r.window += inc
		r.unacked = 0
	}
}

// growLocked decides whether stream r's window grows as its handed-on
// bytes are returned, and returns by how much (0: it stays at target).
// This is the response direction's bound: a backend stream starts with
// the small window of the backend connection's SETTINGS
// (Config.BackendStreamWindow), which is all a client that never reads
// can make the proxy hold for it; the window grows to
// Config.BackendMaxStreamWindow, or as far towards it as the connection's
// response share allows (a stream that got only part of it grows again on
// a later probe), only
//
//   - when the client reads what it is sent: bytes written to its socket
//     are not evidence of that (the kernel buffers megabytes for a client
//     that never reads), so the client connection sends a PING after them,
//     a drain probe, and the window grows at most once per probe the
//     client acknowledged (bufBudget.drainedSince), as grpc-go's BDP
//     estimator measures with PINGs; a client that never reads never
//     makes its streams grow;
//   - when the backend ran short of window (a quarter or less of the
//     target left): the window limited it, as grpc-go's BDP estimator
//     grows its window only when a round trip's bytes filled it;
//   - while the client connection's buffers are at most half its budget
//     (MaxConnBufferedBytes), and the growth of all its streams together
//     stays within a quarter of that budget (responseShare), and the
//     windows of all its streams within the budget (takeGrowth), counted
//     in the budget until the stream ends (retireLocked).
//
// So a client connection makes the proxy hold at most streams ×
// BackendStreamWindow plus its response share of response bytes, and no
// more than its budget, and a
// fast client's streams run with large windows: few WINDOW_UPDATEs and
// large batches. Caller must hold mu.
func (t *transport) growLocked(r *recvState, target int32) int32 {
	b := r.grow
	if b == nil || target >= t.maxStreamWindow || r.window > target/4 || !b.belowHalf() || b.shareFull() {
		return 0
	}
	// Last, as it asks for a probe when there is no fresh evidence: only
	// a stream that could grow makes the client connection send PINGs.
	if !b.drainedSince(&r.drainSeen) {
		return 0
	}
	d := int32(b.takeGrowth(int64(t.maxStreamWindow - target)))
	r.target = target + d
	return d
}

// startWindowLocked gives a new backend stream r, about to be opened,
// the window its predecessors grew to, when its client connection has
// already shown that it reads what it is sent (a drain probe was
// acknowledged) and its buffers are within half the budget. The growth
// is taken from the connection's response share like any growth
// (growLocked) and counted until the stream ends (retireLocked), so what
// a connection can make the proxy hold is bounded as before: streams ×
// BackendStreamWindow plus the response share. Without it every call,
// even on a connection that had drained megabytes, began with the
// initial window: its backend stalled on it for a round trip through
// the proxy, and the growth cost a hold-back raise, a WINDOW_UPDATE
// with the growth and a drain probe: 1 MiB streams at concurrency 4
// cost 7-11% more CPU per MiB, in more and smaller reads and writes
// (writing fewer WINDOW_UPDATEs alone, by deferring them while a
// backend had half its window left, saved nothing measurable). Starts
// take at most half the share, so that calls that turn out short (a
// unary answer, which never needed the window) cannot keep the streams
// that do from growing. It returns the increment, for a WINDOW_UPDATE
// the caller writes right behind the stream's HEADERS (0: none). Caller
// must hold mu.
func (t *transport) startWindowLocked(r *recvState) int32 {
	b := r.grow
	if b == nil || r.done || r.target >= t.maxStreamWindow || b.drained.Load() == 0 || !b.belowHalf() {
		return 0
	}
	want := int64(t.maxStreamWindow - r.target)
	if b.limit > 0 && b.grown.Load()+want > b.responseShare()/2 {
		return 0
	}
	d := int32(b.takeGrowth(want))
	if d <= 0 {
		return 0
	}
	r.target += d
	r.window += d
	return d
}

// openWindowLocked counts the initial window of a new stream r in the
// budget of its client connection (bufBudget.windows). Caller must hold
// mu.
func (t *transport) openWindowLocked(r *recvState) {
	if r.grow != nil {
		r.grow.windows.Add(int64(r.target))
	}
}

// retireLocked gives back stream r's window, and its growth, to the
// budget it counted in, when the stream ends. Caller must hold mu.
func (t *transport) retireLocked(r *recvState) {
	if b := r.grow; b != nil {
		b.windows.Add(-int64(r.target))
		if r.target > t.streamWindow {
			b.grown.Add(-int64(r.target - t.streamWindow))
		}
	}
	r.grow = nil
}

// unholdLocked counts n bytes of r as handed on (or dropped), and gives
// back the connection window withheld once held fell to half the budget.
// Caller must hold mu.
func (t *transport) unholdLocked(r *recvState, n int32) {
	r.held -= n
	t.held -= int64(n)
	t.maybeGiveBackLocked()
}

// releaseHeldLocked is called when stream r closes: the bytes it held are
// dropped with its queues, and the growth of its window is given back to
// its budget. Caller must hold mu.
func (t *transport) releaseHeldLocked(r *recvState) {
	t.retireLocked(r)
	if r.held > 0 {
		t.unholdLocked(r, r.held)
	}
}

// creditConnLocked returns n bytes of connection-level window, unless the
// connection holds more than its budget of bytes not yet handed on: then
// the window is withheld, and the peer stops sending (RFC 9113 §6.9.1)
// until unholdLocked gives it back. Caller must hold mu.
func (t *transport) creditConnLocked(n int32) {
	t.recvUnacked += n
	if t.withheld {
		return
	}
	if t.budget.over() {
		t.withheld = true
		t.budget.waiting.Store(true)
		if t.onWithhold != nil {
			t.onWithhold()
		}
		return
	}
	if t.recvUnacked >= t.connWindow/creditDiv {
		t.queueCtrlLocked(writeOp{kind: opWindowUpdate, val: uint32(t.recvUnacked)})
		t.recvWindow += t.recvUnacked
		t.recvUnacked = 0
	}
}

// creditStream is creditLocked for callers not holding mu. It wakes the
// writer only if a frame was queued (a WINDOW_UPDATE, a window given back,
// a drain probe): most credits only add to what is not yet returned, and
// a wake-up per DATA frame relayed cost the writer a futex and a trip
// through the scheduler for nothing.
func (t *transport) creditStream(r *recvState, n int32) {
	t.mu.Lock()
	queued := len(t.ctrl)
	t.creditLocked(r, n)
	wake := len(t.ctrl) != queued
	t.mu.Unlock()
	if wake {
		t.signal()
	}
}

// consumeLocked accounts for an inbound DATA frame of length n (payload
// plus padding) on stream r, checking the peer stayed within both windows
// (RFC 9113 §6.9.1). The connection-level window is returned at once: the
// stream window alone bounds what is buffered per stream. Caller must hold
// mu.
func (t *transport) consumeLocked(r *recvState, n int32) (connOK, streamOK bool) {
	if n > t.recvWindow {
		return false, false
	}
	t.recvWindow -= n
	if r == nil {
		t.creditConnLocked(n)
		return true, true
	}
	if n > r.window {
		t.creditConnLocked(n)
		return true, false
	}
	r.window -= n
	r.held += n
	t.held += int64(n)
	t.creditConnLocked(n)
	return true, true
}

// close marks the transport closed and closes the socket, which unblocks
// both goroutines. Safe to call more than once; the first error wins.
func (t *transport) close(err error) {
	t.mu.Lock()
	if !t.closed {
		t.closed = true
		t.closeErr = err
		for _, op := range t.ctrl {
			if op.release && op.buf != nil {
				putBuf(op.buf)
			}
		}
		t.ctrl = nil
		// Nothing in the ready ring will be written: its references
		// go now, or the streams they hold were never reused (a
		// writer blocked on a client that reset the connection left
		// them there).
		t.dropReadyLocked()
	}
	nc := t.nc
	t.mu.Unlock()
	if nc != nil {
		if plainSocket(nc) == nil {
			// A write of crypto/tls's own from Read (the answer to a
			// KeyUpdate, see disarmWrite) may be waiting without a
			// deadline on a peer that does not read, holding the lock
			// that tls.Conn.Close takes to send its close_notify.
			nc.SetWriteDeadline(aLongTimeAgo)
			if u, ok := nc.(interface{ NetConn() net.Conn }); ok && errors.Is(err, os.ErrDeadlineExceeded) {
				// A write timed out: the peer does not read, and
				// tls.Conn.Close would wait up to 5 s more to send it
				// a close_notify (its own deadline) before closing.
				// The socket goes first; Close then fails that write
				// at once.
				u.NetConn().Close()
			}
		}
		nc.Close()
	}
	t.signal()
}

// errClosed is returned by writeLoop when the transport was closed.
var errClosed = errors.New("proxy: connection closed")

// armWrite bounds the next write on the socket by writeTimeout, so a peer
// that stops reading (slowloris, or a client that never reads its
// responses) fails its connection instead of holding the writer, and with
// it every buffer queued behind, for ever. Writer goroutine only.
//
// A deadline set less than a sixteenth of writeTimeout ago is kept: it
// still gives this write at least fifteen sixteenths of writeTimeout, and
// moving it costs a runtime timer update, about 1% of the proxy's CPU per
// call at a moderate rate, where each call is written on its own (issue
// 12).
func (t *transport) armWrite() {
	if t.writeTimeout <= 0 {
		return
	}
	now := time.Now()
	if now.Sub(t.armedAt) < t.writeTimeout/16 {
		return
	}
	t.armedAt = now
	t.nc.SetWriteDeadline(now.Add(t.writeTimeout))
}

// disarmWrite clears the write deadline of a connection that is not a
// plain socket when the writer has nothing more to write. On TLS the
// writer is not the only one that writes: crypto/tls answers a peer's
// KeyUpdate asking for one (RFC 8446 §4.6.3) from inside Read, with the
// connection's write deadline; left armed, that deadline has passed once
// the connection was idle for writeTimeout, the answer fails at once, and
// crypto/tls keeps the error for the next write, which loses the
// connection and every stream on it. The next write arms it again;
// close moves it into the past first, so that nothing of crypto/tls's
// blocks the close (transport.close). Writer goroutine only.
func (t *transport) disarmWrite() {
	if t.armedAt.IsZero() || t.bw.rs != nil {
		return
	}
	t.armedAt = time.Time{}
	t.nc.SetWriteDeadline(time.Time{})
}

// writeFrames writes one batch. It runs on the writer goroutine only.
func (t *transport) writeFrames(batch []writeOp) error {
	// Count HEADERS and DATA before writing them: once the bytes leave
	// (a full buffer flushes in the middle of the batch), the peer's
	// answers to them (a BDP PING, WINDOW_UPDATEs) may be read before this
	// function returns, and must find them counted (calm.go).
	sent := 0
	for i := range batch {
		if k := batch[i].kind; k == opData || k == opHeaders {
			sent++
		}
	}
	if sent > 0 {
		t.dataSent.Store(true)
		t.framesSent.Add(int64(sent))
	}
	for i := range batch {
		op := &batch[i]
		var err error
		switch op.kind {
		case opData:
			err = t.writeData(op)
			if op.credit != nil && op.creditN > 0 {
				t.credit = append(t.credit, creditOp{op.src, op.credit, op.creditN})
			}
		case opHeaders:
			err = t.writeHeaders(op.streamID, op.end, op.fields)
		case opReset:
			err = t.sc.fr.WriteRSTStream(op.streamID, op.code)
		case opSettings:
			err = t.sc.fr.WriteSettings(op.settings...)
		case opSettingsAck:
			err = t.sc.fr.WriteSettingsAck()
		case opPing:
			err = t.sc.fr.WritePing(op.end, op.ping)
		case opGoAway:
			err = t.sc.fr.WriteGoAway(op.val, op.code, op.debug)
		case opWindowUpdate:
			err = t.sc.fr.WriteWindowUpdate(op.streamID, op.val)
		case opTableSize:
			t.encoder().setMaxSizeLimit(op.val)
		}
		*op = writeOp{}
		if err != nil {
			for j := i + 1; j < len(batch); j++ {
				// The connection is lost, but the bytes were taken from
				// their source's window all the same: return it, or a
				// retried call would be short of it for good.
				if o := &batch[j]; o.credit != nil && o.creditN > 0 {
					t.credit = append(t.credit, creditOp{o.src, o.credit, o.creditN})
				}
				if batch[j].release {
					batch[j].mem.freeBuf(batch[j].buf)
				}
				batch[j] = writeOp{}
			}
			return err
		}
	}
	t.dirty = true
	return nil
}

// writeData writes the DATA frame of op (RFC 9113 §6.1, no padding)
// straight into the buffered writer, and frees op's buffer if op releases
// it, once written. x/net's Framer.WriteData would first copy the payload
// into the Framer's own buffer and then that into the writer's: one more
// copy of every relayed byte, about 8% of the CPU of a 1 MiB stream in a
// profile. On a plain socket a large payload is not copied at all
// (connWriter.writePayload). The payload's size is within the peer's
// SETTINGS_MAX_FRAME_SIZE (popLocked takes no more) and the stream id is
// one of ours.
func (t *transport) writeData(op *writeOp) error {
	if pbufDebug {
		debugCheck(op.buf, "writeData")
	}
	h := &t.sc.dhdr
	dataFrameHeader(h, op.streamID, op.end, len(op.data))
	if _, err := t.bw.Write(h[:]); err != nil {
		if op.release {
			op.mem.freeBuf(op.buf)
		}
		return err
	}
	return t.bw.writePayload(op.data, op.buf, op.mem, op.release)
}

// dataFrameHeader fills h with the header of an unpadded DATA frame of n
// bytes (RFC 9113 §4.1, §6.1).
func dataFrameHeader(h *[9]byte, id uint32, end bool, n int) {
	h[0], h[1], h[2] = byte(n>>16), byte(n>>8), byte(n)
	h[3] = byte(http2.FrameData)
	h[4] = 0
	if end {
		h[4] = byte(http2.FlagDataEndStream)
	}
	binary.BigEndian.PutUint32(h[5:], id&(1<<31-1))
}

// writeHeaders HPACK-encodes fields and writes them as one HEADERS frame
// and as many CONTINUATION frames as the peer's frame size requires
// (RFC 9113 §6.10). The encoder's dynamic table follows the order blocks
// are written in, which is why only the writer encodes.
func (t *transport) writeHeaders(id uint32, end bool, fields []hpack.HeaderField) error {
	if streamDebug {
		debugCheckFields(fields, "writeHeaders")
	}
	block := t.encoder().appendBlock(t.sc.hbuf[:0], fields)
	t.sc.hbuf = block
	max := int(t.maxFrame())
	first := true
	for first || len(block) > 0 {
		frag := block
		if len(frag) > max {
			frag = frag[:max]
		}
		block = block[len(frag):]
		var err error
		if first {
			err = t.sc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: frag, EndStream: end, EndHeaders: len(block) == 0})
			first = false
		} else {
			err = t.sc.fr.WriteContinuation(id, len(block) == 0, frag)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// encoder returns the connection's HPACK encoder, made at its first use
// so that a connection that never carries a call holds none. Writer only.
func (t *transport) encoder() *hpackEncoder {
	if t.henc == nil {
		t.henc = newHpackEncoder()
	}
	return t.henc
}

func (t *transport) maxFrame() uint32 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.peerMaxFrame
}

// unrefBatch lets go of the batch's references to streams, once the batch
// is written and its credits applied. Writer only, with no mu held.
func (t *transport) unrefBatch() {
	for i, s := range t.sc.refs {
		s.unref()
		t.sc.refs[i] = nil
	}
	t.sc.refs = t.sc.refs[:0]
}

// applyCredits returns the window for bytes this writer sent on to their
// source connections. Runs on the writer, with no mu held.
func (t *transport) applyCredits() {
	for i, c := range t.credit {
		c.src.creditStream(c.credit, c.n)
		t.credit[i] = creditOp{}
	}
	t.credit = t.credit[:0]
}

// popDataLocked takes up to one frame's worth of the head item of q,
// within the stream and connection windows, and returns the op to write.
// Caller must hold mu. end reports whether the op carries END_STREAM or is
// a reset, i.e. whether the stream is done being sent on this connection.
func (t *transport) popLocked(q *sendQueue, id uint32) (op writeOp, last bool) {
	if streamDebug {
		if s := q.owner(); s != nil {
			s.live("popLocked")
		}
	}
	it := &q.items[q.head]
	switch it.kind {
	case itemHeaders:
		op = writeOp{kind: opHeaders, streamID: id, end: it.end, fields: it.fields}
		last = it.end
	case itemReset:
		op = writeOp{kind: opReset, streamID: id, code: it.code}
		last = true
	default:
		n := it.n - it.off
		// Either window may be negative (a lower
		// SETTINGS_INITIAL_WINDOW_SIZE, RFC 9113 §6.9.2): an empty
		// END_STREAM frame still goes, taking nothing.
		allowed := max(0, min(n, int(q.window), int(t.sendWindow)))
		if n > 0 && allowed <= 0 {
			return writeOp{}, false // caller checked eligibility; defensive
		}
		op = writeOp{kind: opData, streamID: id, src: q.src, credit: q.credit, mem: q.mem}
		if it.buf != nil {
			op.data = it.buf.b[it.off : it.off+allowed]
			op.buf = it.buf
		}
		if from, to := max(it.off, it.credited), it.off+allowed; to > from {
			op.creditN = int32(to - from)
		}
		q.window -= int32(allowed)
		t.sendWindow -= int32(allowed)
		if s := q.s; s != nil {
			// Counted as taken for writing, not as queued: what a
			// failure or reset drops from the queue never reached the
			// client (CallInfo.ResponseBytes).
			s.bytesOut += int64(allowed)
		}
		if allowed < n {
			it.off += allowed // partial: the rest waits for window
			return op, false
		}
		op.release = it.buf != nil
		op.end = it.end
		last = it.end
	}
	if a := q.a; a != nil && a.keepReplay && op.kind != opReset {
		t.retainLocked(a, it, &op)
	}
	*it = outItem{}
	q.head++
	if q.empty() {
		q.items = q.items[:0]
		q.head = 0
	}
	return op, last
}

// retainLocked keeps a written request item of attempt a for a retry,
// instead of releasing its buffer, while the attempt's replay fits the
// retry buffer; past it, the attempt can no longer be retried and what was
// kept is released. Caller must hold mu.
//
// The replay is counted by the capacity of the buffers it holds, not by
// the bytes in them: a pooled buffer is its full size whatever it carries,
// and 10,000 one-byte DATA frames kept one buffer each would hold 160 MiB
// against a 64 KiB budget. So the replay is kept packed: DATA fills the
// room left in the replay's last buffer first, and what does not fit goes
// to a buffer of its own, copied into one sized for it (the item's buffer
// may still be read by the write of op, so its bytes cannot be moved).
// Every buffer of the replay but the last is then full, and a request of
// N bytes keeps less than N bytes plus one buffer (16 KiB). Only an item
// that starts a buffer is kept in its own, without a copy. Filling only
// when a whole item fit, 9,000-byte messages kept a 16 KiB buffer each,
// and a call of five (45 KB) was not retried with the 64 KiB default.
func (t *transport) retainLocked(a *attempt, it *outItem, op *writeOp) {
	if pbufDebug {
		debugCheck(it.buf, "retainLocked")
		for i := range a.replay {
			debugCheck(a.replay[i].buf, "retainLocked (replay)")
		}
	}
	if it.kind == itemData && it.buf != nil {
		if last := len(a.replay) - 1; last >= 0 {
			tail := &a.replay[last]
			if tail.kind == itemData && !tail.end && tail.buf != nil && tail.n < len(tail.buf.b) {
				p := it.buf.b[:it.n]
				c := copy(tail.buf.b[tail.n:], p)
				tail.n += c
				tail.credited = tail.n
				if c == len(p) {
					tail.end = it.end
					return // op.release hands it.buf back to the pool
				}
				t.retainRestLocked(a, it, p[c:])
				return
			}
		}
	}
	n := 0
	if it.buf != nil {
		n = len(it.buf.b)
	}
	if !t.replayRoomLocked(a, n) {
		return
	}
	if a.replay == nil {
		a.replay = a.replayInl[:0]
	}
	a.replay = append(a.replay, outItem{kind: it.kind, end: it.end, buf: it.buf, n: it.n, fields: it.fields, credited: it.n})
	a.replayBytes += n
	op.release = false
}

// retainRestLocked keeps rest, the part of DATA item it that did not fit
// the replay's last buffer, in a buffer of its own. it.buf itself goes
// back to the pool through the write that reads it (op.release). Caller
// must hold mu.
func (t *transport) retainRestLocked(a *attempt, it *outItem, rest []byte) {
	buf := getBuf(len(rest))
	n := len(buf.b)
	if !t.replayRoomLocked(a, n) {
		putBuf(buf)
		return
	}
	a.up.mem.add(n)
	c := copy(buf.b, rest)
	a.replay = append(a.replay, outItem{kind: itemData, end: it.end, buf: buf, n: c, credited: c})
	a.replayBytes += n
}

// replayRoomLocked reports whether n bytes more of buffer capacity may be
// kept in a's replay. When not, the attempt can no longer be retried and
// what it kept is released. Caller must hold mu.
func (t *transport) replayRoomLocked(a *attempt, n int) bool {
	if a.replayBytes+n > t.retryBuffer || (n > 0 && !a.up.mem.belowHalf()) {
		// Over the attempt's retry buffer, or the client connection's
		// budget is more than half used: the call loses its
		// retryability, not its bytes (as Envoy stops buffering a
		// request past its retry buffer limit and lets it go on
		// unretried).
		a.keepReplay = false
		t.releaseReplayLocked(a)
		return false
	}
	return true
}

// releaseReplayLocked lets go of the request bytes kept for a retry.
// Caller must hold mu.
func (t *transport) releaseReplayLocked(a *attempt) {
	for i := range a.replay {
		if b := a.replay[i].buf; b != nil {
			a.up.mem.sub(len(b.b))
			t.releaseLocked(b)
		}
		a.replay[i] = outItem{}
	}
	a.replay = nil
	a.replayBytes = 0
}

// readyPopLocked removes and returns the first stream of the ready ring,
// with the ring's reference to its stream, which the caller now owns.
// Caller must hold mu.
func (t *transport) readyPopLocked() *sendQueue {
	if t.readyHead == len(t.ready) {
		return nil
	}
	q := t.ready[t.readyHead]
	t.ready[t.readyHead] = nil
	t.readyHead++
	if t.readyHead == len(t.ready) {
		t.ready = t.ready[:0]
		t.readyHead = 0
	} else if t.readyHead > 64 && t.readyHead*2 > len(t.ready) {
		n := copy(t.ready, t.ready[t.readyHead:])
		clear(t.ready[n:])
		t.ready = t.ready[:n]
		t.readyHead = 0
	}
	q.ready = false
	return q
}

// dropReadyLocked empties the ready ring, letting go of its references.
// Caller must hold mu.
func (t *transport) dropReadyLocked() {
	for t.readyHead < len(t.ready) {
		t.readyPopLocked().unrefOwner()
	}
}

// role is what differs between the two kinds of connection as seen by the
// writer. Both methods are called with mu held.
type role interface {
	// openLocked appends HEADERS for streams waiting to be opened, if the
	// role opens streams (backend connections do).
	openLocked(batch []writeOp) []writeOp
	// sentLastLocked is called when the END_STREAM or RST_STREAM of q was
	// taken for writing on this connection.
	sentLastLocked(q *sendQueue, reset bool)
	// idleLocked reports whether a draining connection has no stream left
	// and may close.
	idleLocked() bool
}

// batchBudget bounds the DATA bytes taken in one batch, so control frames
// (WINDOW_UPDATE, PING, RST_STREAM) queued meanwhile go out behind at most
// that much DATA of this batch. On a plain socket, payloads written by
// reference are gathered across batches up to vecFlushAt (256 KiB) before
// the write (connbuf.go), so a control frame may wait in the gathered
// bytes behind up to that much, as it would in the socket's buffer.
const batchBudget = 64 << 10

// writeLoop is the connection's only writer. It drains control frames and
// ready streams in batches, writes them into a buffered writer and flushes
// when there is nothing more to write, so many small frames cost one
// syscall. It returns when the transport is closed or, while draining, when
// nothing is left. It is the persistent writer (usePersistentWriter); an
// on-demand transport runs the same steps in runWriter.
func (t *transport) writeLoop(r role) error {
	for {
		switch st, err := t.writeStep(r); st {
		case stepExit:
			t.writerGone()
			return err
		case stepIdle:
			<-t.wake
		}
	}
}

type writeStepResult uint8

const (
	stepWrote writeStepResult = iota // wrote a batch or flushed: look again
	stepIdle                         // nothing queued, nothing buffered
	stepExit                         // closed, or drained: writing is over
)

// writeStep takes one batch of control frames and ready streams and writes
// it, or flushes what is buffered when nothing is queued. Writer only.
func (t *transport) writeStep(r role) (writeStepResult, error) {
	t.mu.Lock()
	if t.closed {
		err := t.closeErr
		t.mu.Unlock()
		t.bw.discard() // payloads held by reference go back to their pools
		return stepExit, err
	}
	t.maybeGiveBackLocked()
	// The previous batch is written: buffers it may have been reading
	// can go back to the pool now, or after the next flush.
	t.freeReleasedLocked()
	t.takeScratch()
	batch := append(t.sc.batch[:0], t.ctrl...)
	clear(t.ctrl)
	t.ctrl = t.ctrl[:0]
	if t.abandon {
		t.dropReadyLocked()
	}
	batch = r.openLocked(batch)
	budget := batchBudget
	blocked := t.sc.blocked[:0]
	for budget > 0 && t.readyHead < len(t.ready) {
		q := t.ready[t.readyHead]
		if !q.eligible() {
			// Dropped, detached, or its window shrank (a lower
			// SETTINGS_INITIAL_WINDOW_SIZE, RFC 9113 §6.9.2) while it
			// waited; a WINDOW_UPDATE puts it back.
			t.readyPopLocked()
			q.unrefOwner() // the ring's; q may be reset by it
			continue
		}
		t.readyPopLocked() // the ring's reference is ours now
		if q.needsWindow() && t.sendWindow <= 0 {
			// RFC 9113 §6.9.1: its DATA waits for a connection
			// WINDOW_UPDATE. Only DATA is flow-controlled: the header
			// blocks, resets and empty END_STREAM frames of the streams
			// behind it go on.
			blocked = append(blocked, q) // with the reference
			continue
		}
		op, last := t.popLocked(q, q.id)
		if op.streamID == 0 {
			q.unrefOwner()
			continue // nothing could be taken (unreachable after eligible)
		}
		if qs := q.owner(); qs != nil {
			// The ring's reference goes to the batch: the op may
			// refer to the stream's fields or recvState, and
			// sentLastLocked below may end the stream.
			t.sc.refs = append(t.sc.refs, qs)
		}
		batch = append(batch, op)
		budget -= len(op.data) + 64
		if op.kind == opHeaders && q.s != nil && !interimBlock(op.fields) {
			// From here on a failure must use trailers. Not after an
			// informational (1xx) block: the final headers are still
			// to come, and trailers without :status after it were a
			// malformed response.
			q.s.headersSent = true
		}
		if last {
			q.closed = true
			q.drop(t)
			r.sentLastLocked(q, op.kind == opReset)
			continue
		}
		t.markReadyLocked(q)
	}
	// The streams waiting for the connection window go back in the
	// ring, in their order, for the WINDOW_UPDATE that reopens it
	// (handleWindowUpdateLocked wakes the writer).
	for i, q := range blocked {
		t.markReadyLocked(q) // a reference of the ring's again
		q.unrefOwner()       // the one it held while blocked
		blocked[i] = nil
	}
	t.sc.blocked = blocked[:0]
	if len(batch) > 0 && t.ackArmed.Load() {
		if onlyPingAnswers(batch) {
			// Woken for something that wrote nothing (a window credit
			// under the threshold): the answers wait on for other
			// frames, or for their timer (signalPingAck).
			t.ctrl = append(t.ctrl, batch...)
			clear(batch)
			batch = batch[:0]
		} else {
			t.ackTaken()
		}
	}
	exit := len(batch) == 0 && t.drainAndClose && r.idleLocked()
	if len(batch) == 0 && t.owner != nil {
		t.parkOK = t.owner.streamsLocked()
	}
	t.mu.Unlock()

	t.sc.batch = batch
	if len(batch) == 0 {
		if exit {
			t.armWrite()
			return stepExit, t.bw.Flush()
		}
		if !t.dirty {
			t.disarmWrite()
			return stepIdle, nil
		}
		t.armWrite()
		if err := t.bw.Flush(); err != nil {
			t.close(err)
		}
		t.dirty = false
		t.bw.progress.Add(1)
		return stepWrote, nil
	}
	t.armWrite()
	err := t.writeFrames(batch)
	t.sc.batch = batch[:0]
	t.applyCredits()
	t.unrefBatch()
	if err != nil {
		t.bw.discard()
		t.close(err)
		return stepExit, err
	}
	t.bw.progress.Add(1)
	return stepWrote, nil
}
