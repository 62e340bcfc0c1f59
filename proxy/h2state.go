package proxy

// h2state is the state of one side of a stream, one connection's view of
// it, as RFC 9113 §5.1 defines it. The client side of a call (serverConn)
// and its backend side (backendConn) each keep one, and both change it only
// through transition, so the checks of §5.1 live in one place for both
// roles.
//
// A stream the connection no longer tracks is "closed" when its id is at
// or below the highest one opened, "idle" above it, and "reset sent" when
// it is among the ids we reset recently (see transport.recentReset).
type h2state uint8

const (
	stIdle             h2state = iota
	stOpen                     // both ends may send
	stHalfClosedLocal          // we sent END_STREAM
	stHalfClosedRemote         // the peer sent END_STREAM
	stResetSent                // we sent RST_STREAM: frames the peer had in flight are ignored (§5.1 "closed")
	stClosed                   // both ends done, or the peer reset the stream
)

var h2stateNames = [...]string{"idle", "open", "half-closed (local)", "half-closed (remote)", "reset sent", "closed"}

func (s h2state) String() string {
	if int(s) < len(h2stateNames) {
		return h2stateNames[s]
	}
	return "h2state(?)"
}

// h2event is what happens on a stream: a frame sent or received. END_STREAM
// is its own event, applied after the frame that carries it (HEADERS or
// DATA) was accepted.
type h2event uint8

const (
	evSendHeaders h2event = iota
	evRecvHeaders
	evSendEnd
	evRecvEnd
	evSendReset
	evRecvReset
	evRecvData
	evRecvWindowUpdate
)

var h2eventNames = [...]string{"send HEADERS", "recv HEADERS", "send END_STREAM", "recv END_STREAM", "send RST_STREAM", "recv RST_STREAM", "recv DATA", "recv WINDOW_UPDATE"}

func (e h2event) String() string {
	if int(e) < len(h2eventNames) {
		return h2eventNames[e]
	}
	return "h2event(?)"
}

// h2result is what RFC 9113 says of an event in a state.
type h2result uint8

const (
	resOK           h2result = iota // the event is legal; the new state applies
	resIgnore                       // the frame is dropped without an answer
	resStreamClosed                 // stream error STREAM_CLOSED (§5.1, §6.1, §6.2)
	resProtocol                     // connection error PROTOCOL_ERROR (§5.1 "idle"); for a send event, a bug of ours
)

var h2resultNames = [...]string{"ok", "ignore", "STREAM_CLOSED", "PROTOCOL_ERROR"}

func (r h2result) String() string {
	if int(r) < len(h2resultNames) {
		return h2resultNames[r]
	}
	return "h2result(?)"
}

// transition is RFC 9113 §5.1's state machine: the state after ev in s and
// whether ev was legal. On any result but resOK the state is unchanged.
//
//   - idle: only HEADERS opens a stream; any other frame received is a
//     connection error PROTOCOL_ERROR (§5.1, §6.4 RST_STREAM, §6.9
//     WINDOW_UPDATE).
//   - half-closed (remote): the peer's END_STREAM was received, so its DATA
//     or HEADERS are a stream error STREAM_CLOSED (§5.1, §6.1).
//   - reset sent: frames the peer sent before it saw our RST_STREAM are
//     ignored ("An endpoint MUST ignore frames that it receives on closed
//     streams after it has sent a RST_STREAM frame", §5.1).
//   - closed: DATA and HEADERS are a stream error STREAM_CLOSED; a late
//     RST_STREAM or WINDOW_UPDATE is ignored (§5.1 "closed").
//
// Sending is ours to get right: a send the RFC forbids reports resProtocol
// (a bug), except sends after the stream ended, which are dropped.
func transition(s h2state, ev h2event) (h2state, h2result) {
	switch s {
	case stIdle:
		switch ev {
		case evSendHeaders, evRecvHeaders:
			return stOpen, resOK
		}
		return s, resProtocol
	case stOpen:
		switch ev {
		case evSendEnd:
			return stHalfClosedLocal, resOK
		case evRecvEnd:
			return stHalfClosedRemote, resOK
		case evSendReset:
			return stResetSent, resOK
		case evRecvReset:
			return stClosed, resOK
		}
		return s, resOK
	case stHalfClosedLocal:
		switch ev {
		case evSendHeaders, evSendEnd:
			return s, resProtocol // nothing may follow our END_STREAM
		case evRecvEnd, evRecvReset:
			return stClosed, resOK
		case evSendReset:
			return stResetSent, resOK
		}
		return s, resOK
	case stHalfClosedRemote:
		switch ev {
		case evRecvHeaders, evRecvData, evRecvEnd:
			return s, resStreamClosed
		case evSendEnd, evRecvReset:
			return stClosed, resOK
		case evSendReset:
			return stResetSent, resOK
		}
		return s, resOK // send HEADERS, recv WINDOW_UPDATE
	case stResetSent:
		return s, resIgnore
	default: // stClosed
		switch ev {
		case evRecvHeaders, evRecvData, evRecvEnd:
			return s, resStreamClosed
		}
		return s, resIgnore
	}
}

