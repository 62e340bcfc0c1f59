package proxy

import (
	"errors"
	"slices"
	"time"

	"golang.org/x/net/http2"
)

// This file is the life of a backend connection after its handshake: how
// it notices that the backend will take no stream (SETTINGS_MAX_CONCURRENT_
// STREAMS=0), that it is gone without a word (keepalive PINGs), and that it
// is no longer needed (idle close). Each ends the connection gracefully
// where it can, and the pool forgets it.

// errKeepalive closes a backend connection on which nothing was read for
// Config.BackendKeepaliveTimeout after a keepalive PING.
var errKeepalive = errors.New("backend did not answer a keepalive PING in time")

// keepalivePing is the payload of our keepalive PINGs; any frame read
// answers them, so the payload is not matched.
var keepalivePing = [8]byte{'s', 't', 'r', 'e', 'a', 'm', 'l', 'b'}

// onPeerSettings is called by the reader after it applied a SETTINGS frame
// (not an ACK) from the backend. The backend is up. While it advertises
// SETTINGS_MAX_CONCURRENT_STREAMS=0 it takes no stream (RFC 9113 §5.1.2,
// §6.5.2): the calls waiting on this connection go to another backend at
// once, as transparent retries, and the pool refuses new ones for the
// backend without dialing (see pool.noStreamsLocked), but the connection
// stays: the backend is alive, and a later SETTINGS frame that raises the
// limit makes it usable again, its slots taken by the next calls picked
// for it. Nothing says when that would be, so calls do not wait for it.
func (b *backendConn) onPeerSettings() {
	b.pool.backUp(b.addr)
	b.mu.Lock()
	zero := b.peerMaxStream == 0 && !b.closed && !b.drainAndClose
	changed := zero != b.noStreams
	b.noStreams = zero
	// moved owns the references the pending list had to the streams of
	// its attempts, until retryOrFail returned.
	var moved []*attempt
	over := failure{kind: failOverLimit, backend: b.addr, limit: int64(b.peerMaxStream)}
	if zero {
		for _, a := range b.pending {
			if !a.bClosed {
				moved = append(moved, a)
			} else {
				a.s.unref() // pending's; a may be reset by it
			}
		}
		b.pending = nil
		for _, a := range moved {
			if a.hsTimer != nil && a.hsTimer.Stop() {
				a.s.unref() // the timer's; moved's is still held
			}
			b.unlinkLocked(a)
		}
	} else {
		moved = b.overLimitLocked()
	}
	open := len(b.streams)
	// A raised limit frees slots as a stream's end does (releaseSlotLocked):
	// calls waiting on the backend's other connections take them.
	give := !zero && b.keyWaiting.Load() > 0 && b.takesWaitingLocked() && b.reserved < b.capLocked()
	b.mu.Unlock()
	if give {
		go b.pool.rebalance(poolKey{b.up, b.addr})
	}
	if changed {
		b.pool.mu.Lock()
		b.pool.refreshZeroLocked(b.addr)
		b.pool.mu.Unlock()
	}
	if changed && zero {
		b.log.Debug("backend advertises SETTINGS_MAX_CONCURRENT_STREAMS=0; its calls go elsewhere until it raises the limit",
			"waiting", len(moved), "open", open)
	} else if changed {
		b.log.Debug("backend raised SETTINGS_MAX_CONCURRENT_STREAMS from 0; it takes calls again")
	}
	for _, a := range moved {
		s := a.s
		if zero {
			s.cc.retryOrFail(a, true, failure{kind: failNoStreams, backend: b.addr})
		} else {
			s.cc.moveWaiter(a, over)
		}
		s.unref() // moved's
	}
}

