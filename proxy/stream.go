package proxy

import (
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// stream is one proxied gRPC call as the client sees it: a stream on a
// serverConn, relayed to the backend stream of its current attempt. It is
// an entry in its connection's table; no goroutine belongs to it.
//
// Lock discipline: fields under "client side" are guarded by cc.mu; an
// attempt's fields by its bc.mu. cc.mu may be held while taking a bc.mu
// (the client reader hands request bytes to the current attempt that way,
// so that switching attempts for a retry is atomic with it), never the
// other way round: backend connections release their mu before calling
// into the client connection.
//
// A stream is reused: once its last owner lets go of it (unref), it is
// reset to its zero value and goes back to streamPool, and a later call,
// on any connection, may take it (newStream). It is 2,088 bytes (size
// class 2,304), nearly all of what a unary call allocates. The point
// where both sides are done (the second sideClosed) is not the point
// where nothing refers to the stream any more, so a reference count
// (refs) says when that is. Each owner below holds one reference, taken
// while the stream is surely live (the taker holds one itself, or holds a
// lock over a structure that holds one) and let go of exactly once; code
// that is not an owner uses the stream only under such a lock. The
// checks that keep late users away from a stream (s.att == a, a.bClosed,
// s.down.closed, recvState.done) are then a call's own: no one holds a
// stream while it is reused, so no one can mistake the next call's
// state for the old one's (ABA).
//
//   - The client side: from the stream's creation until it leaves its
//     connection's table (removeLocked, through sideClosed). A stream
//     found in c.streams under cc.mu is live.
//   - The backend side: until the call's final attempt is done
//     (closeAttLocked, or retryOrFail when the call is not retried, both
//     through sideClosed), or at once when it never had one
//     (noBackendSide). At most one attempt of a stream is linked in a
//     backend connection's tables (bClosed false) at a time, and only
//     until its side is done: a linked attempt found in b.streams under
//     bc.mu is live.
//   - The client reader setting a new stream up (onHeaders), until it
//     returns.
//   - A queue in a ready ring (markReadyLocked; the stream of &s.down or
//     of &a.up, for any attempt a): readyPopLocked hands the reference to
//     the writer, which passes it to its batch, puts it back with the
//     queue (blocked), or lets go of it (a queue emptied meanwhile).
//   - A writer's batch (writeScratch.refs), for each op taken from a
//     queue, and each HEADERS op of openLocked: the op may refer to the
//     stream's fields (trailers in first.fieldInl, the request's in
//     reqRoom) and its credit to &s.upRecv or &a.downRecv. The writer
//     lets go of them once writeFrames and applyCredits are done
//     (unrefBatch).
//   - An attempt on a backend connection's pending list (addAttempt),
//     until it leaves it: openLocked (the reference goes to the batch, or
//     to failDown's goroutine), failAll, onGoAway, onPeerSettings (to
//     their lists), handshakeExpired, or unlinkLocked for a call that
//     waited for a slot past the cap (queued) and stops waiting.
//   - An armed timer: the deadlineTimer (startDeadline; fire lets go
//     after deadlineExceeded, stop when it kept the timer from firing)
//     and a.hsTimer (watchHandshake, or watchQueue for a call waiting
//     for a slot, both through armWaitLocked; handshakeExpired or
//     queueExpired, or a Stop that kept it from firing in openLocked,
//     onPeerSettings, takeWaiting or rebalance).
//   - Lists and callers that keep using a stream or attempt after a lock
//     is released or a side may have ended: the backend reader in
//     onHeaders, onData (through enqueueDown, relayHeld, resetUp) and
//     resetFromBackend; the lists of failAll, onGoAway and onPeerSettings
//     (handed to retryOrFail or failLost, which rely on their caller's
//     reference); the attempts abortCalls, sweepRequestIdle and cleanup
//     cancel, and resetFromClient's (resetCut); failDown's goroutine.
//     lengthMismatch is built before cc.mu is released instead.
//   - Not owners: the Picker's done funcs (they have no stream), CallInfo
//     (copied in sideClosed; its strings are immutable), the endQueue,
//     views and payload buffers (they have their own reference counts),
//     the replay and hold-back items (pbufs, released by discardLocked),
//     control ops (stream ids only), the tried list handed to a Picker
//     (read during the pick only: RetryPicker).
//
// Attempts other than first (retries) are allocated and left to the
// collector; what keeps them from acting on a reused stream (a.s) is the
// same set of owners, each holding the stream of the attempt it refers
// to. Behind the count, a stream whose last reference goes while it is
// visibly in use (settled: a side not done, a queue in a ready ring, its
// deadline timer armed) is not reused but left to the collector, and
// counted (unsettledStreams). The build tag streamdebug (streamdebug.go)
// never reuses a stream: it poisons it on release and checks each
// owner's use.
type stream struct {
	// Immutable after the stream is set up.
	cc        *serverConn
	method    string
	reqFields []hpack.HeaderField // request headers as relayed, kept for retries
	reqEnd    bool                // request HEADERS carried END_STREAM
	reqSize   uint32              // HPACK size of reqFields, counted in cc.bufs while the stream lives
	respSize  int64               // HPACK size of the response blocks queued toward the client, counted the same; guarded by cc.mu
	timer     *deadlineTimer      // grpc-timeout, or nil
	srvCount  *atomic.Int64       // Server.inflight when MaxStreams applies

	// Set by the first pick (under cc.mu, before any backend sees the
	// stream), then immutable.
	up         *Upstream // its retry policy and budget
	retryable  bool      // method opted in to retries of UNAVAILABLE
	maxRetries int       // further attempts allowed
	// deadline is the call's: from grpc-timeout, set before the first
	// pick, or the route's if that is earlier (routeTimeoutLocked); zero
	// when none. routeTimeout is the timeout of the route the first pick
	// named (UpstreamPick.Timeout), 0 if none: each attempt's backend is
	// then sent what is left of deadline as its grpc-timeout
	// (attemptFields). clientDeadline is the client's own (grpc-timeout),
	// zero if none: what a reset of the client's is measured against
	// (resetResult); deadline differs from it when the route's is the
	// earlier (routeDeadline).
	deadline       time.Time
	clientDeadline time.Time
	clientTimeout  time.Duration // the client's grpc-timeout, with clientDeadline
	routeTimeout   time.Duration

	// Client side, guarded by cc.mu.
	down        sendQueue     // toward the client
	upRecv      recvState     // flow control of client → proxy DATA
	cst         h2state       // RFC 9113 §5.1 state on cc; it leaves cc's table when it ends
	headersSent bool          // response HEADERS taken for writing: a failure must use trailers (gRPC, not §5.1)
	rstQueued   bool          // a RST_STREAM follows the response in down
	rstCode     http2.ErrCode // its code
	result      error         // outcome reported to done
	att         *attempt      // current backend attempt; nil when none was made
	attempts    int           // attempts made so far
	unsentMoves uint8         // moves off connections that went away before the call was sent there (moveUnsent)
	tried       []string      // backends of the attempts made, in order
	bytesIn     int64         // DATA payload received from the client
	declLen     int64         // the request's content-length, -1 when it declares none
	bytesOut    int64         // DATA payload taken for writing toward the client (popLocked)
	sweptOut    int64         // bytesOut at the last request-idle sweep
	msgs        msgCursor     // gRPC message boundaries in that payload (see failLost)
	fromBackend bool          // result is the backend's own status
	failKind    failKind      // what failLocked ended the call for
	pickErr     error         // the error of the Picker that failed the call, if one did
	active      bool          // a frame moved either way since the last request-idle sweep
	idleSweeps  uint8         // request-idle sweeps in a row that found it inactive
	message     string        // the backend's grpc-message, with Config.OnCallEnd
	start       time.Time     // request headers arrived, with Config.OnCallEnd
	// respHeaders: the backend's final response headers were queued
	// toward the client; nonGRPC is then, for headers without a gRPC
	// content-type, the outcome a gRPC client reads from them
	// (nonGRPCOutcome), whatever ends the response.
	respHeaders bool
	nonGRPC     error

	// first is the storage of the first attempt and triedInl of tried:
	// most calls make one attempt, so they cost no allocation of their own.
	first    attempt
	triedInl [1]string
	// reqRoom is the room keepFields takes reqFields from; grpc-go sends
	// seven to nine request headers.
	reqRoom [10]hpack.HeaderField

	// sides counts the sides that are done: the client side and the final
	// attempt. The second reports the outcome.
	sides atomic.Int32
	// refs counts the owners of the stream (see the comment above the
	// type); the last unref resets it and returns it to streamPool.
	refs atomic.Int32
	// waitEnd bounds the call's wait for a backend slot over every
	// connection the queue moves it to (pool.queueLocked,
	// Config.BackendPendingTimeout), in monoNow's time; zero while it
	// has not waited since it last got a slot. Set when a wait is
	// bounded (watchQueue), cleared when an attempt starts without
	// waiting (startAttemptLocked) or a wait ends with a slot
	// (openLocked, watchQueue).
	waitEnd atomic.Int64
}

// attempt is one try of a stream on one backend: the backend stream and
// the request bytes queued for it. A transparent retry ends an attempt and
// starts another on another backend; the client sees one call.
type attempt struct {
	// Immutable after creation.
	s            *stream
	bc           *backendConn
	done         func(error)
	sent         func()        // UpstreamPick.Sent; called, and cleared, under bc.mu when the attempt's stream is opened
	backendCount *atomic.Int64 // the backend's in-flight count, when capped
	hsTimer      *time.Timer   // bounds the wait for bc's handshake, or for a slot when queued (watchQueue); set once under bc.mu, before the timer can fire

	// Guarded by bc.mu.
	up         sendQueue           // toward the backend
	downRecv   recvState           // flow control of backend → proxy DATA
	bst        h2state             // RFC 9113 §5.1 state on bc: idle while pending
	bClosed    bool                // no longer in bc's tables nor holding a slot (also set to retry elsewhere)
	slotFreed  bool                // its slot and in-flight count were given back (releaseSlotLocked), perhaps before bClosed
	queued     bool                // reserved over the cap, it waits in bc.pending for a slot (pool.queueLocked)
	waits      bool                // added to bc.pending before bc's handshake: it waits for it (attemptFields)
	discarded  bool                // over for good: request items are refused
	gotHeaders bool                // the backend sent its response headers
	gotData    bool                // the backend sent response DATA (unansweredLocked)
	forwarded  bool                // the client has seen part of this attempt's answer
	held       []hpack.HeaderField // response headers held back while a retry is possible
	// holdAt is when held came (monoNow); holdIdx is a's place+1 in
	// bc.holds while held waits there, bounded (listHoldLocked).
	holdAt  time.Duration
	holdIdx int32
	hold    holdback // the incomplete response message held back (holdback.go)
	// heldSize is the HPACK size of held, counted in the client
	// connection's budget while they are held (holdHeadersLocked), until
	// the count moves to the stream's respSize as they are queued toward
	// the client (responseOverBudgetLocked) or is released with the
	// attempt (discardLocked), whichever swaps it to zero first.
	heldSize atomic.Int64
	// finalHeaders: the backend sent its final (non-1xx) response
	// headers; interim counts the informational ones before them.
	finalHeaders bool
	interim      uint8
	// respLen is the content-length the final response headers
	// declared, -1 for none; respGot counts the response's DATA payload
	// against it (RFC 9113 §8.1.1, backendConn.responseLengthLocked).
	respLen, respGot int64
	// replay keeps the request items already written, while a retry is
	// still possible and they fit Config.RetryBufferSize.
	replay      []outItem
	replayInl   [1]outItem // first storage of replay: a unary request is one DATA item
	replayBytes int
	keepReplay  bool

	// Backend reader only: the room keepFields takes the response's header
	// blocks from, headers and trailers of a typical gRPC answer.
	fieldRoom []hpack.HeaderField
	fieldInl  [8]hpack.HeaderField
}

// sideClosed is called once by the client side and once for the final
// attempt when they are done. The second call reports the outcome. Each
// call lets go of its side's reference last: a caller that uses the
// stream after it must hold a reference of its own.
func (s *stream) sideClosed() {
	if streamDebug {
		s.live("sideClosed")
	}
	n := s.sides.Add(1)
	if streamDebug && n > 2 {
		panic("streamdebug: a side of the stream closed twice")
	}
	if n == 2 {
		s.ended()
	}
	s.unref() // the side's
}

// noBackendSide is sideClosed for a stream that never had an attempt
// (rejectStream, rejectMalformed): its backend side is done at once, and
// nothing is reported for it (the client side's close reports the call).
func (s *stream) noBackendSide() {
	s.sides.Add(1)
	s.unref() // the backend side's
}

// ended reports the outcome of s, once both sides are done.
func (s *stream) ended() {
	if s.timer != nil {
		s.timer.stop()
	}
	if s.srvCount != nil {
		s.srvCount.Add(-1)
	}
	if s.reqSize > 0 {
		s.cc.bufs.sub(int(s.reqSize))
	}
	if s.respSize > 0 {
		// The last block was queued before the response side closed,
		// under cc.mu, and that close came before this.
		s.cc.bufs.sub(int(s.respSize))
	}
	if a := s.att; a != nil {
		// gRFC A6 counts backends' answers only (budgetOutcome).
		if outcome := s.budgetOutcome(); outcome != budgetNone {
			s.up.budget.record(outcome == budgetFailure)
		}
		if a.done != nil {
			a.done(s.result)
		}
	}
	if srv := s.cc.srv; srv.reportsEnds() {
		ci := s.callInfo(srv.now())
		if srv.countEnd != nil {
			srv.countEnd(ci)
		}
		if srv.ends != nil {
			// Queued, not called: this may run under cc.mu or a bc.mu.
			srv.ends.push(ci)
		}
	}
}
