package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// maxStreamID is the largest HTTP/2 stream id (RFC 9113 §5.1.1).
const maxStreamID = 1<<31 - 1

// backendConn is one HTTP/2 connection to a backend: the proxy is the
// client. It exists before its socket does: streams queue on it while it
// dials, so the client connection's reader never waits for a dial. Its
// goroutines (run, which dials and then writes, and readLoop) are owned by
// the pool.
type backendConn struct {
	transport
	pool *pool
	addr string
	up   *Upstream // whose Dial opened it

	// mu (in transport) guards the fields below.
	streams    map[uint32]*attempt // open backend streams by backend stream id
	pending    []*attempt          // waiting to be opened, in arrival order
	reserved   uint32              // streams open or pending: what the pool counts
	queued     uint32              // of the pending, those reserved over the cap to wait for a slot (pool.queueLocked)
	keyWaiting *atomic.Int64       // the queued of every connection of this one's pool key; shared with them, set at creation
	nextID     uint32
	goingAway  bool        // GOAWAY received, draining, or ids nearly exhausted: take no new streams
	assumedMax uint32      // peer's stream limit assumed until its SETTINGS arrive
	drainTimer *time.Timer // forces the close of a draining connection
	leftBy     uint8       // the set whose departure armed drainTimer (drain)
	// holds are the attempts holding response headers back for a retry
	// (listHoldLocked), each at its holdIdx-1; holdTimer sweeps them
	// (sweepHolds), armed to fire at holdFireAt (monoNow's time; zero
	// while not armed).
	holds      []*attempt
	holdTimer  *time.Timer
	holdFireAt time.Duration
	// peerGoAway: the backend sent GOAWAY. No stream is opened on b from
	// then on (RFC 9113 §6.8), not even one whose slot was reserved just
	// before: grpc-go accepts a stream that races its second GOAWAY into
	// the last stream id and may still close the connection without
	// answering it, so only a stream never sent is safe to move.
	peerGoAway bool
	used       bool      // a stream was reserved since the last idle sweep (see pool.closeIfIdle)
	calm       calmMeter // glitches (calm.go)
	noStreams  bool      // the backend's SETTINGS_MAX_CONCURRENT_STREAMS is 0 (see onPeerSettings)

	holdBound uint32 // Config.ResponseHoldback, 0 when off (holdback.go); immutable

	lastRead atomic.Int64 // unix nanoseconds bytes last arrived, for keepalive (see connReader.lastRead)
}

// errLeftSet is why a connection drained with a bound was closed: its
// backend left the set (RetainBackends, RetainUpstreamBackends) and its
// streams outlived Config.DrainTimeout. The calls cut get it, with the
// timeout, in their status message.
var errLeftSet = errors.New("draining because the backend left the set")

// drain stops new streams on b and closes it once its streams are done.
// A timeout above zero also bounds the wait: after it, b is closed and the
// streams left on it fail with errLeftSet and the timeout. Zero bounds
// nothing (a retired Upstream's connections: their calls run to their
// end, see Server.DrainUpstream); a later drain with a timeout bounds such
// a connection all the same, and the first bound armed stays.
//
// by says which set b's backend left (leftAll, leftUpstream; 0 for a
// drain without a bound): only the same set taking it back lifts the
// bound (rejoined).
func (b *backendConn) drain(timeout time.Duration, by uint8) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.drainTimer != nil || b.closed {
		return
	}
	b.goingAway = true
	b.drainAndClose = true
	if timeout > 0 {
		why := fmt.Errorf("%w: drain timeout %v passed", errLeftSet, timeout)
		b.drainTimer = time.AfterFunc(timeout, func() { b.close(why) })
		b.leftBy = by
	}
	b.signal()
}

// The sets a backend leaves (backendConn.drain's by).
const (
	leftAll      = 1 + iota // the union of the sets (RetainBackends)
	leftUpstream            // its Upstream's own (RetainUpstreamBackends)
)

// requestStartedLocked reports whether the client sent a's backend any of
// its request: a DATA payload, or its end. While the attempt keeps its
// request for a retry (keepReplay), what it wrote is in replay and what
// it did not in its queue. Caller must hold b.mu.
func (a *attempt) requestStartedLocked() bool {
	if a.up.closed || a.replayBytes > 0 {
		return true
	}
	for _, it := range a.up.items[a.up.head:] {
		if it.kind == itemData {
			return true
		}
	}
	return false
}

// Response headers held back for a retry (see onHeaders) wait for the
// first message or the trailers at most heldHeadersMax, and only
// heldHeadersWait while the client has sent none of its request; then
// they go on, and the call is no longer retried. A client may read them
// before it sends (grpc-go's ClientStream.Header blocks until they
// come): on a backend that answers the client's messages only, it waited
// for its deadline. And a long stream (a watch) may send its first
// message minutes after its headers: the client saw none of its answer
// meanwhile. Variables for tests.
var (
	heldHeadersWait = 100 * time.Millisecond
	heldHeadersMax  = time.Second
)

// holdSweepMin is the shortest wait between two sweeps of a connection's
// held headers (sweepHolds): a hold may go on that much past its bound.
const holdSweepMin = 10 * time.Millisecond

// listHoldLocked bounds the hold of a's response headers, just held: a
// joins b's holds, which one timer per connection sweeps (sweepHolds).
// A timer per call (time.AfterFunc, then Stop) made a unary call of a
// --retry-on method cost 1.05x the CPU; a hold mostly lasts until the
// message that follows the headers in the same read, and the
// connection's timer, armed for the earliest bound, is reset only when
// a hold's bound comes before it. The list owns a reference to a.s.
// Caller must hold b.mu.
func (b *backendConn) listHoldLocked(a *attempt) {
	now := monoNow()
	a.holdAt = now
	a.s.ref() // the list's
	b.holds = append(b.holds, a)
	a.holdIdx = int32(len(b.holds))
	b.armHoldsLocked(a.holdBoundLocked(), now)
}

// holdBoundLocked is when a's held headers go on: heldHeadersMax after
// they came, or heldHeadersWait while the client has sent none of its
// request (the bound only grows: a request, once started, stays so).
// Caller must hold a.bc.mu.
func (a *attempt) holdBoundLocked() time.Duration {
	if a.requestStartedLocked() {
		return a.holdAt + heldHeadersMax
	}
	return a.holdAt + min(heldHeadersWait, heldHeadersMax)
}

// armHoldsLocked makes b's hold timer fire at the latest at at (monoNow's
// time; now is the current one), and no sooner than holdSweepMin from
// now. Caller must hold b.mu.
func (b *backendConn) armHoldsLocked(at, now time.Duration) {
	if b.holdFireAt != 0 && b.holdFireAt <= at {
		return
	}
	d := max(at-now, holdSweepMin)
	b.holdFireAt = now + d
	if b.holdTimer == nil {
		b.holdTimer = time.AfterFunc(d, b.sweepHolds)
		return
	}
	b.holdTimer.Reset(d)
}

// unlistHoldLocked takes a out of b's holds, if it is there, and lets go
// of the list's reference. The caller holds a reference of its own to
// a.s, so this one is never the last. Caller must hold b.mu.
func (b *backendConn) unlistHoldLocked(a *attempt) {
	i := int(a.holdIdx) - 1
	if i < 0 {
		return
	}
	a.holdIdx = 0
	last := len(b.holds) - 1
	if i != last {
		m := b.holds[last]
		b.holds[i] = m
		m.holdIdx = int32(i + 1)
	}
	b.holds[last] = nil
	b.holds = b.holds[:last]
	a.s.unref() // the list's
}

// sweepHolds is b's hold timer: it relays the held headers whose bound
// passed (releaseHeldHeaders) and arms the timer for the next bound.
func (b *backendConn) sweepHolds() {
	var dueInl [8]*attempt
	due := dueInl[:0]
	b.mu.Lock()
	b.holdFireAt = 0
	now := monoNow()
	var next time.Duration
	for _, a := range b.holds {
		if at := a.holdBoundLocked(); at <= now {
			a.s.ref() // this sweep's
			due = append(due, a)
		} else if next == 0 || at < next {
			next = at
		}
	}
	if next != 0 {
		b.armHoldsLocked(next, now)
	}
	b.mu.Unlock()
	for i, a := range due {
		s := a.s
		s.cc.releaseHeldHeaders(a)
		s.unref() // this sweep's
		due[i] = nil
	}
}