// overLimitLocked takes off b the attempts pending on it that the
// backend's SETTINGS_MAX_CONCURRENT_STREAMS, just applied, leaves no slot
// for: slots were reserved on an assumed limit before the backend's first
// SETTINGS (capLocked), or the backend lowered its limit. openLocked
// opens pending attempts in order while slots are free; those past the
// free slots, never sent, are returned, with their pending list's
// references, to be started again (serverConn.moveWaiter, their picks'
// done told failOverLimit) as if picked now, which the slot's
// reservation missed: on another connection to the backend if the pool
// may open one, else waiting for a slot as calls at the connection cap
// do (counted as waiting, bounded by Config.BackendPendingTimeout and
// Config.MaxBackendPending), or, with the wait queue off, elsewhere.
// Left waiting on b, they waited for the long calls it carries while a
// new connection could serve them. Calls waiting already (queued) stay.
// Caller must hold mu.
func (b *backendConn) overLimitLocked() (moved []*attempt) {
	n := b.slotsOpenLocked()
	limit := b.capLocked()
	for i := 0; i < len(b.pending); i++ {
		a := b.pending[i]
		if a.bClosed {
			continue
		}
		if n++; n <= limit || a.queued {
			continue // it has a slot, or waits already, within its bound
		}
		n--
		b.pending = slices.Delete(b.pending, i, i+1) // pending's reference goes to moved
		i--
		b.unlinkLocked(a) // and its handshake timer
		moved = append(moved, a)
	}
	return moved
}

// slotsOpenLocked counts the open streams on b that hold a slot: not one
// answered before its request was sent, which gave its slot back while it
// waits for its reset (answeredEarlyLocked). Slots reserved for attempts
// not yet queued (pool.get, then addAttempt) are not counted: they join
// the pending list after those in it. Caller must hold mu.
func (b *backendConn) slotsOpenLocked() uint32 {
	n := uint32(0)
	for _, a := range b.streams {
		if !a.slotFreed {
			n++
		}
	}
	return n
}

// overLimitAddLocked reports whether a, about to join b's pending list,
// would find no slot there: b has had the backend's SETTINGS, and its
// open streams and the attempts pending before a take every slot they
// allow (a's slot was reserved on the limit assumed before them, or
// before the backend lowered it), as overLimitLocked finds of those
// pending when the SETTINGS come. Caller must hold mu.
func (b *backendConn) overLimitAddLocked(a *attempt) bool {
	limit := b.capLocked()
	if !b.gotSettings || a.queued || b.reserved <= limit {
		return false // the slots reserved, a's included, are within the limit
	}
	n := b.slotsOpenLocked()
	for _, p := range b.pending {
		if !p.bClosed {
			n++
		}
	}
	return n >= limit
}

// noStreamsLocked reports whether the backend of k advertised
// SETTINGS_MAX_CONCURRENT_STREAMS=0 on a connection that is still usable:
// a new connection would be told the same, so get refuses the call
// instead of dialing. Caller must hold p.mu.
func (p *pool) noStreamsLocked(k poolKey) bool {
	for _, b := range p.conns[k] {
		b.mu.Lock()
		zero := b.noStreams && !b.closed && !b.goingAway
		b.mu.Unlock()
		if zero {
			return true
		}
	}
	return false
}

// refreshZeroLocked recomputes whether addr belongs in zeroAddrs: whether
// any usable connection to it, for any Upstream, has the backend's
// SETTINGS_MAX_CONCURRENT_STREAMS at 0. It runs when a connection's
// limit moves to or from 0 and when a connection is forgotten. A
// connection going away with the limit at 0 keeps addr listed until it is
// forgotten, which is soon: it carries no stream. Caller must hold p.mu.
func (p *pool) refreshZeroLocked(addr string) {
	zero := false
	for k, cs := range p.conns {
		if k.addr != addr {
			continue
		}
		for _, b := range cs {
			b.mu.Lock()
			zero = zero || (b.noStreams && !b.closed && !b.goingAway)
			b.mu.Unlock()
		}
	}
	var cur []string
	if l := p.zeroAddrs.Load(); l != nil {
		cur = *l
	}
	i, listed := slices.BinarySearch(cur, addr)
	if zero == listed {
		return
	}
	next := slices.Clone(cur)
	if zero {
		next = slices.Insert(next, i, addr)
	} else {
		next = slices.Delete(next, i, i+1)
	}
	if len(next) == 0 {
		p.zeroAddrs.Store(nil)
		return
	}
	p.zeroAddrs.Store(&next)
}

