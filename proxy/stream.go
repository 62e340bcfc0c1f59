package proxy

import (
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
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
// A stream is not reused (no pool, no free list): the collector frees it
// once nothing refers to it. It is 2,072 bytes (size class 2,304), nearly
// all of what a unary call allocates, and reusing it was looked at
// (branch wpool) and left out. The point where both sides are done (the
// second sideClosed) is not a point where nothing refers to the stream
// any more, and the checks that keep late users away from it (s.att == a,
// a.bClosed, s.down.closed, recvState.done) compare identities and flags
// that a reused stream passes for its new call (ABA). What can still hold
// the stream, its embedded first attempt, or slices of its inline storage
// after that point:
//
//   - The writers' batches. writeStep calls sentLastLocked, and through it
//     the final sideClosed, under mu, before writeFrames: the frame being
//     written is often the call's last (its trailers, whose fields are in
//     first.fieldInl), and the HPACK encoding reads them after mu is
//     released. A DATA op's credit is &s.upRecv or &a.downRecv;
//     applyCredits credits it after the write, and on a reused stream
//     would credit the new call's window, on the old call's connection,
//     under the new call's stream id. (A pool filled at the second
//     sideClosed failed BenchmarkUnary within a few hundred calls:
//     "invalid header field name \"\"": a response block of a stream
//     zeroed for its next call.)
//     A backend writer's HEADERS op (openLocked) carries attemptFields,
//     which is reqFields, a slice of reqRoom.
//   - The ready rings (transport.ready): removeLocked and discardLocked
//     empty s.down and a.up but leave them in the ring; the writer pops
//     and inspects them (eligible) later.
//   - A backend connection's pending list: a closed attempt stays there
//     until openLocked, failAll, onGoAway or onPeerSettings sweeps it
//     (they skip it by a.bClosed, which a reused first attempt has not).
//   - Timers: a deadlineTimer that fired while stop ran keeps s, and its
//     fire calls s.cc.deadlineExceeded(s) and then resetUp(s.att) later. A
//     handshake timer (a.hsTimer) is stopped only in openLocked and
//     onPeerSettings; otherwise its func keeps a until it fires
//     (handshakeExpired).
//   - Goroutines: openLocked runs `go failDown(a, f)` just after
//     closeAttLocked(a), which can be the final sideClosed.
//   - sideClosed's own callers: retryOrFail reads s.up after it
//     (warnThrottled).
//   - Code that lets go of a lock and then uses the stream or an attempt:
//     after cc.mu, the resetUp(a) of deadlineExceeded, the client's
//     RST_STREAM, enqueueDown, abortCalls, sweepRequestIdle and cleanup,
//     and the client reader's lengthMismatch (s.down.id, the stream its
//     RST_STREAM names, while the client writer may end the stream with
//     a reset a deadline queued); after bc.mu, the backend reader in
//     onHeaders and onData (enqueueDown with fields in a.fieldInl,
//     relayHeld and its creditStream(&a.downRecv), resetUp),
//     handshakeExpired, and the lists of failAll, onGoAway and
//     onPeerSettings handed to retryOrFail or failLost.
//   - Not holders: the Picker's done funcs (they have no stream), CallInfo
//     (copied in sideClosed; its strings are immutable), the endQueue,
//     views and payload buffers (they have their own reference counts),
//     the replay and hold-back items (pbufs, released by discardLocked),
//     control ops (stream ids only).
//
// Reuse would take a reference count: the two sides; a writer op that
// refers to the stream, released after writeFrames and applyCredits; a
// queue in a ready ring; an entry in pending; an armed timer; each
// unlock-then-use above, and failDown's goroutine; and a debug build that
// poisons a released stream, like pbufdebug. What it would buy, measured
// with a prototype that delays each stream's reuse by 1,024 calls (a
// quarantine, not a proof): 2,430 → 75 proxy-B/op and 4.04 → 3.01
// proxy-allocs/op in BenchmarkUnary/frame, 7 → 0 collections per 20,000
// unary calls, and 3.7-4% less proxy CPU per call at full speed, 1.5-2%
// at 2,000 calls/s (loadtest/bench/simulab.sh, both orders).
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
	tried       []string      // backends of the attempts made, in order
	bytesIn     int64         // DATA payload received from the client
	declLen     int64         // the request's content-length, -1 when it declares none
	bytesOut    int64         // DATA payload taken for writing toward the client (popLocked)
	msgs        msgCursor     // gRPC message boundaries in that payload (see failLost)
	fromBackend bool          // result is the backend's own status
	failKind    failKind      // what failLocked ended the call for
	pickErr     error         // the error of the Picker that failed the call, if one did
	active      bool          // a frame moved either way since the last request-idle sweep
	idleSweeps  uint8         // request-idle sweeps in a row that found it inactive
	message     string        // the backend's grpc-message, with Config.OnCallEnd
	start       time.Time     // request headers arrived, with Config.OnCallEnd

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
}

// attempt is one try of a stream on one backend: the backend stream and
// the request bytes queued for it. A transparent retry ends an attempt and
// starts another on another backend; the client sees one call.
type attempt struct {
	// Immutable after creation.
	s            *stream
	bc           *backendConn
	done         func(error)
	backendCount *atomic.Int64 // the backend's in-flight count, when capped
	hsTimer      *time.Timer   // bounds the wait for bc's handshake, or for a slot when queued (watchQueue); set once under bc.mu, before the timer can fire

	// Guarded by bc.mu.
	up         sendQueue           // toward the backend
	downRecv   recvState           // flow control of backend → proxy DATA
	bst        h2state             // RFC 9113 §5.1 state on bc: idle while pending
	bClosed    bool                // no longer in bc's tables nor holding a slot (also set to retry elsewhere)
	slotFreed  bool                // its slot and in-flight count were given back (releaseSlotLocked), perhaps before bClosed
	queued     bool                // reserved over the cap, it waits in bc.pending for a slot (pool.queueLocked)
	discarded  bool                // over for good: request items are refused
	gotHeaders bool                // the backend sent its response headers
	forwarded  bool                // the client has seen part of this attempt's answer
	held       []hpack.HeaderField // response headers held back while a retry is possible
	hold       holdback            // the incomplete response message held back (holdback.go)
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
		s.up.budget.record(status.Code(s.result) == codes.Unavailable)
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