// releaseHeldHeaders relays the response headers held back on a, listed
// in its connection's holds, once their bound passed (holdBoundLocked;
// the sweep found it passed, but the client may have started its request
// since). Under the client connection's mu, so that the headers are
// queued before anything the backend reader relays next. Called with no
// lock held and a reference to a.s.
func (c *serverConn) releaseHeldHeaders(a *attempt) {
	s := a.s
	c.mu.Lock()
	b := a.bc
	b.mu.Lock()
	if a.holdIdx == 0 {
		b.mu.Unlock()
		c.mu.Unlock()
		return
	}
	if s.att != a || s.down.closed || s.cst.ended() || a.discarded || a.held == nil || a.forwarded {
		b.unlistHoldLocked(a)
		b.mu.Unlock()
		c.mu.Unlock()
		return
	}
	if at, now := a.holdBoundLocked(), monoNow(); at > now {
		b.armHoldsLocked(at, now)
		b.mu.Unlock()
		c.mu.Unlock()
		return
	}
	held := b.forwardLocked(a)
	b.mu.Unlock()
	s.active = true
	if c.responseOverPeerLocked(a, held) || c.responseOverBudgetLocked(a, held) {
		clear(held)
		c.mu.Unlock()
		c.signal()
		b.resetUp(a, http2.ErrCodeCancel)
		return
	}
	s.noteResponseHeadersLocked(held)
	s.down.push(outItem{kind: itemHeaders, fields: held})
	c.markReadyLocked(&s.down)
	c.mu.Unlock()
	c.signal()
}

// goingAwayConnsFactor bounds the connections to one backend, going
// away or not, at this many times MaxBackendConns (see takingLocked).
const goingAwayConnsFactor = 16

// rejoined lifts the bound drain put on b when its backend left the set,
// now that the backend is in the set again (a DNS answer or registry
// listing that left it out once, a flap): the streams b carries are no
// longer cut when the drain timeout passes, "because the backend left
// the set", which it no longer has. b still takes no new stream (a new
// connection takes the backend's new calls) and closes once its streams
// are done; a later departure bounds it again, from then. A bound whose
// timer already fired is left to close b.
//
// by is the set that has it again (leftAll, leftUpstream): the union of
// the sets keeps an address that one Upstream's set left while another's
// still lists it, and must not lift that Upstream's bound.
func (b *backendConn) rejoined(by uint8) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.drainTimer != nil && b.leftBy == by && !b.closed && b.drainTimer.Stop() {
		b.drainTimer = nil
		b.leftBy = 0
	}
}

func newBackendConn(p *pool, k poolKey) *backendConn {
	cfg := &p.srv.cfg
	addr := k.addr
	b := &backendConn{pool: p, addr: addr, up: k.up, streams: make(map[uint32]*attempt), nextID: 1}
	b.transport.init(cfg.BackendStreamWindow, cfg.ConnWindow, cfg.MaxResponseHeaderListSize, p.srv.log.With("backend", addr))
	b.transport.ackDelay = max(cfg.PingAckDelay, 0)
	b.usePersistentWriter() // run's goroutine is the writer
	b.retryBuffer = cfg.RetryBufferSize
	b.maxStreamWindow = cfg.BackendMaxStreamWindow
	b.holdBound = uint32(cfg.ResponseHoldback)
	b.views = true // readref.go
	// A backend that stops reading must not hold the writer, and the
	// calls queued behind it, for ever.
	b.writeTimeout = cfg.WriteTimeout
	return b
}

// capLocked is how many streams this connection may carry. Caller must
// hold mu.
//
// Until the backend's SETTINGS arrive its limit is unknown, and the RFC's
// initial value is "unlimited"; we assume 100, the smallest limit RFC 9113
// §6.5.2 recommends, so a new connection never takes more streams than a
// well-behaved server accepts. Streams beyond a lower advertised limit are
// picked again (overLimitLocked): another connection, which assumes the
// limit its siblings learned, takes them, or they wait for a slot as
// calls at MaxBackendConns do.
func (b *backendConn) capLocked() uint32 {
	c := b.pool.srv.cfg.BackendStreamsPerConn
	peer := b.assumedMax
	if b.gotSettings {
		peer = b.peerMaxStream
	}
	return min(c, peer)
}

const assumedPeerMaxStreams = 100

// tryReserve takes a stream slot on b, if it has one.
func (b *backendConn) tryReserve() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed || b.goingAway || b.drainAndClose || b.reserved >= b.capLocked() {
		return false
	}
	b.reserved++
	b.used = true
	return true
}

// addAttempt queues a to be opened. The caller reserved a slot with
// tryReserve, holds a.s.cc.mu, and has put the attempt's first request
// items in a.up. If b failed meanwhile it returns why (errClosed when no
// reason was given); a is then unlinked and the caller decides what happens
// to the stream.
func (b *backendConn) addAttempt(a *attempt) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	// The response window starts small and grows only while the client
	// drains it, within its connection's budget (transport.growLocked).
	a.downRecv = recvState{window: b.streamWindow, target: b.streamWindow, grow: a.s.cc.budget}
	b.openWindowLocked(&a.downRecv)
	if b.closed || b.peerGoAway {
		b.unlinkLocked(a)
		if !b.closed {
			return errPeerGoAway
		}
		if b.closeErr == nil {
			return errClosed
		}
		return b.closeErr
	}
	if b.noStreams {
		// The slot was reserved on the assumed limit, and the backend's
		// SETTINGS said 0 before the attempt got here: onPeerSettings
		// moved the waiting attempts elsewhere, and this one would wait
		// for a slot that does not come.
		b.unlinkLocked(a)
		return errNoStreams
	}
	if b.overLimitAddLocked(a) {
		// The backend's SETTINGS came, or lowered its limit, after the
		// slot was reserved, and leave it none: a is picked again, as
		// the attempts onPeerSettings found pending are
		// (overLimitLocked).
		b.unlinkLocked(a)
		return errOverLimit
	}
	a.s.ref()                // pending's, until the attempt leaves the list
	a.waits = !b.gotSettings // for the handshake (attemptFields), with or without a timer
	b.pending = append(b.pending, a)
	b.signal()
	return nil
}

// errPeerGoAway is addAttempt's answer when the backend's GOAWAY arrived
// after the attempt's slot was reserved.
var errPeerGoAway = errors.New("backend sent GOAWAY")

// errOverLimit is addAttempt's answer when the backend's
// SETTINGS_MAX_CONCURRENT_STREAMS, learned or lowered after the attempt's
// slot was reserved, leaves it no slot.
var errOverLimit = errors.New("backend's stream limit leaves no slot")

// errNoStreams is addAttempt's answer when the backend advertised
// SETTINGS_MAX_CONCURRENT_STREAMS=0 after the attempt's slot was reserved.
var errNoStreams = errors.New("backend takes no stream")