// avoid returns the addresses a pick should avoid: tried, the backends
// the call already tried, plus the backends that take no stream
// (zeroAddrs). It returns tried itself, without allocating, when no
// backend is at 0. The caller must not modify tried through the result.
func (p *pool) avoid(tried []string) []string {
	l := p.zeroAddrs.Load()
	if l == nil {
		return tried
	}
	out := make([]string, 0, len(tried)+len(*l))
	out = append(out, tried...)
	for _, a := range *l {
		if !slices.Contains(tried, a) {
			out = append(out, a)
		}
	}
	return out
}

// queueLocked is get's answer, for a call that may wait, when every
// connection to k's backend is full at MaxBackendConns: a slot past the
// cap of the connection with the fewest calls waiting, if the backend has
// fewer than Config.MaxBackendPending waiting, else nil. The call waits in
// that connection's pending list, after those that came before it, until
// a stream ends there and openLocked opens it, or until
// Config.BackendPendingTimeout (watchQueue). A connection that can take
// no more streams (closed, going away, or at SETTINGS_MAX_CONCURRENT_
// STREAMS=0) takes no waiting call. Caller must hold p.mu.
func (p *pool) queueLocked(k poolKey, a *attempt) *backendConn {
	max := p.srv.cfg.MaxBackendPending
	if max <= 0 {
		return nil
	}
	var best *backendConn
	var fewest uint32
	total := 0
	for _, b := range p.conns[k] {
		b.mu.Lock()
		total += int(b.queued)
		if b.takesWaitingLocked() && (best == nil || b.queued < fewest) {
			best, fewest = b, b.queued
		}
		b.mu.Unlock()
	}
	if best == nil || total >= max {
		return nil
	}
	best.mu.Lock()
	defer best.mu.Unlock()
	if !best.takesWaitingLocked() {
		return nil
	}
	best.reserved++
	best.queued++
	best.keyWaiting.Add(1)
	best.used = true
	a.queued = true
	return best
}

// takeWaiting takes the calls waiting for a slot on b (queueLocked) off
// it, appended to out, for a connection drained because its backend left
// the set or its Upstream was retired: they would wait for the slots of
// the long calls it carries to their end, and then be sent to the removed
// backend, or fail at BackendPendingTimeout while the backends the Picker
// names now are free. The caller sends them elsewhere with
// moveWaiting once it holds no pool lock.
func (b *backendConn) takeWaiting(out []*attempt) []*attempt {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.queued == 0 {
		return out
	}
	n := len(out)
	for _, a := range b.pending {
		if a.queued && !a.bClosed {
			out = append(out, a)
		}
	}
	for _, a := range out[n:] {
		a.s.ref() // out's, until moveWaiting's retryOrFail returned
		if a.hsTimer != nil && a.hsTimer.Stop() {
			a.s.unref() // the timer's; out's is still held
		}
		b.unlinkLocked(a) // and out of pending, letting go of pending's
	}
	return out
}

// moveWaiting picks the calls takeWaiting took anew (moveUnsent): they
// never reached their backend, which left the set or whose Upstream was
// retired (why), so the move is not counted as an attempt, as a GOAWAY's
// is not. Counted, a call without retries (MaxRetries 0) failed at the
// first reload that retired its cluster's Upstream while it waited, and
// one with MaxRetries 2 at the third. Caller must hold no lock.
func (p *pool) moveWaiting(moved []*attempt, why error) {
	for _, a := range moved {
		s := a.s
		s.cc.moveDrained(a, failure{kind: failConnLost, backend: a.bc.addr, cause: why, draining: true})
		s.unref() // takeWaiting's
	}
}

// errUpstreamRetired is why a call waiting on a connection of a retired
// Upstream (Server.DrainUpstream) was moved, should it fail instead.
var errUpstreamRetired = errors.New("draining because its cluster was removed or reloaded")

// waiting reports whether a waits on b for a slot (queueLocked). It
// takes b.mu: the caller may hold a.s.cc.mu.
func (b *backendConn) waiting(a *attempt) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return a.queued && !a.bClosed
}