// apply runs transition on *s and stores the new state when it is legal.
func (s *h2state) apply(ev h2event) h2result {
	next, res := transition(*s, ev)
	if res == resOK {
		*s = next
	}
	return res
}

// recvEnded reports whether the peer is done sending on the stream.
func (s h2state) recvEnded() bool {
	return s == stHalfClosedRemote || s >= stResetSent
}

// sentEnded reports whether we are done sending on the stream.
func (s h2state) sentEnded() bool {
	return s == stHalfClosedLocal || s >= stResetSent
}

// ended reports whether the stream is over on this connection.
func (s h2state) ended() bool { return s >= stResetSent }

// recentResets is how many of the stream ids a connection reset last it
// remembers once their streams are gone, so the peer's frames in flight on
// them are ignored (§5.1) rather than answered with STREAM_CLOSED.
const recentResets = 32

// resetRing remembers the last recentResets stream ids we reset. Its
// storage is allocated at the first reset: most connections never reset a
// stream, and an idle one should not carry it (issue 12).
type resetRing struct {
	r *resetIDs
}

type resetIDs struct {
	ids [recentResets]uint32
	// spent is what each stream received since the reset without counting
	// as a glitch (see spend).
	spent [recentResets]int64
	next  int
}

func (r *resetRing) add(id uint32) {
	if r.r == nil {
		r.r = new(resetIDs)
	}
	r.r.ids[r.r.next] = id
	r.r.spent[r.r.next] = 0
	r.r.next = (r.r.next + 1) % recentResets
}

// strayCost is what a frame other than DATA on a stream we reset, or a
// DATA frame shorter than it, spends of the stream's allowance: a client
// answered early has DATA, a WINDOW_UPDATE or a RST_STREAM of its own in
// flight, not a stream of empty frames.
const strayCost = 1 << 10

// spend adds cost to what id received since we reset it and reports
// whether that stays within allow: the frame is one the peer had in
// flight when we reset the stream, ignored as RFC 9113 §5.1 says, not a
// glitch. A legitimate client whose upload the backend answered early
// sends up to its stream window of DATA after our RST_STREAM(NO_ERROR)
// (and grpc-go a RST_STREAM of its own): counted as glitches, 20 such
// uploads in 10 s spent the connection's budget and it was closed
// ENHANCE_YOUR_CALM. A negative cost is never within it: header blocks,
// whose decoding a hostile backend can make expensive, count as before.
func (r *resetRing) spend(id uint32, cost, allow int64) bool {
	if r.r == nil || cost < 0 {
		return false
	}
	cost = max(cost, strayCost)
	for i, v := range r.r.ids {
		if v == id && r.r.spent[i]+cost <= allow {
			r.r.spent[i] += cost
			return true
		}
	}
	return false
}

func (r *resetRing) has(id uint32) bool {
	if r.r == nil {
		return false
	}
	for _, v := range r.r.ids {
		if v == id {
			return true
		}
	}
	return false
}