// run dials the backend, then writes until the connection ends, and
// finally fails every stream still on it with UNAVAILABLE.
func (b *backendConn) run(ctx context.Context) {
	cfg := &b.pool.srv.cfg
	dctx, cancel := context.WithTimeout(ctx, cfg.ConnectTimeout)
	nc, err := b.up.dial(dctx, "tcp", b.addr)
	cancel()
	if err != nil {
		b.mu.Lock()
		b.closed = true
		b.closeErr = fmt.Errorf("connecting: %w", err)
		b.mu.Unlock()
		b.stopDrainTimer()
		b.writerGone() // no writer will run: what the attempts release is freed at once
		if ctx.Err() == nil {
			// Not the pool's own cancel (Shutdown, Close).
			b.countConnectFailure(err)
		}
		b.failAll(failure{kind: failDial, backend: b.addr, cause: err, draining: b.pool.restarting(b.addr)})
		return
	}
	b.lastRead.Store(b.pool.srv.now().UnixNano())
	b.attach(nc)
	b.cr.lastRead, b.cr.now = &b.lastRead, b.pool.srv.now
	b.mu.Lock()
	b.queueCtrlLocked(writeOp{kind: opSettings, settings: []http2.Setting{
		{ID: http2.SettingEnablePush, Val: 0},
		{ID: http2.SettingInitialWindowSize, Val: uint32(cfg.BackendStreamWindow)},
		{ID: http2.SettingMaxFrameSize, Val: maxFrameSize},
		{ID: http2.SettingMaxHeaderListSize, Val: cfg.MaxResponseHeaderListSize},
	}})
	if inc := cfg.ConnWindow - defaultInitialWindowRFC; inc > 0 {
		b.queueCtrlLocked(writeOp{kind: opWindowUpdate, val: uint32(inc)})
		b.recvWindow += inc
	}
	closed, closeErr := b.closed, b.closeErr
	b.mu.Unlock()
	if closed {
		nc.Close()
		b.stopDrainTimer()
		b.writerGone()
		b.failAll(failure{kind: failConnLost, backend: b.addr, cause: closeErr})
		return
	}
	// A backend that accepts TCP but never speaks HTTP/2 must not hold
	// streams: without its SETTINGS in time the connection closes, and its
	// waiting streams, never sent, go elsewhere (each also has its own,
	// shorter, wait: see watchHandshake).
	settingsTimer := time.AfterFunc(cfg.HandshakeTimeout, func() {
		b.mu.Lock()
		got := b.gotSettings
		b.mu.Unlock()
		if !got {
			b.log.Debug("backend sent no SETTINGS; closing the connection", "duration", cfg.HandshakeTimeout)
			b.close(errNoSettings)
		}
	})
	defer settingsTimer.Stop()
	watchDone, watched := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(watched)
		b.watchLoop(watchDone)
	}()
	readerDone := make(chan error, 1)
	writerDone := make(chan struct{})
	go func() {
		err := b.readLoop(b)
		// The read buffer goes back to its pool (or to the views that
		// still need it): the attempts of calls in flight keep b, and
		// with it the reader, until they end.
		b.cr.release()
		b.awaitGoAway(writerDone)
		b.close(err) // stops the writer too
		readerDone <- err
	}()
	var werr error
	if _, err := b.bw.WriteString(http2.ClientPreface); err != nil {
		werr = err
	} else {
		werr = b.writeLoop(b)
	}
	close(writerDone)
	b.close(werr)
	rerr := <-readerDone
	close(watchDone)
	<-watched
	cause := rerr
	if cause == nil || errors.Is(cause, io.EOF) {
		cause = werr
	}
	b.mu.Lock()
	if errors.Is(b.closeErr, errKeepalive) || errors.Is(b.closeErr, errNoSettings) || errors.Is(b.closeErr, errLeftSet) {
		cause = b.closeErr // the reader and writer only saw the socket closed
	}
	handshakeFailed := b.handshakeFailedLocked()
	b.mu.Unlock()
	if handshakeFailed && ctx.Err() == nil {
		b.countConnectFailure(cause)
	}
	b.stopDrainTimer()
	// Forgotten first: the calls failAll sends elsewhere, those never
	// sent among them, may take a new connection to the backend in its
	// place (at MaxBackendConns, b counted against the cap and they
	// failed with its error).
	b.pool.remove(b)
	b.failAll(failure{kind: failConnLost, backend: b.addr, cause: cause})
}

// errNoSettings closes a backend connection whose peer sent no SETTINGS
// within HandshakeTimeout of the dial (RFC 9113 §3.4: it must send them first).
var errNoSettings = errors.New("backend sent no HTTP/2 SETTINGS in time")

// handshakeFailedLocked reports whether b, its socket closed, ended before
// the backend's first SETTINGS for the backend's doing, not the proxy's:
// no SETTINGS in time, a connection error of the backend's (fatal: it
// broke the protocol, its first frame not SETTINGS among others), or the
// socket failing under the reader or the writer (reset, EOF, a write
// error). The proxy's own closes are not: closeAll (errClosed), a drain
// bound (errLeftSet), and a writer that exited, nothing left to write,
// on a connection drained or closed as idle (closeErr nil). See
// Config.CountConnectFailure. Caller must hold mu.
func (b *backendConn) handshakeFailedLocked() bool {
	switch {
	case b.gotSettings:
		return false
	case errors.Is(b.closeErr, errNoSettings), b.fatal:
		return true
	case b.closeErr == nil, errors.Is(b.closeErr, errClosed), errors.Is(b.closeErr, errLeftSet):
		return false
	}
	return true
}

// countConnectFailure reports b as a connection that could not be
// opened, for err, to Config.CountConnectFailure. It runs on b's run
// goroutine, with no lock held.
func (b *backendConn) countConnectFailure(err error) {
	if count := b.pool.srv.cfg.CountConnectFailure; count != nil {
		count(b.up.name, b.addr, err)
	}
}

func (b *backendConn) stopDrainTimer() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.drainTimer != nil {
		b.drainTimer.Stop()
	}
}

// failAll ends every attempt left on b when the connection ended, for the
// reason f. Attempts never opened go to another backend (transparent
// retry); attempts that were sent but not answered are retried only if
// their method opted in; the rest fail with the status of f. The backend is
// gone, so nothing is reset on its side.
func (b *backendConn) failAll(f failure) {
	b.mu.Lock()
	type failed struct {
		a           *attempt
		transparent bool
	}
	// left owns a reference to the stream of each of its attempts, until
	// retryOrFail or failLost returned: a pending attempt's is the one
	// the list had.
	var left []failed
	for _, a := range b.streams {
		a.s.ref() // left's
		left = append(left, failed{a, false})
	}
	for _, a := range b.pending {
		if !a.bClosed {
			left = append(left, failed{a, true})
		} else {
			a.s.unref() // pending's; a may be reset by it
		}
	}
	b.pending = nil
	var gone []*attempt
	var retry []failed
	debug := len(b.streams) > 0 && b.log.Enabled(context.Background(), slog.LevelDebug)
	for _, l := range left {
		if debug && !l.transparent {
			// A stream the backend may have processed, lost with its
			// connection: the call fails unless its method opted in to
			// retries.
			b.log.Debug("backend connection ended with the call in flight", "method", l.a.s.method,
				"stream", l.a.up.id, "answered", l.a.forwarded, "goaway", b.peerGoAway, "err", f.cause)
		}
		if l.transparent || !l.a.forwarded {
			b.unlinkLocked(l.a)
			retry = append(retry, l)
		} else {
			b.closeAttLocked(l.a)
			gone = append(gone, l.a)
		}
	}
	b.mu.Unlock()
	for _, r := range retry {
		s := r.a.s
		s.cc.retryOrFail(r.a, r.transparent, f)
		s.unref() // left's
	}
	for _, a := range gone {
		s := a.s
		s.cc.failLost(a, f)
		s.unref() // left's
	}
}

// connError implements errorPolicy. The GOAWAY's last-stream-id is 0 on
// purpose: RFC 9113 §6.8 defines it as the highest stream id "initiated by
// the sender's peer" that we acted on. Our peer here is the server, whose
// only streams would be pushes, and we refuse those (ENABLE_PUSH=0, §8.4),
// so there is none; the streams we opened are ours and are not named.
// x/net's and grpc-go's clients send 0 too. TestRFC9113BackendSide checks.
func (b *backendConn) connError(err error, code http2.ErrCode, detail error) error {
	var debug []byte
	if detail != nil {
		debug = []byte(detail.Error())
	}
	b.log.Warn("backend connection error; closing the connection", "code", code.String(), "err", err)
	b.mu.Lock()
	b.queueCtrlLocked(writeOp{kind: opGoAway, code: code, debug: debug})
	b.goingAway = true
	b.drainAndClose = true
	b.fatal = true
	b.mu.Unlock()
	b.signal()
	return fmt.Errorf("protocol error from backend: %w", err)
}

// streamError implements errorPolicy. A stream error on a stream the
// connection no longer tracks costs a glitch: a frame the Framer rejects
// with one (a WINDOW_UPDATE of 0, RFC 9113 §6.9) does no work there but
// makes us write a RST_STREAM, and a backend repeating it was answered
// frame for frame without end. One on an open stream ends its call, as
// many as the calls it carries: not charged, so that answers a client
// can have a backend send (headers over MaxResponseHeaderListSize) do not
// cost the connection other clients' calls share.
func (b *backendConn) streamError(se http2.StreamError) error {
	b.mu.Lock()
	var err error
	if b.streams[se.StreamID] == nil {
		err = b.glitchLocked(1, "stream error on a stream not open")
	}
	b.mu.Unlock()
	if err != nil {
		return err
	}
	b.resetFromBackend(se.StreamID, se.Code, true, se.Cause)
	return nil
}

// streamLocked implements streamTable.
func (b *backendConn) streamLocked(id uint32) (*h2state, *sendQueue) {
	if a := b.streams[id]; a != nil {
		return &a.bst, &a.up
	}
	return nil, nil
}

// forgottenLocked implements streamTable. We open odd ids in increasing
// order, nextID being the next; a backend opens none, since we sent
// ENABLE_PUSH=0 (RFC 9113 §8.4).
func (b *backendConn) forgottenLocked(id uint32) h2state {
	if id%2 == 0 || id >= b.nextID {
		return stIdle
	}
	return stClosed
}