// shedWaiting ends calls of c that wait for a backend slot
// (pool.queueLocked) with request data held, the last come first, while
// c withholds its connection window for its buffer budget
// (transport.creditConnLocked) and until it gives it back. No backend
// reads the data of a waiting call, so the budget would not come back
// before slots came free for them, while the calls that hold the slots
// could not receive the rest of their requests to finish and free one:
// every call on the connection stalled until BackendPendingTimeout failed
// the waiting ones. They fail with RESOURCE_EXHAUSTED (max_conn_buffer),
// as a new stream past the budget does.
func (c *serverConn) shedWaiting() {
	cut := 0
	for {
		c.mu.Lock()
		var last *stream
		var lastID uint32
		if c.withheld && !c.bufs.belowHalf() {
			for id, s := range c.streams {
				a := s.att
				if (last == nil || id > lastID) && a != nil && a.bc != nil && !s.down.closed && !s.cst.ended() && s.upRecv.held > 0 && a.bc.waiting(a) {
					last, lastID = s, id
				}
			}
		}
		if last == nil {
			c.mu.Unlock()
			break
		}
		a := last.att
		last.ref() // until resetUp returned
		c.failLocked(last, failure{kind: failConnBudget, limit: c.bufs.limit, unsent: true})
		c.mu.Unlock()
		c.signal()
		a.bc.resetUp(a, http2.ErrCodeCancel) // its buffers go back to the budget
		last.unref()
		cut++
	}
	if cut > 0 {
		c.log.Debug("calls waiting for a backend slot failed: their request data held the connection's buffer budget", "calls", cut)
	}
}

// rebalance gives the slots free on connections of k, past those their
// own waiting calls take, to the calls waiting on its other connections,
// the first in each connection's order from the connection with the
// most waiting: a
// call waits on one connection (queueLocked), and without it a slot that
// came free on another went to the next new call while the waiting call
// failed at BackendPendingTimeout. Each call moved leaves its connection
// and is started again (serverConn.moveWaiter), which takes the free slot
// unless a new call took it first, and then waits again.
func (p *pool) rebalance(k poolKey) {
	var moved []*attempt
	p.mu.Lock()
	cs := p.conns[k]
	for _, x := range cs {
		x.mu.Lock()
		free := 0
		// reserved counts x's own waiting calls, which its writer opens
		// first: what is left is free (a raised limit leaves such room
		// while they wait).
		if x.takesWaitingLocked() && x.gotSettings && x.reserved < x.capLocked() {
			free = int(x.capLocked() - x.reserved)
		}
		x.mu.Unlock()
		for ; free > 0; free-- {
			var from *backendConn
			var most uint32
			for _, y := range cs {
				y.mu.Lock()
				if y != x && y.queued > most {
					from, most = y, y.queued
				}
				y.mu.Unlock()
			}
			if from == nil {
				break
			}
			from.mu.Lock()
			for _, a := range from.pending {
				if a.queued && !a.bClosed {
					a.s.ref() // moved's, until moveWaiter returned
					if a.hsTimer != nil && a.hsTimer.Stop() {
						a.s.unref() // the timer's; moved's is still held
					}
					from.unlinkLocked(a) // and out of pending, letting go of pending's
					moved = append(moved, a)
					break
				}
			}
			from.mu.Unlock()
		}
	}
	p.mu.Unlock()
	for _, a := range moved {
		s := a.s
		// It waited because every connection was full at the cap.
		s.cc.moveWaiter(a, failure{kind: failBackendConns, backend: a.bc.addr, limit: int64(p.srv.cfg.MaxBackendConns)})
		s.unref() // moved's
	}
}

// maxUnsentMoves bounds how many times one call is moved off a backend
// connection that sent GOAWAY, left the set or was retired before the
// call was sent on it (moveUnsent) without counting as an attempt.
const maxUnsentMoves = 16

