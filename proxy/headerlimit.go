package proxy

import (
	"strconv"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// This file holds the checks of header blocks against the limit the peer
// they are sent to advertised in SETTINGS_MAX_HEADER_LIST_SIZE (RFC 9113
// §6.5.2, §10.5.1): a peer may treat a larger block as a stream error, or
// drop the connection, so the proxy never sends one. A response block over
// the client's limit is replaced by a small status; a request over a
// backend's limit is not sent.

// headerListSize is the size of fields as SETTINGS_MAX_HEADER_LIST_SIZE
// counts it: names and values, plus 32 bytes per field.
func headerListSize(fields []hpack.HeaderField) uint32 {
	var n uint32
	for _, f := range fields {
		n += f.Size()
	}
	return n
}

// responseOverPeerLocked reports whether a response header block of a's
// backend is over the client's advertised limit, and if so ends the call
// with a status instead (failResponseHeadersOverPeer). Caller must hold
// c.mu; the caller cancels the backend stream once it released it.
func (c *serverConn) responseOverPeerLocked(a *attempt, fields []hpack.HeaderField) bool {
	limit := c.peerMaxHeaders
	if limit == 0 {
		return false // the common case: clients rarely advertise one
	}
	n := headerListSize(fields)
	if n <= limit {
		return false
	}
	s := a.s
	f := failure{kind: failResponseHeadersOverPeer, backend: a.bc.addr, limit: int64(limit), detail: strconv.FormatUint(uint64(n), 10)}
	if blocks, _ := endBlocks(f, !s.headersSent, nil); headerListSize(blocks[0]) > limit {
		// Even the status does not fit: a reset is all that is left
		// (grpc-go's server sends INTERNAL_ERROR too). It follows the
		// messages queued, as a status would (endStatusLocked); the
		// client reads them, then the reset's INTERNAL.
		s.result = f.statusErr()
		s.failKind = f.kind
		c.resetAfterQueuedLocked(s, http2.ErrCodeInternal)
		return true
	}
	c.failLocked(s, f)
	return true
}

// responseOverBudgetLocked counts a response header or trailer block of
// the backend's, queued toward the client, in the client connection's
// buffer budget (Config.MaxConnBufferedBytes) by its HPACK size, until
// the stream ends (sideClosed); a block that would take the budget over
// its limit is not queued, and the call ends RESOURCE_EXHAUSTED
// (failConnBudget) instead, as a new stream would be refused. Without it a
// client that did not read could make the proxy queue every answer's
// headers, up to MaxResponseHeaderListSize each (a testserver echoing a
// 50 KB request header: 53 MiB per connection). Caller must hold c.mu.
//
// Held-back headers (holdHeadersLocked) were counted when they were held:
// their count moves to respSize here, without a second check.
func (c *serverConn) responseOverBudgetLocked(a *attempt, fields []hpack.HeaderField) bool {
	s := a.s
	n := int64(headerListSize(fields))
	if held := a.heldSize.Swap(0); held > 0 {
		// The held-back block, queued before any other of a's.
		c.bufs.add(int(n - held))
		s.respSize += n
		return false
	}
	if b := &c.bufs; b.limit > 0 && b.used.Load()+n > b.limit {
		c.failLocked(s, failure{kind: failConnBudget, limit: b.limit})
		return true
	}
	c.bufs.add(int(n))
	s.respSize += n
	return false
}

// answerOverBudgetLocked counts the backend's own answer that a call not
// retried ends with (retryOrFail: held-back headers and UNAVAILABLE
// trailers) in the buffer budget, as responseOverBudgetLocked counts the
// blocks of an answer relayed as it comes, and reports whether the call
// was ended RESOURCE_EXHAUSTED instead. The held headers' count was
// released with the attempt (discardLocked). Caller must hold c.mu.
func (c *serverConn) answerOverBudgetLocked(a *attempt, answer [][]hpack.HeaderField) bool {
	for _, fields := range answer {
		if c.responseOverBudgetLocked(a, fields) {
			for _, f := range answer {
				clear(f) // not sent, as in enqueueDown
			}
			return true
		}
	}
	return false
}

// holdHeadersLocked counts response headers of a that are about to be
// held back while the call may still be retried (attempt.held) in the
// client connection's buffer budget, by their HPACK size, and reports
// whether they fit. Held headers were counted nowhere: with --retry-on,
// 60 calls answered with 900 KB of headers each and nothing more held
// 62 MB of heap on a connection with a 4 MiB budget, where without
// retries the calls past it failed RESOURCE_EXHAUSTED. Headers that do
// not fit are not held: the caller queues them at once, where
// responseOverBudgetLocked refuses them and ends the call
// RESOURCE_EXHAUSTED, as without retries. Caller must hold b.mu.
func (b *backendConn) holdHeadersLocked(a *attempt, fields []hpack.HeaderField) bool {
	n := int64(headerListSize(fields))
	if !a.s.cc.bufs.tryAdd(n) {
		return false
	}
	a.heldSize.Store(n)
	return true
}

// releaseHeldHeadersLocked lets go of a's held-back headers and of their
// count in the budget, unless it moved to the stream's respSize already.
// Caller must hold b.mu.
func (b *backendConn) releaseHeldHeadersLocked(a *attempt) {
	b.unlistHoldLocked(a)
	if n := a.heldSize.Swap(0); n > 0 {
		a.s.cc.bufs.sub(int(n))
	}
	if a.held != nil {
		// Nothing else refers to them: let go of their decoded strings,
		// which the attempt's field storage would keep until the call
		// ends.
		clear(a.held)
		a.held = nil
	}
}

// requestOverPeerLocked reports whether the request headers of an
// attempt, fields, are over the backend's advertised limit; openLocked
// then ends the attempt without sending it (failRequestHeadersOverPeer).
// Caller must hold b.mu.
func (b *backendConn) requestOverPeerLocked(fields []hpack.HeaderField) (failure, bool) {
	limit := b.peerMaxHeaders
	if limit == 0 {
		return failure{}, false
	}
	n := headerListSize(fields)
	if n <= limit {
		return failure{}, false
	}
	return failure{kind: failRequestHeadersOverPeer, backend: b.addr, limit: int64(limit), detail: strconv.FormatUint(uint64(n), 10)}, true
}