// onReset implements frameHandler.
func (b *backendConn) onReset(id uint32, code http2.ErrCode) error {
	b.resetFromBackend(id, code, false, nil)
	return nil
}

// onPingAck implements frameHandler; we send no PING of our own.
func (b *backendConn) onPingAck([8]byte) {}

// settingsApplied implements frameHandler: the backend's handshake is
// done.
func (b *backendConn) settingsApplied() { b.onPeerSettings() }

func (b *backendConn) eachQueueLocked(fn func(*sendQueue)) {
	for _, a := range b.streams {
		fn(&a.up)
	}
}

func (b *backendConn) onHeaders(f *headerBlock) error {
	id := f.StreamID
	end := f.StreamEnded()
	b.mu.Lock()
	a := b.streams[id]
	if a == nil {
		// On an idle stream, a backend opening a stream (§8.4, §5.1.1);
		// on a closed one, STREAM_CLOSED unless we reset it.
		var err error = http2.ConnectionError(http2.ErrCodeProtocol)
		if b.forgottenLocked(id) != stIdle {
			err = b.unknownStreamLocked(b, id, evRecvHeaders, "HEADERS on a closed stream", -1)
		}
		b.mu.Unlock()
		return err
	}
	// The reader's reference, until it is done with a: stepLocked may
	// end the attempt, and with it the call, and what follows hands a
	// to the client connection after mu is released.
	s := a.s
	s.ref()
	defer s.unref()
	if b.stepLocked(a, evRecvHeaders) != resOK {
		b.mu.Unlock()
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeStreamClosed} // §5.1 half-closed (remote)
	}
	if f.Truncated {
		// Over MaxResponseHeaderListSize: what is left would be a response without
		// its status. Reset the stream; the client gets INTERNAL.
		b.mu.Unlock()
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol}
	}
	// A response is up to maxInterimResponses informational (1xx) header
	// blocks, one final one, and trailers, which end the stream (RFC 9113
	// §8.1). Anything else makes it malformed, a stream error
	// PROTOCOL_ERROR (§8.1.1), and the client gets INTERNAL, as a direct
	// grpc-go client fails such an answer: HEADERS without END_STREAM
	// after the final headers (relayed, every block was queued toward the
	// client: a backend repeating a small block of references to a large
	// table entry made the proxy decode and hold a megabyte per 250 bytes
	// it sent), a 1xx block that ends the stream or follows the final
	// headers, and 101 (HTTP/2 has no upgrade, §8.6). So are trailers
	// with a pseudo-header (§8.1) and a response whose :status is missing
	// or not three digits (§8.3.2, RFC 9110 §15): relayed, x/net's client
	// answered the first with a connection error, which cut the client's
	// other calls, and refused the others.
	status := responseStatus(f.Fields)
	interim := interimStatus(status)
	var malformed error
	final := false // this block is the final response headers
	switch {
	case a.finalHeaders && !end:
		malformed = errors.New("HEADERS without END_STREAM after the response headers")
	case a.finalHeaders:
		if len(f.PseudoFields()) > 0 {
			malformed = errors.New("pseudo-header field in trailers")
		}
	case !validStatus(status):
		malformed = fmt.Errorf("response :status %q is not three digits", status)
	case interim && (end || status == "101"):
		malformed = errors.New("malformed informational (1xx) response")
	case end:
	case !interim:
		a.finalHeaders = true
		final = true
	case a.interim >= maxInterimResponses:
		malformed = fmt.Errorf("more than %d informational (1xx) responses", maxInterimResponses)
	default:
		a.interim++
	}
	if malformed == nil && !interim {
		malformed = a.responseLength(f.Fields, status, final, end)
	}
	if malformed != nil {
		b.mu.Unlock()
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol, Cause: malformed}
	}
	if a.fieldRoom == nil {
		a.fieldRoom = a.fieldInl[:]
	}
	fields := keepFields(&a.fieldRoom, filterFields(f.Fields))
	if final {
		// Decided by the final headers, not the first block: an
		// informational (1xx) block before them names no content-type,
		// and turned the hold-back off for the whole response.
		a.hold.on = b.holdBound > 0 && isGRPCResponse(fields)
	}
	if a.keepReplay && a.s.retryable && !a.forwarded {
		// The method may be retried on UNAVAILABLE and the client has seen
		// nothing yet.
		if end && answerUnavailable(a.held, fields) {
			// Try another backend; the headers held back, if any, are
			// dropped with this answer (their count in the budget goes
			// with the attempt, discardLocked).
			if a.held != nil {
				b.retryUnavailable(a, id, a.held, fields)
			} else {
				b.retryUnavailable(a, id, fields)
			}
			return nil
		}
		if interim {
			// An informational block says nothing of the answer: it is
			// relayed, and the call may still be retried (the client
			// then sees the other backend's response after it, as
			// after any 1xx). Held back, as it was, it took the place
			// of the final headers, which then went on at once, and a
			// headers-then-UNAVAILABLE answer after a 1xx was not
			// retried.
			a.gotHeaders = true
			b.mu.Unlock()
			a.s.cc.enqueueDown(a, outItem{kind: itemHeaders, fields: fields}, nil)
			return nil
		}
		if !end && final && a.held == nil && b.holdHeadersLocked(a, fields) {
			// Hold the response headers back until the first message or
			// the trailers tell whether this is an UNAVAILABLE answer, so
			// that headers-then-trailers failures are retried too, not
			// only trailers-only ones. Past the client connection's
			// buffer budget they are queued now instead, and refused.
			a.gotHeaders = true
			a.held = fields
			b.listHoldLocked(a)
			b.mu.Unlock()
			return nil
		}
	}
	var items []outItem
	if a.gotHeaders && a.hold.held > 0 {
		// Trailers after part of a message: the backend ended the
		// response itself, and the client reads what it sent, as a
		// direct client would.
		items = a.hold.take()
	}
	a.gotHeaders = true
	held := b.forwardLocked(a)
	stopUp := false
	if end {
		b.stepLocked(a, evRecvEnd)
		stopUp = b.answeredEarlyLocked(a)
	}
	b.mu.Unlock()
	cc := a.s.cc
	if held != nil {
		cc.enqueueDown(a, outItem{kind: itemHeaders, fields: held}, nil)
	}
	if items != nil {
		b.relayHeld(a, items, nil, nil, false)
	}
	cc.enqueueDown(a, outItem{kind: itemHeaders, end: end, fields: fields}, nil)
	if stopUp {
		b.endAnsweredEarly(a) // the request was not all sent: see onData
	}
	return nil
}

// responseLength checks the content-length of a response header block
// (RFC 9113 §8.1.1): it must be one valid value (repeated, the same), as
// a request's is (parseRequest). The final headers' declares what the
// DATA of the response must add up to (checked in onData, and against
// the trailers here); a response without DATA (the headers end the
// stream) may declare only 0. 304 is the one final status whose
// content-length is not about its own content (RFC 9110 §8.6); a gRPC
// POST never gets one. nghttp2 and oghttp2, Envoy's HTTP/2 codecs, treat
// each mismatch as a stream error PROTOCOL_ERROR, and x/net's client
// fails the body's read. Caller must hold bc.mu.
func (a *attempt) responseLength(fields []hpack.HeaderField, status string, final, end bool) error {
	if a.finalHeaders && !final {
		// Trailers: the content is complete.
		if a.respLen >= 0 && a.respGot != a.respLen {
			return a.lengthMismatch()
		}
		return nil
	}
	n := int64(-1)
	for i := range fields {
		if fields[i].Name != "content-length" {
			continue
		}
		v, err := strconv.ParseUint(fields[i].Value, 10, 63)
		if err != nil || (n >= 0 && int64(v) != n) {
			return fmt.Errorf("invalid or conflicting response content-length %q", fields[i].Value)
		}
		n = int64(v)
	}
	switch {
	case n < 0 || status == "304":
	case end && n > 0:
		return fmt.Errorf("response content-length %d and no DATA", n)
	default:
		a.respLen = n
	}
	return nil
}

// lengthMismatch is the cause of the stream error of a response whose
// DATA does not add up to its content-length.
func (a *attempt) lengthMismatch() error {
	if a.respGot > a.respLen {
		return fmt.Errorf("response DATA past its content-length %d (%d bytes)", a.respLen, a.respGot)
	}
	return fmt.Errorf("response content-length %d, DATA of %d bytes", a.respLen, a.respGot)
}