// moveUnsent starts the call of a again, which a backend connection's
// GOAWAY took off it before it was sent there (it waited for a slot, or
// to be opened): picked anew, as moveWaiter does, which is not counted as
// an attempt, since the backend never saw it. A connection going away
// gracefully is how a backend restarts, or cycles its connections
// (grpc-go's MaxConnectionAge): counted, a call waiting at a stream limit
// while connections cycled failed UNAVAILABLE once it had met MaxRetries+1
// GOAWAYs, which a direct grpc-go client, retrying such calls
// transparently, never did. Past maxUnsentMoves moves of the call (a
// backend that sends GOAWAY on every connection it is given) it is a
// transparent retry, counted, as before. Caller must hold no lock, and own
// a reference to a.s, as retryOrFail's does.
func (c *serverConn) moveUnsent(a *attempt, f failure) {
	c.mu.Lock()
	moved := c.unsentMoveLocked(a.s)
	c.mu.Unlock()
	if !moved {
		c.retryOrFail(a, true, f)
		return
	}
	c.moveWaiter(a, f)
}

// moveDrained is moveUnsent for a call moveWaiting took off a connection
// drained because its backend left the set or its Upstream was retired:
// if it cannot be placed again because no backend can be picked for it
// now (the reload that retired its cluster took its route too), it fails
// with f, UNAVAILABLE, why it was moved, rather than with the pick's
// error (UNIMPLEMENTED "no route" for a call that was routed). Caller
// must hold no lock, and own a reference to a.s.
func (c *serverConn) moveDrained(a *attempt, f failure) {
	c.mu.Lock()
	moved := c.unsentMoveLocked(a.s)
	c.mu.Unlock()
	if !moved {
		c.retryOrFail(a, true, f)
		return
	}
	c.placeAgain(a, f, true)
}

// unsentMoveLocked counts one more move of s off a connection that went
// away before s was sent there, and reports whether it is still within
// maxUnsentMoves: if not, the move is a counted retry. Caller must hold
// mu.
func (c *serverConn) unsentMoveLocked(s *stream) bool {
	if s.unsentMoves >= c.srv.unsentMoves {
		return false
	}
	s.unsentMoves++
	return true
}

// moveWaiter starts the call of a, a call waiting for a slot that
// rebalance took off its connection, one past its backend's stream limit
// (overLimitLocked), or one a GOAWAY took off before it was sent
// (moveUnsent), again: picked anew, which is not counted as an attempt.
// f is why a's pick was not used (failBackendConns, the wait
// at the connection cap, or failOverLimit), which its done is told as
// the other picks placed again unsent are (pickerErr: CANCELLED); the
// call fails with it if its request cannot be taken for a new attempt.
// Caller must hold no lock, and own a reference to a.s, as retryOrFail's
// does.
func (c *serverConn) moveWaiter(a *attempt, f failure) { c.placeAgain(a, f, false) }

// placeAgain is moveWaiter; keepIfNoPick: if no backend can be picked,
// the call fails with f rather than the pick's failure.
func (c *serverConn) placeAgain(a *attempt, f failure, keepIfNoPick bool) {
	s := a.s
	c.mu.Lock()
	if s.att == a && !s.cst.ended() && !s.down.closed {
		if items, ok := a.bc.harvest(a); ok {
			s.waitInsteadOfLast() // a's pick is made again
			g, started := c.startAttemptLocked(s, items)
			if started {
				c.mu.Unlock()
				c.signal()
				if a.done != nil {
					a.done(f.pickerErr())
				}
				return
			}
			// No new attempt took a's place: a, given to its backend
			// (it waited there, or was sent there before a GOAWAY), stays
			// the call's attempt (CallInfo.Attempts, Backend).
			s.attempts++
			if !keepIfNoPick || g.kind != failNoBackend {
				f = g
			}
		}
	}
	c.failUnlinkedLocked(a, f)
}

// takesWaitingLocked reports whether a call may wait on b for a slot.
// Caller must hold mu.
func (b *backendConn) takesWaitingLocked() bool {
	return !b.closed && !b.goingAway && !b.drainAndClose && !b.peerGoAway && !b.noStreams
}

// watchQueue bounds how long attempt a, queued on b past its cap
// (queueLocked), waits for a slot: the call waits at most limit
// (BackendPendingTimeout) over all its waits, so a call the queue moved
// here from another connection (rebalance, takeWaiting) waits for what
// is left of it (stream.waitEnd); then it fails with UNAVAILABLE
// (queueExpired). Nothing is armed when a is not waiting. Caller must
// hold a.s.cc.mu.
func (b *backendConn) watchQueue(a *attempt, limit time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := a.s
	if a.bClosed {
		// Let go of already: the call is over, or was moved (takeWaiting,
		// rebalance, a GOAWAY) and keeps what is left of its bound for
		// its next wait.
		return
	}
	if !a.queued {
		s.waitEnd.Store(0) // it got a slot
		return
	}
	b.armQueueLocked(a, limit)
}

