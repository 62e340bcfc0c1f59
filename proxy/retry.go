package proxy

import (
	"errors"
	"slices"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Retries come in two kinds.
//
// Transparent retries (gRFC A6 "transparent retry"): a call that never
// reached a backend's application goes to another backend, whatever its
// method: the connection was refused or lost before the stream was opened,
// the backend answered REFUSED_STREAM, or its GOAWAY named a last stream id
// below ours. They need the request as it was sent, so each attempt keeps
// the request bytes it wrote, up to Config.RetryBufferSize, until the
// backend answers; a call that streamed past that is not retried once any
// of it was written.
//
// Retries of UNAVAILABLE: for methods named in Config.RetryOn only, a
// trailers-only UNAVAILABLE answer, or a connection lost before any answer,
// is retried on another backend, within the same buffer and a retry budget
// (gRFC A6 retry throttling: a token bucket that failures drain and
// successes refill) so that when every backend fails the retries stop.
//
// Either way a call makes at most 1+Config.MaxRetries attempts, and only
// while the client has seen no part of the response.

// startAttemptLocked picks a backend for s and queues a new attempt on it,
// with items as its first request items (nil for the first attempt). It
// reports the failure to end the call with when no attempt could be made.
// Caller must hold mu; the connection's and pool's locks are taken inside
// (cc.mu → pool.mu → bc.mu is the lock order).
//
// A call that every backend the Picker named refused at MaxBackendConns
// (all their connections full) is picked once more, the backends it
// tried included, and waits for a slot on the backend picked, if its
// queue has room (pool.queueLocked, Config.MaxBackendPending): wait.
func (c *serverConn) startAttemptLocked(s *stream, items []outItem) (failure, bool) {
	var refused *failure // the last pick the pool refused without trying it
	wait := false
	var full []string // with wait: the backends whose queue refused the call too
	repicked := false // picked again after addAttempt's errOverLimit
	goneAway := false // picked again after addAttempt's errPeerGoAway
	// refusals counts the picks the pool refused without trying them
	// (at its connection cap, a backend taking no streams): none is an
	// attempt (CallInfo.Attempts), the call was not sent, but they are
	// bounded by MaxRetries, with the attempts, as the retries they
	// replace.
	refusals := 0
	for {
		s.attempts++
		tried := s.tried
		if wait {
			tried = full
		}
		pk, err := c.pickLocked(s, tried)
		addr, up, done := pk.Addr, pk.Upstream, pk.Done
		if err != nil {
			// No backend was picked: no attempt (CallInfo.Attempts), so
			// a retry that found none is not counted as one.
			s.attempts--
			if s.up == nil && up != nil {
				// The routed cluster had no backend: the call is still
				// its (CallInfo.Upstream).
				s.up = up
			}
			if c.mayWait(refused, wait) {
				wait = true
				s.untryLast()
				continue
			}
			c.releaseItemsLocked(items)
			if refused != nil {
				// The backend that could take the call refused it (full,
				// or taking no streams): that is why it failed, not the
				// Picker's having nothing else.
				return *refused, false
			}
			s.pickErr = err
			return failure{kind: failNoBackend, method: s.method, cause: err}, false
		}
		if refused != nil && (!wait && slices.Contains(s.tried, addr) || wait && slices.Contains(full, addr)) {
			if c.mayWait(refused, wait) {
				// The Picker has no backend but those that just refused
				// the call at their connection cap: it waits for a slot
				// on the one picked: its one attempt, however many
				// backends refused it.
				wait = true
				s.untryLast()
			} else {
				// No backend left but those that refused the call at the
				// pool's caps (with wait, their queues too), which would
				// refuse it again: no attempt, and no retry counted for
				// the call (with one backend, each refused call counted
				// MaxRetries retries).
				s.attempts--
				if done != nil {
					done(refused.pickerErr())
				}
				c.releaseItemsLocked(items)
				return *refused, false
			}
		}
		if up == nil {
			up = c.srv.up
		}
		if s.up == nil {
			// The call's retry policy is its first pick's Upstream's.
			s.up = up
			s.retryable = up.retryable(s.method)
			if c.srv.cfg.RetryBufferSize > 0 {
				s.maxRetries = up.maxRetries
			}
			if pk.Timeout > 0 {
				s.routeTimeoutLocked(pk.Timeout)
			}
		}
		a := &s.first
		if s.attempts > 1 || s.att != nil || refusals > 0 || repicked || goneAway {
			// s.first is taken: by an earlier attempt, or by the first,
			// which a move (moveWaiter) picks again without counting it,
			// and whose done and connection the caller still uses.
			a = new(attempt)
		}
		*a = attempt{s: s, done: done, sent: pk.Sent, keepReplay: c.srv.cfg.RetryBufferSize > 0, respLen: -1}
		a.up = sendQueue{a: a, src: &c.transport, credit: &s.upRecv, mem: &c.bufs}
		for _, it := range items {
			a.up.push(it) // a copy: items may sit in a failed attempt's inline storage
		}
		bc, err := c.srv.pool.get(up, addr, a, wait)
		if err != nil {
			f, ok := err.(failure)
			if !ok {
				f = failure{kind: failInternal, cause: err}
			}
			if done != nil {
				done(f.pickerErr())
			}
			if wait && f.kind == failBackendConns {
				// The backend's queue is full too, or none of its
				// connections takes a waiting call (going away): the
				// call may wait on another backend, but is not picked
				// for this one again, nor is the refusal an attempt
				// (picked again, it made MaxRetries more, each logged
				// and counted a retry, to find the same queue full).
				s.attempts--
				refused = &f
				full = append(full, addr)
				continue
			}
			if f.kind == failBackendConns || f.kind == failNoStreams {
				// Refused without trying: not an attempt.
				if again := c.refusedUntried(s, &refusals); again || c.mayWait(&f, wait) {
					refused = &f
					// Never reached the backend: another may take the
					// call (see Config.MaxBackendConns,
					// pool.noStreamsLocked). Noted as tried, so the next
					// pick avoids it.
					if s.tried == nil {
						s.tried = s.triedInl[:0]
					}
					s.tried = append(s.tried, addr)
					if !again {
						// No retry left, but a refusal at the connection
						// cap may still wait for a slot (mayWait): the
						// next pick waits.
						wait = true
						s.untryLast()
					}
					continue
				}
			}
			c.releaseItemsLocked(items)
			return f, false
		}
		if h := c.srv.afterReserve; h != nil {
			h(addr)
		}
		a.bc = bc
		if s.tried == nil {
			s.tried = s.triedInl[:0]
		}
		s.tried = append(s.tried, addr)
		a.up.closed = s.cst.recvEnded()
		prev := s.att
		s.att = a
		s.down.src = &bc.transport
		s.down.credit = &a.downRecv
		cause := bc.addAttempt(a)
		if cause == nil {
			bc.mu.Lock()
			bc.markReadyLocked(&a.up)
			bc.mu.Unlock()
			if wait {
				if h := c.srv.beforeWatchQueue; h != nil {
					h(addr)
				}
				bc.watchQueue(a, c.srv.cfg.BackendPendingTimeout)
			} else if s.waitEnd.Load() != 0 {
				s.waitEnd.Store(0) // not waiting; a load, not a store, per call
			}
			if s.attempts <= s.maxRetries {
				// Only a call that may still go elsewhere gives up on a
				// slow handshake; the last attempt waits for it.
				bc.watchHandshake(a, c.handshakeWait(s))
			}
			return failure{}, true
		}
		// The connection failed between the pick and now: the request is
		// still whole in a.up, so try once more elsewhere.
		s.att = prev
		items = a.up.items[a.up.head:]
		if errors.Is(cause, errOverLimit) {
			// Never reached the backend: its SETTINGS came, or lowered
			// its limit, after the slot was reserved, and leave it none.
			// Its done is told so (failOverLimit); the call goes on as if
			// the pool had refused it at its connection cap, where it
			// may wait for a slot (mayWait).
			if done != nil {
				bc.mu.Lock()
				limit := bc.peerMaxStream
				bc.mu.Unlock()
				done(failure{kind: failOverLimit, backend: addr, limit: int64(limit)}.pickerErr())
			}
			f := failure{kind: failBackendConns, backend: addr, limit: int64(c.srv.cfg.MaxBackendConns)}
			if !repicked {
				// Picked again, not counted, as if picked now (see
				// backendConn.overLimitLocked). Once: a slot reserved now
				// is within the limit, unless the backend lowers it
				// again meanwhile.
				repicked = true
				s.waitInsteadOfLast()
				continue
			}
			if c.refusedUntried(s, &refusals) {
				refused = &f
				continue
			}
			c.releaseItemsLocked(items)
			return f, false
		}
		if errors.Is(cause, errNoStreams) {
			// Never reached the backend, as when the pool refuses it
			// (above): another may take the call.
			f := failure{kind: failNoStreams, backend: addr}
			if done != nil {
				done(f.pickerErr())
			}
			if c.refusedUntried(s, &refusals) {
				refused = &f
				continue
			}
			c.releaseItemsLocked(items)
			return f, false
		}
		f := failure{kind: failConnLost, backend: addr, cause: cause, draining: c.srv.pool.restarting(addr)}
		if errors.Is(cause, errPeerGoAway) {
			f.kind = failGoAway
			if c.unsentMoveLocked(s) {
				// The connection's GOAWAY came after the slot was
				// reserved: never sent, the call is picked again without
				// counting as an attempt, as the calls the GOAWAY found
				// waiting on it are (moveUnsent), and within the same
				// bound.
				goneAway = true // s.first, unlinked, is not taken again
				if done != nil {
					done(f.statusErr())
				}
				s.waitInsteadOfLast()
				continue
			}
		}
		if done != nil {
			done(f.statusErr())
		}
		if s.attempts > s.maxRetries {
			c.releaseItemsLocked(items)
			return f, false
		}
	}
}

// repickLimit is how many times a Picker that is not a RetryPicker is
// asked for a backend the call has not tried, before its answer is taken
// anyway.
const repickLimit = 3

// pickLocked picks the backend of s's next attempt: any for the first,
// one not yet tried for a retry, so that a retry does not land on the
// backend that just refused the call (Envoy's previous_hosts predicate).
// The pick's Upstream is the one an UpstreamPicker named, nil otherwise.
// Caller must hold mu.
//
// Every attempt also avoids the backends that advertise
// SETTINGS_MAX_CONCURRENT_STREAMS=0 (pool.avoid), which the pool would
// refuse: they are not picked, rather than picked, refused and picked
// again, and come back to the picks as soon as they raise the limit.
func (c *serverConn) pickLocked(s *stream, tried []string) (UpstreamPick, error) {
	ctx := c.pickContext(s.reqFields)
	if up := c.srv.upPicker; up != nil {
		// s.up is nil until the call's first pick succeeded.
		return up.PickUpstream(ctx, s.method, s.up, c.srv.pool.avoid(tried))
	}
	p := c.srv.cfg.Picker
	avoid := c.srv.pool.avoid(tried)
	var pk UpstreamPick
	var err error
	if len(avoid) == 0 {
		pk.Addr, pk.Done, err = p.Pick(ctx, s.method)
		return pk, err
	}
	if rp, ok := p.(RetryPicker); ok {
		pk.Addr, pk.Done, err = rp.PickExcluding(ctx, s.method, avoid)
		return pk, err
	}
	for i := 1; ; i++ {
		pk.Addr, pk.Done, err = p.Pick(ctx, s.method)
		if err != nil || i == repickLimit || !slices.Contains(avoid, pk.Addr) {
			return pk, err
		}
		if pk.Done != nil {
			pk.Done(failure{kind: failRepicked, backend: pk.Addr}.statusErr())
		}
	}
}

// waitInsteadOfLast undoes the last attempt, whose call is picked again
// (moveWaiter, addAttempt's errOverLimit): it is not counted as an
// attempt of its own (CallInfo.Attempts), nor its backend as tried.
// Caller must hold cc.mu.
func (s *stream) waitInsteadOfLast() {
	s.attempts--
	s.untryLast()
}

// untryLast makes the pick that waits for a slot take the place of the
// last pick the pool refused (mayWait) in tried: its backend is not
// noted as tried. The refusal was not counted as an attempt. Caller must
// hold cc.mu.
func (s *stream) untryLast() {
	if n := len(s.tried); n > 0 {
		s.tried = s.tried[:n-1]
	}
}

// mayWait reports whether a call that the pool refused, for refused, may
// be picked once more to wait for a slot: the refusal was at
// MaxBackendConns, calls may wait (Config.MaxBackendPending), and it is
// not waiting already.
func (c *serverConn) mayWait(refused *failure, wait bool) bool {
	return !wait && refused != nil && refused.kind == failBackendConns && c.srv.cfg.MaxBackendPending > 0
}

// handshakeWait is how long an attempt of s waits for its backend
// connection's handshake; see Config.HandshakeTimeout.
func (c *serverConn) handshakeWait(s *stream) time.Duration {
	w := c.srv.cfg.HandshakeTimeout
	if !s.deadline.IsZero() {
		w = min(w, max(time.Until(s.deadline)/4, minHandshakeWait))
	}
	return w
}

// releaseItemsLocked returns the buffers of items nobody will send.
func (c *serverConn) releaseItemsLocked(items []outItem) {
	for _, it := range items {
		if it.buf != nil {
			c.bufs.freeBuf(it.buf) // copies made by harvest: no writer has seen them
		}
	}
}

// refusedUntried counts a backend's refusal of s's call without trying
// it (never sent: the pool's connection cap, or its connection's limit
// left no slot, or it takes no streams), which is no attempt, and reports whether the call may still
// be picked again: refusals stay bounded by MaxRetries with the attempts.
// Caller must hold mu.
func (c *serverConn) refusedUntried(s *stream, refusals *int) bool {
	s.attempts--
	*refusals++
	return s.attempts+*refusals <= c.srv.cfg.MaxRetries
}

// retryOrFail is called by a backend connection for an attempt it
// unlinked because it ended before the backend answered, for the reason f.
// The call goes to another backend if it may (see the comment at the top
// of this file); otherwise it ends: with answer, the backend's own answer
// as header blocks, if there is one, else with the status of f.
//
// The caller owns a reference to a.s, which it lets go of after this
// returned: this may end the call (sideClosed), and a.done and s.up are
// read after that.
func (c *serverConn) retryOrFail(a *attempt, transparent bool, f failure, answer ...[]hpack.HeaderField) {
	s := a.s
	if streamDebug {
		s.live("retryOrFail")
	}
	c.mu.Lock()
	eligible := s.att == a && !s.cst.ended() && !s.down.closed && !s.headersSent && s.down.onlyInterim() &&
		s.attempts <= s.maxRetries
	throttled := eligible && !transparent && s.retryable && !s.up.budget.allow()
	if eligible && (transparent || (s.retryable && !throttled)) {
		if items, ok := a.bc.harvest(a); ok {
			if _, ok := c.startAttemptLocked(s, items); ok {
				for _, fields := range answer {
					// Dropped: let go of the decoded strings (held-back
					// headers of up to MaxResponseHeaderListSize), which
					// the attempt's field storage would keep until the
					// call ends. Nothing else refers to them.
					clear(fields)
				}
				c.mu.Unlock()
				c.signal()
				if a.done != nil {
					a.done(f.pickerErr())
				}
				return
			}
		}
	}
	a.bc.mu.Lock()
	a.bc.discardLocked(a)
	a.bc.mu.Unlock()
	current := s.att == a
	if current && !s.cst.ended() && !s.down.closed && !c.answerOverBudgetLocked(a, answer) {
		c.failLocked(s, f, answer...)
	}
	c.mu.Unlock()
	c.signal()
	if current {
		s.sideClosed()
	}
	if throttled {
		c.srv.warnThrottled(s.up)
	}
}

// failUnlinked ends the call of attempt a, which its backend connection
// unlinked before opening it, with f: retryOrFail's end, without a retry.
// The caller owns a reference to a.s, as retryOrFail's does.
func (c *serverConn) failUnlinked(a *attempt, f failure) {
	if streamDebug {
		a.s.live("failUnlinked")
	}
	c.mu.Lock()
	c.failUnlinkedLocked(a, f)
}

// failUnlinkedLocked is failUnlinked for a caller that holds mu; it
// releases it.
func (c *serverConn) failUnlinkedLocked(a *attempt, f failure) {
	s := a.s
	a.bc.mu.Lock()
	a.bc.discardLocked(a)
	a.bc.mu.Unlock()
	current := s.att == a
	if current && !s.cst.ended() && !s.down.closed {
		c.failLocked(s, f)
	}
	c.mu.Unlock()
	c.signal()
	if current {
		s.sideClosed()
	}
}

// throttleWarnEvery bounds how often an exhausted retry budget is logged.
const throttleWarnEvery = 10 * time.Second

// warnThrottled logs, at most once per throttleWarnEvery, that the retry
// budget kept a call from being retried: when a fleet-wide failure drains
// the budget, the operator should know that UNAVAILABLE answers now reach
// clients on purpose. It is called with no lock held.
func (s *Server) warnThrottled(up *Upstream) {
	if up.budgetSize == 0 {
		return // a budget of none: the operator's choice, not exhaustion
	}
	now := s.now().UnixNano()
	last := s.throttleWarned.Load()
	if now-last < int64(throttleWarnEvery) || !s.throttleWarned.CompareAndSwap(last, now) {
		return
	}
	s.cfg.Logger.Warn("retry budget exhausted; UNAVAILABLE answers are not retried until enough calls succeed",
		"cluster", up.name, "retry_budget", up.budgetSize, "retry_budget_ratio", up.budgetRate)
}

// retryBudget is gRFC A6 retry throttling (Config.RetryBudget and
// RetryBudgetRatio): a token bucket of maxTokens;
// every failed call takes one token, every success gives back ratio; a
// retry is allowed only while more than half the tokens are left. What
// is a failure and what a success is stream.budgetOutcome's. Tokens are
// kept in thousandths so the bucket is a single atomic.
type retryBudget struct {
	tokens    atomic.Int64
	maxTokens int64
	ratio     int64
}

func newRetryBudget(maxTokens int64, ratio float64) *retryBudget {
	b := &retryBudget{maxTokens: maxTokens * 1000, ratio: int64(ratio * 1000)}
	b.tokens.Store(b.maxTokens)
	return b
}

func (b *retryBudget) allow() bool { return b.tokens.Load() > b.maxTokens/2 }

// record accounts for the outcome of one call.
func (b *retryBudget) record(failed bool) {
	for {
		old := b.tokens.Load()
		n := old + b.ratio
		if failed {
			n = old - 1000
		}
		n = min(max(n, 0), b.maxTokens)
		if n == old || b.tokens.CompareAndSwap(old, n) {
			return
		}
	}
}

// budgetOutcome is what a call's end does to its retry budget.
type budgetOutcome uint8

const (
	budgetNone    budgetOutcome = iota // neither takes nor gives back
	budgetSuccess                      // gives back the ratio
	budgetFailure                      // takes a token
)

// budgetOutcome says how s's end counts in its retry budget, as gRFC A6
// and grpc-go's retryThrottler count a call: "The only RPCs that are
// counted as failures ... fail with a status code that qualifies as
// retryable", and a success is a call that ended OK (grpc-go calls
// successfulRPC when the call's error is nil, throttle only for a
// retryable code). So:
//
//   - an answer of the backend's own (fromBackend) counts: OK is a
//     success, UNAVAILABLE (the one code retried, Config.RetryOn) a
//     failure, any other code neither (a NOT_FOUND or INVALID_ARGUMENT
//     says nothing of the backend's health: counted a success, a
//     backend answering errors refilled the bucket);
//   - a status the proxy made itself is no backend's answer and counts
//     neither way: its client cancelled the call, its grpc-timeout or its
//     route's timeout ran out while the backend had not answered
//     (DEADLINE_EXCEEDED), the proxy's own limits (RESOURCE_EXHAUSTED),
//     a request it refused, its shutdown, or INTERNAL. Counted a success,
//     each of them refilled the bucket while every backend failed;
//   - except a backend that could not be reached or took no part of the
//     call before any response header: its connection refused, lost or
//     never past the handshake, REFUSED_STREAM, or a GOAWAY that left the
//     stream unprocessed, when that ends the call UNAVAILABLE (the
//     transparent retries these allow are not throttled). That is a
//     failure, as in grpc-go: a stream that ends before any header is a
//     trailers-only UNAVAILABLE there (http2Client.closeStream sets
//     noHeaders), and a pick that fails because no subchannel could
//     connect is an UNAVAILABLE that throttle counts too. Without it a
//     fleet that is down, refusing connections, would never throttle.
//     Once the backend sent its response headers, a lost connection
//     counts neither way (grpc-go retries, and so throttles,
//     trailers-only answers only).
//
// Caller: ended, with s.att set. Only reads fields: no allocation.
func (s *stream) budgetOutcome() budgetOutcome {
	code := status.Code(s.result)
	if s.fromBackend {
		switch code {
		case codes.OK:
			return budgetSuccess
		case codes.Unavailable:
			return budgetFailure
		}
		return budgetNone
	}
	if code != codes.Unavailable || s.att.gotHeaders {
		// gotHeaders: written under bc.mu before the attempt's side
		// closed (sideClosed), which ended follows.
		return budgetNone
	}
	switch s.failKind {
	case failDial, failConnLost, failHandshake, failRefused, failGoAway:
		return budgetFailure
	}
	return budgetNone
}