// forwardLocked marks the point where the client starts seeing the
// backend's answer: the call can no longer be retried, so the request
// bytes kept for that go, and held-back response headers are returned for
// the caller to relay first. Caller must hold mu.
func (b *backendConn) forwardLocked(a *attempt) (held []hpack.HeaderField) {
	if a.forwarded {
		return nil
	}
	a.forwarded = true
	held, a.held = a.held, nil
	b.unlistHoldLocked(a)
	if a.keepReplay {
		a.keepReplay = false
		b.releaseReplayLocked(a)
	}
	return held
}

func (b *backendConn) onData(f *dataFrame) error {
	data := f.Data()
	end := f.StreamEnded()
	b.mu.Lock()
	queued := len(b.ctrl)
	a := b.streams[f.StreamID]
	var st *h2state
	var r *recvState
	if a != nil {
		st, r = &a.bst, &a.downRecv
	}
	if ok, err := b.recvDataLocked(b, f, st, r); !ok {
		b.mu.Unlock()
		b.signal() // the connection window was credited
		return err
	}
	// The reader's reference, as in onHeaders.
	s := a.s
	s.ref()
	defer s.unref()
	if !a.gotHeaders {
		// A response starts with HEADERS (RFC 9113 §8.1); without them
		// it is malformed, a stream error PROTOCOL_ERROR (§8.1.1), as
		// x/net's client answers "DATA before a HEADERS frame".
		b.mu.Unlock()
		return http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeProtocol, Cause: errors.New("DATA before the response HEADERS")}
	}
	if len(data) > 0 {
		a.gotData = true
	}
	if a.respLen >= 0 {
		// Checked before any of it is relayed: the client gets the
		// bytes up to the content-length at most.
		a.respGot += int64(len(data))
		if a.respGot > a.respLen || end && a.respGot != a.respLen {
			b.mu.Unlock()
			return http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeProtocol, Cause: a.lengthMismatch()}
		}
	}
	if len(data) == 0 && !end {
		// Says nothing, and would cost a queue entry per frame toward
		// the client: not relayed, and a glitch. Its padding was
		// credited: a WINDOW_UPDATE for it may be queued, without which
		// a backend that pads stalls on its window.
		err := b.glitchLocked(1, "empty DATA frame")
		wake := len(b.ctrl) != queued
		b.mu.Unlock()
		if wake {
			b.signal()
		}
		return err
	}
	if a.held != nil && a.keepReplay && a.s.retryable && !a.forwarded && answerUnavailable(a.held, nil) {
		// Held headers that name no gRPC content-type and a :status a
		// gRPC client reads as UNAVAILABLE (an HTTP proxy's 502 or 503
		// page in front of the backend), then their body: the answer is
		// retried as a trailers-only UNAVAILABLE is (onHeaders), its
		// body dropped. Relayed, the client got UNAVAILABLE from a
		// backend that a retry may have passed by.
		b.retryUnavailable(a, f.StreamID, a.held)
		return nil
	}
	held := b.forwardLocked(a)
	// The bytes of an incomplete gRPC message wait for the rest of it
	// (holdback.go); items are held bytes that go on first.
	var items []outItem
	fwd := len(data)
	var rd *connReader // views of the read buffer may be made (readref.go)
	if f.inBuf {
		rd = b.cr
	}
	if a.hold.on {
		items, fwd = b.holdLocked(a, data, end, rd)
	}
	stopUp := false
	if end {
		b.stepLocked(a, evRecvEnd)
		stopUp = b.answeredEarlyLocked(a)
	}
	// Wake the writer for a WINDOW_UPDATE queued here (the connection
	// window must be returned even if no client reads), not per frame.
	wake := len(b.ctrl) != queued
	b.mu.Unlock()
	if wake {
		b.signal()
	}
	if held != nil {
		a.s.cc.enqueueDown(a, outItem{kind: itemHeaders, fields: held}, nil)
	}
	var v *pbuf
	if rd != nil && fwd >= vecMin {
		v = rd.view(data[:fwd]) // nil: copied
	}
	switch {
	case items != nil:
		b.relayHeld(a, items, data[:fwd], v, end)
	case fwd > 0 || end:
		if !a.s.cc.enqueueDown(a, outItem{kind: itemData, end: end, buf: v}, data[:fwd]) {
			if v != nil {
				putBuf(v)
			}
			b.creditStream(r, int32(fwd))
		}
	}
	if stopUp {
		b.endAnsweredEarly(a) // see below
	}
	return nil
}

// A backend's complete answer while the request is still on its way to
// it (its END_STREAM not yet sent: request DATA still queued behind the
// backend's window, or the client still sending) ends the backend stream
// too: the proxy resets it with CANCEL (RFC 9113 §8.1: the response
// stands, the rest of the request is not needed), which frees its slot,
// its queued request bytes and its place in the backend's in-flight
// count. A grpc-go backend resets its side itself; one that answered at
// once and then granted no more window left the call in flight forever,
// out of reach of every timeout (the request was complete on the
// client's side), its slot held (attack round 4: 400 calls held 47 MiB;
// with MAX_CONCURRENT_STREAMS 1 every later call failed). The answer is
// queued toward the client first, so the reset cannot overtake it. The
// client's side is ended separately (enqueueDown: RST_STREAM(NO_ERROR)
// if it still sends).
//
// The attempt's slot on b, and its place in the backend's in-flight count,
// are given back before the answer is queued (answeredEarlyLocked): a
// client that has the answer may send its next call at once, and on a
// backend with one slot left (MAX_CONCURRENT_STREAMS 1, or at
// MaxStreamsPerBackend) that call found it still taken and failed
// UNAVAILABLE, every connection at its stream limit. The next stream's
// HEADERS cannot overtake the reset: the stream stays in b.streams, where
// openLocked counts it against the backend's limit, until resetUp has
// queued its RST_STREAM, and the writer writes control frames before it
// opens streams.

// answeredEarlyLocked reports whether a's answer is complete (the
// backend's END_STREAM just arrived) while its request is not all sent,
// and then gives back its slot and its in-flight count at once; the
// caller ends a with endAnsweredEarly once the answer is queued toward
// the client. Caller must hold mu.
func (b *backendConn) answeredEarlyLocked(a *attempt) bool {
	if a.bClosed {
		return false
	}
	b.releaseSlotLocked(a)
	return true
}

// endAnsweredEarly resets an attempt answered before its request was all
// sent (see answeredEarlyLocked).
func (b *backendConn) endAnsweredEarly(a *attempt) {
	if h := b.pool.srv.beforeEarlyReset; h != nil {
		h()
	}
	b.resetUp(a, http2.ErrCodeCancel)
}

// retryUnavailable ends a's stream, answered UNAVAILABLE with answer
// (its header blocks, the held ones first), with a reset if it is still
// open on b, and hands the call to retryOrFail: another backend, or the
// answer relayed. The held headers, if any, go with it. Caller must hold
// b.mu; it is released.
func (b *backendConn) retryUnavailable(a *attempt, id uint32, answer ...[]hpack.HeaderField) {
	if !a.bst.sentEnded() {
		b.queueCtrlLocked(writeOp{kind: opReset, streamID: id, code: http2.ErrCodeCancel})
		b.transport.stepLocked(&a.bst, id, evSendReset)
	}
	if a.held != nil {
		a.held = nil
		b.unlistHoldLocked(a)
	}
	b.unlinkLocked(a)
	b.mu.Unlock()
	b.signal()
	a.s.cc.retryOrFail(a, false, failure{kind: failBackendUnavailable, backend: b.addr}, answer...)
}

// silent reports whether a's stream was opened on b and b sent no
// response message on it: a call still waiting for a slot (queueLocked)
// or for b's handshake never reached the backend. It takes b.mu: the
// caller may hold a.s.cc.mu, not b.mu.
func (b *backendConn) silent(a *attempt) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return a.up.id != 0 && !a.gotData
}

// releaseSlotLocked gives back a's stream slot on b and its place in the
// backend's in-flight count, once. Caller must hold mu.
func (b *backendConn) releaseSlotLocked(a *attempt) {
	if a.slotFreed {
		return
	}
	a.slotFreed = true
	b.reserved--
	if a.backendCount != nil {
		a.backendCount.Add(-1)
	}
	if !a.queued && b.queued == 0 && b.keyWaiting.Load() > 0 && b.takesWaitingLocked() && b.gotSettings && b.reserved < b.capLocked() {
		// A slot came free here and calls wait on this backend's other
		// connections: the first of them takes it (rebalance).
		go b.pool.rebalance(poolKey{b.up, b.addr})
	}
}