// armQueueLocked arms the bound of a's wait for a slot on b: what is left
// of limit over all the call's waits (stream.waitEnd). Caller must hold
// mu; a is queued and its hsTimer free.
func (b *backendConn) armQueueLocked(a *attempt, limit time.Duration) {
	s := a.s
	now := monoNow()
	end := time.Duration(s.waitEnd.Load())
	if end == 0 {
		end = now + limit
		s.waitEnd.Store(int64(end))
	}
	b.armWaitLocked(a, max(end-now, 0), func(a *attempt, _ time.Duration) { b.queueExpired(a, limit) })
}

// monoBase is the origin of monoNow.
var monoBase = time.Now()

// monoNow reads the monotonic clock alone (time.Since of a time with a
// monotonic reading), as a duration since monoBase.
func monoNow() time.Duration { return time.Since(monoBase) }

// queueExpired runs on a's queue timer: if a still waits for a slot on b,
// it leaves b and its call fails with UNAVAILABLE, not retried: the
// backends were full. Its Picker's done sees CANCELLED (failQueueTimeout's
// doneErr): a full backend has not failed.
func (b *backendConn) queueExpired(a *attempt, wait time.Duration) {
	if streamDebug {
		a.s.live("queueExpired")
	}
	b.mu.Lock()
	if a.bClosed || a.up.id != 0 || !a.queued {
		b.mu.Unlock()
		return
	}
	b.unlinkLocked(a) // and out of pending
	b.mu.Unlock()
	b.log.Debug("no stream slot on the backend in time; call fails", "method", a.s.method, "duration", wait)
	a.s.cc.failUnlinked(a, failure{kind: failQueueTimeout, backend: b.addr, limit: wait.Milliseconds()})
}

// reserveUnknownLocked is get's last resort at MaxBackendConns: while no
// connection to addr has had the backend's SETTINGS, their stream limit is
// a guess (see capLocked), and a burst of calls to a new backend waits on
// one of them, up to BackendStreamsPerConn each, for the SETTINGS to tell
// how many it takes, rather than fail on the guess. Those over the limit
// the backend then advertises are picked again, as whenever SETTINGS come
// in lower than assumed (overLimitLocked): at the cap they wait for a
// slot (MaxBackendPending). Caller must hold p.mu.
func (p *pool) reserveUnknownLocked(k poolKey) *backendConn {
	cs := p.conns[k]
	for _, b := range cs {
		b.mu.Lock()
		known := b.gotSettings
		b.mu.Unlock()
		if known {
			return nil
		}
	}
	for _, b := range cs {
		if b.tryReserveUnknown() {
			return b
		}
	}
	return nil
}

// tryReserveUnknown takes a stream slot on b, past its assumed limit,
// while its handshake is not done; see reserveUnknownLocked.
func (b *backendConn) tryReserveUnknown() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed || b.goingAway || b.drainAndClose || b.gotSettings || b.reserved >= b.pool.srv.cfg.BackendStreamsPerConn {
		return false
	}
	b.reserved++
	b.used = true
	return true
}

// watchLoop runs beside a backend connection's reader and writer until
// done is closed: it sends keepalive PINGs and closes the connection when
// they go unanswered, and closes it when idle. The connection's run owns
// it and waits for it.
func (b *backendConn) watchLoop(done <-chan struct{}) {
	cfg := &b.pool.srv.cfg
	var kaC, idleC <-chan time.Time
	var ka *time.Timer
	if cfg.BackendKeepaliveTime > 0 {
		ka = time.NewTimer(cfg.BackendKeepaliveTime)
		defer ka.Stop()
		kaC = ka.C
	}
	if cfg.BackendIdleTimeout > 0 {
		t := time.NewTicker(cfg.BackendIdleTimeout / idleSweeps)
		defer t.Stop()
		idleC = t.C
	}
	var pingAt int64 // when the PING in flight was sent; 0: none
	idle := 0        // sweeps in a row that found b idle
	for {
		select {
		case <-done:
			return
		case <-idleC:
			if !b.idleSinceSweep() {
				idle = 0
				continue
			}
			// idleSweeps+1 sweeps in a row: idle for at least
			// BackendIdleTimeout, at most a quarter longer.
			if idle++; idle > idleSweeps && b.pool.closeIfIdle(b) {
				idleC = nil
			}
		case <-kaC:
			next := b.keepaliveTick(&pingAt)
			if next <= 0 {
				return
			}
			ka.Reset(next)
		}
	}
}