// resetFromBackend handles a RST_STREAM from the backend, or a stream error
// we detected (sendRST), whose cause, if any, the client's status names.
// REFUSED_STREAM before any answer means the backend did not process the
// stream (RFC 9113 §8.7), so it is retried elsewhere.
func (b *backendConn) resetFromBackend(id uint32, code http2.ErrCode, sendRST bool, cause error) {
	b.mu.Lock()
	if sendRST {
		b.queueCtrlLocked(writeOp{kind: opReset, streamID: id, code: code})
	}
	a := b.streams[id]
	if a == nil {
		if sendRST {
			b.resets.add(id) // its frames in flight are ignored
		}
		b.mu.Unlock()
		b.signal()
		return
	}
	// Ours, until the client connection is told: closeAttLocked may end
	// the call.
	s := a.s
	s.ref()
	defer s.unref()
	if !sendRST && code == http2.ErrCodeRefusedStream && !a.forwarded {
		b.transport.stepLocked(&a.bst, id, evRecvReset)
		b.unlinkLocked(a)
		b.mu.Unlock()
		a.s.cc.retryOrFail(a, true, failure{kind: failRefused, backend: b.addr})
		return
	}
	if sendRST {
		b.stepLocked(a, evSendReset)
	} else {
		b.stepLocked(a, evRecvReset)
	}
	b.closeAttLocked(a)
	b.mu.Unlock()
	b.signal()
	if sendRST {
		a.s.cc.failDown(a, failure{kind: failBackendProtocol, backend: b.addr, h2code: code, cause: cause})
		return
	}
	a.s.cc.backendReset(a, code)
}

// onGoAway stops new streams on b. Streams the backend did not process
// (ids above the GOAWAY's last stream id, RFC 9113 §6.8) and those not yet
// opened go to another backend; the rest finish, then the connection
// closes.
func (b *backendConn) onGoAway(f *http2.GoAwayFrame) {
	graceful := f.ErrCode == http2.ErrCodeNo
	if graceful {
		// Before the attempts refused below ask whether it is restarting.
		b.pool.markRestarting(b.addr)
	}
	b.mu.Lock()
	again := b.peerGoAway
	b.peerGoAway = true
	b.goingAway = true
	b.drainAndClose = true
	// unprocessed, the streams opened past the GOAWAY's last stream id,
	// and unsent, the attempts still pending (waiting for a slot or to
	// be opened), own a reference to the stream of each of their
	// attempts until retryOrFail or moveUnsent returned (a pending one's
	// is the list's).
	var unprocessed, unsent []*attempt
	for id, a := range b.streams {
		if id > f.LastStreamID {
			a.s.ref() // unprocessed's
			unprocessed = append(unprocessed, a)
		}
	}
	for _, a := range b.pending {
		if !a.bClosed {
			unsent = append(unsent, a)
		} else {
			a.s.unref() // pending's; a may be reset by it
		}
	}
	b.pending = nil
	for _, a := range unprocessed {
		b.unlinkLocked(a)
	}
	for _, a := range unsent {
		b.unlinkLocked(a)
	}
	idle := len(b.streams) == 0
	b.mu.Unlock()
	if idle {
		// Nothing left on it: it closes on its own (drainAndClose), and
		// leaves the pool first, so that the calls moved below may take
		// a new connection in its place. Still counted at
		// MaxBackendConns, it made them fail at once (every connection
		// full, and none taking waiting calls).
		b.pool.remove(b)
	}
	b.signal()
	if graceful || again {
		// Only the first is worth a Warn: a backend repeating GOAWAY
		// (a glitch each) wrote one per frame.
		b.log.Debug("backend sent GOAWAY", "code", f.ErrCode.String(), "last_stream", f.LastStreamID, "moved", len(unprocessed)+len(unsent))
	} else {
		b.log.Warn("backend sent GOAWAY", "code", f.ErrCode.String(), "last_stream", f.LastStreamID, "moved", len(unprocessed)+len(unsent), "debug", string(f.DebugData()))
	}
	gone := failure{kind: failGoAway, backend: b.addr, draining: graceful}
	for _, a := range unprocessed {
		s := a.s
		s.cc.retryOrFail(a, true, gone)
		s.unref() // unprocessed's
	}
	for _, a := range unsent {
		s := a.s
		s.cc.moveUnsent(a, gone)
		s.unref() // unsent's (pending's before)
	}
}

// enqueueUp queues a request item toward the backend: DATA bytes
// (copied) or a header block (trailers). It reports false when the attempt
// is over and DATA must be credited back by the caller. Caller must hold
// a.s.cc.mu, not b.mu.
func (b *backendConn) enqueueUp(a *attempt, it outItem, data []byte) bool {
	if streamDebug {
		a.s.live("enqueueUp")
	}
	b.mu.Lock()
	if a.up.closed || a.discarded {
		b.mu.Unlock()
		return false
	}
	// An attempt unlinked for a retry still takes items: retryOrFail,
	// waiting for the cc.mu our caller holds, will carry them over.
	if it.kind == itemData {
		a.up.pushData(data, it.end)
	} else {
		a.up.push(it)
	}
	if it.end {
		a.up.closed = true
	}
	if !a.bClosed {
		b.markReadyLocked(&a.up)
	}
	b.mu.Unlock()
	b.signal()
	return true
}

// resetUp cancels attempt a: a RST_STREAM if it was opened. The caller
// owns a reference to a.s: a's bClosed is then a's own, not that of the
// attempt of another call in the same memory.
func (b *backendConn) resetUp(a *attempt, code http2.ErrCode) {
	if streamDebug {
		a.s.live("resetUp")
	}
	b.mu.Lock()
	if a.bClosed {
		b.mu.Unlock()
		return
	}
	if a.up.id != 0 {
		b.queueCtrlLocked(writeOp{kind: opReset, streamID: a.up.id, code: code})
		b.stepLocked(a, evSendReset)
	}
	b.closeAttLocked(a)
	b.mu.Unlock()
	b.signal()
}

// stepLocked applies ev to a's state on b (RFC 9113 §5.1) and ends a once
// its state ended. Caller must hold mu.
func (b *backendConn) stepLocked(a *attempt, ev h2event) h2result {
	res, ended := b.transport.stepLocked(&a.bst, a.up.id, ev)
	if ended {
		b.closeAttLocked(a)
	}
	return res
}

// unlinkLocked removes a from b's tables and frees its slot, keeping its
// queued and replayable request items for a retry. Caller must hold mu.
func (b *backendConn) unlinkLocked(a *attempt) {
	if a.bClosed {
		return
	}
	a.bClosed = true
	if !a.bst.ended() {
		a.bst = stClosed // the connection forgets it
	}
	a.up.detached = true
	a.downRecv.done = true
	b.releaseHeldLocked(&a.downRecv)
	if a.hold.held > 0 {
		a.hold.releaseLocked(&a.s.cc.bufs) // a message cut short is never relayed
	}
	if a.up.id != 0 {
		delete(b.streams, a.up.id)
	}
	b.releaseSlotLocked(a)
	if a.hsTimer != nil && a.hsTimer.Stop() {
		// Its wait is over: the timer's reference goes now, not when
		// it fires (up to BackendPendingTimeout later, holding the
		// stream from reuse). Not the last: the caller's, or the
		// backend side's, is held.
		a.s.unref()
	}
	if a.queued {
		// A call that stops waiting leaves pending now, not when a slot
		// comes free: calls cancelled one after another while the
		// backend stays full would pile up there.
		a.queued = false
		b.queued--
		b.keyWaiting.Add(-1)
		if i := slices.Index(b.pending, a); i >= 0 {
			b.pending = slices.Delete(b.pending, i, i+1)
			// pending's reference; not the last: the backend side's is
			// held until sideClosed, after this.
			a.s.unref()
		}
	}
	b.signal()
}

// closeAttLocked ends a for good: it is unlinked, its buffers released, and
// the stream learns its backend side is done. Caller must hold mu.
func (b *backendConn) closeAttLocked(a *attempt) {
	if a.bClosed {
		return
	}
	b.unlinkLocked(a)
	b.discardLocked(a)
	a.s.sideClosed()
}

// discardLocked releases what a still holds. Caller must hold mu.
func (b *backendConn) discardLocked(a *attempt) {
	a.discarded = true
	a.up.drop(&b.transport)
	a.up.closed = true
	a.keepReplay = false
	b.releaseReplayLocked(a)
	b.releaseHeldHeadersLocked(a)
}