// idleSweeps is how many idle checks one BackendIdleTimeout holds.
const idleSweeps = 4

// idleSinceSweep reports whether b carries no stream and reserved none
// since the previous sweep, and starts a new sweep period.
func (b *backendConn) idleSinceSweep() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	idle := b.reserved == 0 && !b.used && !b.closed && !b.goingAway
	b.used = false
	return idle
}

// closeIfIdle closes b gracefully (GOAWAY, then the writer exits) if it
// still carries no stream and reserved none since the last sweep, and
// forgets it. Under p.mu, as get reserves under it: a call either reserved
// its slot before, and b stays, or finds b going away and takes another
// connection; none is lost in between.
func (p *pool) closeIfIdle(b *backendConn) bool {
	p.mu.Lock()
	b.mu.Lock()
	idle := b.reserved == 0 && !b.used && !b.closed && !b.goingAway
	if idle {
		b.goingAway = true
		b.drainAndClose = true
		b.queueCtrlLocked(writeOp{kind: opGoAway, code: http2.ErrCodeNo})
	}
	b.mu.Unlock()
	if idle {
		p.removeLocked(b)
	}
	p.mu.Unlock()
	if idle {
		b.signal()
		b.log.Debug("backend connection idle; closing it", "duration", p.srv.cfg.BackendIdleTimeout)
	}
	return idle
}

// keepaliveTick is the keepalive timer of b, after grpc-go's client
// keepalive: after BackendKeepaliveTime with nothing read, a connection
// with streams sends a PING; after BackendKeepaliveTimeout more with
// nothing read it is closed. Anything read answers the PING. It returns
// when to look again, or zero when it closed b.
func (b *backendConn) keepaliveTick(pingAt *int64) time.Duration {
	cfg := &b.pool.srv.cfg
	interval, timeout := cfg.BackendKeepaliveTime, cfg.BackendKeepaliveTimeout
	now := b.pool.srv.now().UnixNano()
	last := b.lastRead.Load()
	if *pingAt != 0 {
		if last <= *pingAt {
			if waited := time.Duration(now - *pingAt); waited < timeout {
				return min(interval, timeout-waited)
			}
			b.log.Warn("backend did not answer a keepalive PING; closing the connection", "duration", timeout)
			b.close(errKeepalive)
			return 0
		}
		*pingAt = 0
	}
	if quiet := time.Duration(now - last); quiet < interval {
		return interval - quiet
	}
	b.mu.Lock()
	if b.closed || len(b.streams) == 0 {
		// Idle connections are not pinged: grpc-go servers count that
		// against the client (PermitWithoutStream is off by default).
		b.mu.Unlock()
		return interval
	}
	b.queueCtrlLocked(writeOp{kind: opPing, ping: keepalivePing})
	b.mu.Unlock()
	b.signal()
	b.pool.pings.Add(1)
	*pingAt = now
	// Look again after the shorter of the two: an answer starts the next
	// interval from when it came, as grpc-go's client does.
	return min(interval, timeout)
}

// removeLocked forgets b. Caller must hold p.mu.
func (p *pool) removeLocked(b *backendConn) {
	k := poolKey{b.up, b.addr}
	cs := p.conns[k]
	if i := slices.Index(cs, b); i >= 0 {
		cs = slices.Delete(cs, i, i+1)
	}
	if len(cs) == 0 {
		delete(p.conns, k)
	} else {
		p.conns[k] = cs
	}
	if p.zeroAddrs.Load() != nil {
		p.refreshZeroLocked(b.addr)
	}
}