// harvest takes the request of an unlinked attempt for a retry: what was
// written (the replay) and what was still queued, in order, as fresh
// copies: the old connection's writer may still be reading the originals,
// which go back to the pool through it. It reports false when the request
// cannot be replayed because part of it was written and not kept.
func (b *backendConn) harvest(a *attempt) ([]outItem, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if a.up.id != 0 && !a.keepReplay {
		return nil, false
	}
	var out []outItem
	take := func(it outItem, credited int) {
		c := outItem{kind: it.kind, end: it.end, fields: it.fields, credited: credited}
		if it.buf != nil {
			if pbufDebug {
				debugCheck(it.buf, "harvest")
			}
			c.buf = getBuf(it.n)
			a.up.mem.add(len(c.buf.b))
			c.n = copy(c.buf.b, it.buf.b[:it.n])
		}
		out = append(out, c)
	}
	for _, it := range a.replay {
		take(it, it.n)
	}
	for _, it := range a.up.items[a.up.head:] {
		take(it, max(it.credited, it.off))
	}
	b.discardLocked(a)
	return out, true
}

// openLocked implements role: it opens pending attempts while the
// backend's concurrency limit allows, assigning ids in the order HEADERS
// are written (RFC 9113 §5.1.1). Attempts wait for the backend's SETTINGS
// first so they never exceed its SETTINGS_MAX_CONCURRENT_STREAMS.
func (b *backendConn) openLocked(batch []writeOp) []writeOp {
	if !b.gotSettings || b.fatal || b.peerGoAway {
		return batch // after a GOAWAY, onGoAway and addAttempt send them elsewhere
	}
	limit := b.capLocked()
	i := 0
	for ; i < len(b.pending) && uint32(len(b.streams)) < limit; i++ {
		a := b.pending[i]
		b.pending[i] = nil
		s := a.s
		if a.bClosed {
			s.unref() // pending's; a may be reset by it
			continue
		}
		fields := s.attemptFields(a)
		if f, over := b.requestOverPeerLocked(fields); over {
			// Never sent. failDown takes the client connection's mu,
			// which must not be taken under ours: it runs on its own,
			// short-lived goroutine (rare: only with a backend that
			// advertises a small limit), which takes over pending's
			// reference.
			b.closeAttLocked(a)
			go func() {
				s.cc.failDown(a, f)
				s.unref()
			}()
			continue
		}
		id := b.nextID
		b.nextID += 2
		if b.nextID > maxStreamID-2*b.pool.srv.cfg.BackendStreamsPerConn {
			b.goingAway = true // leave room for what is reserved; the pool opens a new connection
			b.drainAndClose = true
		}
		if a.hsTimer != nil && a.hsTimer.Stop() {
			s.unref() // the timer's; pending's is still ours
		}
		if a.queued {
			a.queued = false
			b.queued--
			b.keyWaiting.Add(-1)
			s.waitEnd.Store(0) // a later wait has its own bound
		}
		if a.sent != nil {
			a.sent() // the Picker's (UpstreamPick.Sent): quick, under mu so that it comes before done
			a.sent = nil
		}
		a.up.id = id
		a.up.window = b.peerInitWin
		a.downRecv.id = id
		b.streams[id] = a
		b.calm.rollLocked(b.pool.srv.now())
		b.calm.opened++ // the allowance for the backend's stray frames (calm.go)
		batch = append(batch, writeOp{kind: opHeaders, streamID: id, end: a.s.reqEnd, fields: fields})
		if d := b.startWindowLocked(&a.downRecv); d > 0 {
			// In the same write as the HEADERS, behind them: the
			// stream must be open to take it (RFC 9113 §6.9).
			batch = append(batch, writeOp{kind: opWindowUpdate, streamID: id, val: uint32(d)})
		}
		// pending's reference goes to the batch: fields may be
		// reqFields, in the stream's reqRoom, which the HPACK encoding
		// reads after mu is released.
		b.sc.refs = append(b.sc.refs, s)
		b.transport.stepLocked(&a.bst, id, evSendHeaders)
		if a.s.reqEnd {
			b.transport.stepLocked(&a.bst, id, evSendEnd)
		}
		b.markReadyLocked(&a.up)
	}
	if i == len(b.pending) {
		b.pending = b.pending[:0] // keep the array: the next call needs it
	} else {
		b.pending = b.pending[i:]
	}
	return batch
}

// sentLastLocked implements role.
func (b *backendConn) sentLastLocked(q *sendQueue, reset bool) {
	if reset {
		b.stepLocked(q.a, evSendReset)
	} else {
		b.stepLocked(q.a, evSendEnd)
	}
}

// idleLocked implements role.
//
// A slot reserved by pool.get and not yet filled (addAttempt) counts: a
// connection dialed for a drained Upstream drains from birth (pool.get),
// and its writer, finding no stream and nothing pending before the call
// that reserved the slot queued its attempt, closed it under that call,
// which a retry then dialed again (TestDrainedUpstreamKeepsReservedSlot;
// TestUpstreamConnections failed so about 1 run in 150 under -race).
func (b *backendConn) idleLocked() bool {
	return b.fatal || len(b.streams) == 0 && len(b.pending) == 0 && b.reserved == 0
}

// poolKey keys the pool's connections: the same address reached with
// two Upstreams' dial settings is two sets of connections.
type poolKey struct {
	up   *Upstream
	addr string
}

// pool holds the backend connections, keyed by Upstream and address.
type pool struct {
	srv *Server
	ctx context.Context // cancelled on hard close; bounds dials

	mu sync.Mutex
	// mu guards the fields below.
	conns    map[poolKey][]*backendConn
	inflight map[string]*atomic.Int64 // calls in flight per backend, when MaxStreamsPerBackend is set
	// goneAt holds the backends that sent a graceful GOAWAY, and when,
	// until a new connection to them completes its handshake or
	// RestartGrace passes; see Config.RestartGrace. Created on first use.
	goneAt map[string]time.Time
	closed bool
	wg     sync.WaitGroup

	// zeroAddrs lists, sorted, the backend addresses that advertise
	// SETTINGS_MAX_CONCURRENT_STREAMS=0 on a usable connection (see
	// noStreamsLocked), so that picks avoid them (avoidLocked); nil when
	// there are none, which is the common case and costs a pick one
	// atomic load. Stored under mu by refreshZeroLocked, loaded without.
	zeroAddrs atomic.Pointer[[]string]

	pings atomic.Int64 // keepalive PINGs sent, for tests
	// overflows counts and logs the picks refused at MaxBackendConns,
	// once per burst.
	overflows refusalLog
}

// retain drains the connections of every backend not in keep, within
// Config.DrainTimeout, and forgets their restarts (markRestarting); the
// connections of a backend in keep that a drain bounded (it left the set
// and is back) are no longer cut at the timeout (backendConn.rejoined). A retired Upstream's connections are left alone:
// the union of the live sets loses the backends of a cluster that a
// reload removed, and those carry their calls to their end (see
// Server.DrainUpstream); RetainUpstreamBackends still bounds them.
func (p *pool) retain(keep map[string]bool) {
	var moved []*attempt
	defer func() { p.moveWaiting(moved, errLeftSet) }() // after p.mu is released
	p.mu.Lock()
	defer p.mu.Unlock()
	for k, cs := range p.conns {
		if k.up.retired.Load() {
			continue
		}
		if keep[k.addr] {
			for _, b := range cs {
				b.rejoined(leftAll)
			}
			continue
		}
		for _, b := range cs {
			b.drain(p.srv.cfg.DrainTimeout, leftAll)
			moved = b.takeWaiting(moved)
		}
	}
	for addr, n := range p.inflight {
		if !keep[addr] && n.Load() == 0 {
			delete(p.inflight, addr)
		}
	}
	// A backend that left every set is not dialed again: its restart,
	// if it was one, no longer matters, and in a rolling restart, where
	// each pod sends GOAWAY and leaves for good, the notes would pile up
	// for the life of the process.
	for addr := range p.goneAt {
		if !keep[addr] {
			delete(p.goneAt, addr)
		}
	}
}

// get returns a connection to addr with a stream slot reserved, opening a
// new connection when every existing one is full (its
// SETTINGS_MAX_CONCURRENT_STREAMS or BackendStreamsPerConn reached). Its
// error is a failure: the server is shutting down, the backend is at
// MaxStreamsPerBackend, or it has MaxBackendConns connections, all full.
// The last is logged (at most once a second), after p.mu is released: a
// logger that blocks holds up this call alone, not every pick.
//
// With wait, a call that finds every connection full at MaxBackendConns
// waits for a slot on one of them instead, if the backend's queue has
// room (queueLocked).
func (p *pool) get(up *Upstream, addr string, a *attempt, wait bool) (*backendConn, error) {
	p.mu.Lock()
	b, err := p.getLocked(up, addr, a, wait)
	p.mu.Unlock()
	if f, ok := err.(failure); ok && f.kind == failBackendConns && (wait || p.srv.cfg.MaxBackendPending <= 0) {
		// Logged when the call fails for it: with calls allowed to wait,
		// a refusal before the last pick sends the call elsewhere or to
		// wait (see serverConn.startAttemptLocked).
		p.overflows.note(p.srv.now(), p.srv.log, slog.LevelWarn,
			"calls refused: every connection to the backend is full (max backend connections)", int(f.limit), "backend", addr)
	}
	return b, err
}

// getLocked is get under p.mu. Caller must hold p.mu.
func (p *pool) getLocked(up *Upstream, addr string, a *attempt, wait bool) (*backendConn, error) {
	if p.closed {
		return nil, failure{kind: failShuttingDown}
	}
	if max := p.srv.cfg.MaxStreamsPerBackend; max > 0 {
		n := p.inflight[addr]
		if n == nil {
			n = new(atomic.Int64)
			p.inflight[addr] = n
		}
		if n.Load() >= max {
			return nil, failure{kind: failBackendFull, backend: addr, limit: max}
		}
		n.Add(1)
		a.backendCount = n
	}
	k := poolKey{up, addr}
	for _, b := range p.conns[k] {
		if b.tryReserve() {
			return b, nil
		}
	}
	if p.noStreamsLocked(k) {
		// Refused at once, never dialed: the call goes to another
		// backend, and this one stays usable for when it raises its
		// limit (see onPeerSettings).
		if a.backendCount != nil {
			a.backendCount.Add(-1)
			a.backendCount = nil
		}
		return nil, failure{kind: failNoStreams, backend: addr}
	}
	if max := p.srv.cfg.MaxBackendConns; max > 0 && (wait && len(p.conns[k]) >= max || !wait && (p.takingLocked(k) >= max || len(p.conns[k]) >= max*goingAwayConnsFactor)) {
		if b := p.reserveUnknownLocked(k); b != nil {
			return b, nil
		}
		if wait {
			if b := p.queueLocked(k, a); b != nil {
				return b, nil
			}
		}
		if a.backendCount != nil {
			a.backendCount.Add(-1)
			a.backendCount = nil
		}
		return nil, failure{kind: failBackendConns, backend: addr, limit: int64(max)}
	}
	b := newBackendConn(p, k)
	b.assumedMax = assumedPeerMaxStreams
	b.keyWaiting = new(atomic.Int64)
	for _, sib := range p.conns[k] {
		b.keyWaiting = sib.keyWaiting
		sib.mu.Lock()
		if sib.gotSettings {
			b.assumedMax = max(1, sib.peerMaxStream)
		}
		sib.mu.Unlock()
	}
	b.reserved = 1
	if up.retired.Load() {
		// Picked just before the Picker stopped naming up: serve this
		// call, then close (see Server.DrainUpstream).
		b.drain(0, 0)
	}
	p.conns[k] = append(p.conns[k], b)
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		b.run(p.ctx)
		p.remove(b)
	}()
	return b, nil
}

// takingLocked counts the connections to k's backend that may still take
// new streams: those MaxBackendConns caps. A connection going away (the
// backend's GOAWAY, as grpc-go's MaxConnectionAge sends, or a drain)
// takes none; it carries its streams to their end and closes. Counted,
// the connections that long streams (watches) kept open after their
// GOAWAY took the cap's places for as long as the streams ran, and every
// new call to a healthy backend failed "every connection is at its stream
// limit". Each such connection carries one stream at least (one without
// any leaves the pool), so their number stays bounded by the backend's
// streams in flight. Caller must hold p.mu.
//
// A call about to wait for a slot (getLocked's wait) still counts them:
// it waits on a connection that takes waiting calls rather than dial a
// backend whose connections all go away, which may be one shutting down
// (grpc-go's GracefulStop): refused, the call had spent its attempts.
//
// Connections going away are bounded all the same, at goingAwayConnsFactor
// times MaxBackendConns with the others: a backend that ages its
// connections every second under streams that last hours would otherwise
// leave thousands open, one descriptor each.
func (p *pool) takingLocked(k poolKey) int {
	n := 0
	for _, b := range p.conns[k] {
		b.mu.Lock()
		if !b.closed && !b.goingAway && !b.drainAndClose {
			n++
		}
		b.mu.Unlock()
	}
	return n
}

func (p *pool) remove(b *backendConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.removeLocked(b)
}

// closeAll stops new connections and closes the existing ones, then waits
// for their goroutines.
func (p *pool) closeAll() {
	p.mu.Lock()
	p.closed = true
	var all []*backendConn
	for _, cs := range p.conns {
		all = append(all, cs...)
	}
	p.mu.Unlock()
	for _, b := range all {
		b.close(errClosed)
	}
	p.wg.Wait()
}

// markRestarting records that the backend at addr sent a graceful GOAWAY:
// for Config.RestartGrace its refused connections are a restart, not a
// failure.
func (p *pool) markRestarting(addr string) {
	if p.srv.cfg.RestartGrace <= 0 {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.goneAt == nil {
		p.goneAt = make(map[string]time.Time)
	}
	p.goneAt[addr] = time.Now()
}

// restarting reports whether addr sent a graceful GOAWAY less than
// Config.RestartGrace ago and has not completed a handshake since.
func (p *pool) restarting(addr string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	at, ok := p.goneAt[addr]
	if ok && time.Since(at) >= p.srv.cfg.RestartGrace {
		delete(p.goneAt, addr)
		return false
	}
	return ok
}

// backUp records that a connection to addr completed its handshake: a
// restart, if one was in progress, is over.
func (p *pool) backUp(addr string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.goneAt) > 0 {
		delete(p.goneAt, addr)
	}
}

// minHandshakeWait is the least a call waits for a backend connection's
// handshake before it goes elsewhere, however close its deadline: a
// connection on loopback or in one zone takes well under it.
const minHandshakeWait = 50 * time.Millisecond

// watchHandshake bounds how long attempt a, queued on b, waits for b's
// handshake (see Config.HandshakeTimeout): at most wait, after which a
// goes to another backend, as a transparent retry, if b has still not sent
// its SETTINGS. Nothing is armed when b already has. Caller must hold
// a.s.cc.mu.
func (b *backendConn) watchHandshake(a *attempt, wait time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.gotSettings || a.bClosed || a.queued {
		return // a waiting call's wait is bounded by watchQueue
	}
	b.armWaitLocked(a, wait, b.handshakeExpired)
}

// armWaitLocked arms a.hsTimer, the bound of a's wait on b for its
// handshake (watchHandshake) or for a slot (watchQueue), to run
// expired(a, wait) after wait. The timer owns a reference to the stream
// until expired returned, or until a Stop that kept it from running
// (openLocked, onPeerSettings, takeWaiting, rebalance) lets go of it.
// Caller must hold mu.
func (b *backendConn) armWaitLocked(a *attempt, wait time.Duration, expired func(*attempt, time.Duration)) {
	s := a.s
	s.ref()
	a.hsTimer = time.AfterFunc(wait, func() {
		expired(a, wait)
		s.unref()
	})
}

// handshakeExpired runs on a's handshake timer: if a still waits for b's
// SETTINGS, it leaves b and is retried elsewhere, and b is reported failing.
func (b *backendConn) handshakeExpired(a *attempt, wait time.Duration) {
	if streamDebug {
		a.s.live("handshakeExpired")
	}
	b.mu.Lock()
	if a.bClosed || a.up.id != 0 || b.gotSettings {
		b.mu.Unlock()
		return
	}
	if i := slices.Index(b.pending, a); i >= 0 {
		b.pending = slices.Delete(b.pending, i, i+1)
		a.s.unref() // pending's; the timer's is still held
	}
	b.unlinkLocked(a)
	b.mu.Unlock()
	b.log.Debug("backend handshake not done in time; call goes elsewhere", "method", a.s.method, "duration", wait)
	a.s.cc.retryOrFail(a, true, failure{kind: failHandshake, backend: b.addr, limit: wait.Milliseconds()})
}
