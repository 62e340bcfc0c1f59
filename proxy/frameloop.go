package proxy

import (
	"encoding/binary"
	"errors"
	"time"

	"golang.org/x/net/http2"
)

// This file is the reader half of transport, the same for both roles: the
// frame loop, the connection-level frames (SETTINGS, PING, WINDOW_UPDATE,
// GOAWAY, PUSH_PROMISE), the rules on the first frame and frame sizes, the
// flow-control and RFC 9113 §5.1 checks every DATA frame passes, and the
// answer to frames on streams the connection does not track. What a
// stream's frames mean is the role's, behind h2role: serverConn for the
// client-facing side, backendConn for the backend-facing side, as grpc-go's
// http2_server and http2_client share one loopy writer.

// h2role is what the frame loop needs from its connection's role. The
// methods named ...Locked are called with mu held; the others without.
type h2role interface {
	role // the writer's side
	streamTable
	frameHandler
	errorPolicy
}

// streamTable is the role's table of streams.
type streamTable interface {
	// streamLocked returns the state and send queue of stream id, or
	// nils when the connection does not track it.
	streamLocked(id uint32) (*h2state, *sendQueue)
	// forgottenLocked is the §5.1 state of a stream id the connection
	// does not track: stIdle if it was never opened, stResetSent if its
	// frames are to be ignored, stClosed otherwise.
	forgottenLocked(id uint32) h2state
	// eachQueueLocked calls fn for the send queue of every open stream.
	eachQueueLocked(fn func(*sendQueue))
}

// frameHandler is what the role does with the frames that reach it.
type frameHandler interface {
	onHeaders(f *headerBlock) error
	// onData handles a DATA frame; it starts with recvDataLocked. f and
	// its payload are valid until it returns.
	onData(f *dataFrame) error
	// onReset handles the peer's RST_STREAM on a stream it tracks (or
	// tracked a moment ago).
	onReset(id uint32, code http2.ErrCode) error
	onGoAway(f *http2.GoAwayFrame)
	// onPingAck is the peer's answer to a PING of ours.
	onPingAck(data [8]byte)
	// settingsApplied follows each SETTINGS frame from the peer, once
	// applied and acknowledged.
	settingsApplied()
}

// errorPolicy is how the role answers misbehaviour.
type errorPolicy interface {
	// glitchLocked charges the connection for a frame that did no useful
	// work (calm.go), returning a connection error past the budget.
	glitchLocked(points int, what string) error
	// strayLocked charges a frame on a closed stream, legal in a race
	// (RFC 9113 §5.1, §6.9): a few per stream opened are free (calm.go).
	strayLocked(what string) error
	// ignoredLocked charges a PRIORITY frame or a frame of an unknown
	// type: a number per stream opened are free (calm.go).
	ignoredLocked(what string) error
	// meterLocked is the connection's calm meter (calm.go).
	meterLocked() *calmMeter
	// streamError resets the stream of se (RFC 9113 §5.4.2); a non-nil
	// result ends the connection.
	streamError(se http2.StreamError) error
	// connError sends GOAWAY with code (§5.4.1) and returns the error
	// the frame loop ends with; detail, if any, says why.
	connError(err error, code http2.ErrCode, detail error) error
}

// readLoop reads frames until the connection fails. Stream errors reset
// the stream and go on; connection errors send GOAWAY and end the loop
// (RFC 9113 §5.4). Reader goroutine only.
//
// On a client connection that can park (park.go) it also returns
// errParkAsked, between two frames; it may then be called again and goes
// on where it stopped.
func (t *transport) readLoop(p h2role) error {
	for {
		var err error
		if fh, payload, ok := t.nextBuffered(); ok && t.takeData(fh, payload) {
			err = p.onData(&t.df)
			t.df = dataFrame{}
			t.cr.discard(frameHeaderLen + len(payload))
		} else if ok && t.takeHeaders(fh) {
			// The decoder copies the fields it keeps, and is given a copy
			// of the block (ownBlock): nothing of it refers to the read
			// buffer once it is decoded.
			f, ferr := t.readHeaderBlock(&t.hf, t.hd.ownBlock(payload))
			t.cr.discard(frameHeaderLen + len(payload))
			if err = ferr; err == nil {
				err = t.dispatch(p, f)
			}
			t.hf = http2.HeadersFrame{}
		} else if ok && plainControl(fh, payload) {
			// PING and WINDOW_UPDATE, about one of each per gRPC call
			// (BDP pings, window returns): handled from the buffer, not
			// parsed by the Framer into a frame it allocates.
			t.tookBuffered()
			if fh.Type == http2.FramePing {
				data := [8]byte(payload)
				t.cr.discard(frameHeaderLen + len(payload))
				err = t.onPing(p, fh.Flags.Has(http2.FlagPingAck), data)
			} else {
				inc := binary.BigEndian.Uint32(payload) & (1<<31 - 1)
				t.cr.discard(frameHeaderLen + len(payload))
				err = t.onWindowUpdate(p, fh.StreamID, inc)
			}
		} else if f, ferr := t.readFrame(); ferr == nil {
			if _, ok := f.(*http2.SettingsFrame); !t.sawFrame && !ok {
				// §3.4: each side's preface ends with a SETTINGS frame,
				// which must be the first frame it sends.
				err = connErr(http2.ErrCodeProtocol, "first frame is not SETTINGS")
			} else {
				t.sawFrame = true
				err = t.dispatch(p, f)
			}
		} else if err = ferr; errors.Is(err, http2.ErrFrameTooLarge) {
			err = http2.ConnectionError(http2.ErrCodeFrameSize) // §4.2
		}
		if err == nil && t.ctrlOverflow.Load() {
			err = http2.ConnectionError(http2.ErrCodeEnhanceYourCalm)
		}
		if err == nil {
			continue
		}
		var se http2.StreamError
		if errors.As(err, &se) {
			if err = p.streamError(se); err == nil {
				continue
			}
		}
		var ce http2.ConnectionError
		if errors.As(err, &ce) {
			detail := t.rfr.ErrorDetail()
			if err != error(ce) {
				detail = err // ours, with its reason
			}
			return p.connError(err, http2.ErrCode(ce), detail)
		}
		return err
	}
}

// awaitGoAway runs after readLoop returned: after a connection error it
// lets the writer flush the GOAWAY, but does not wait more than a second
// on a peer that does not read. writerDone is closed when writeLoop
// returned. Reader goroutine only.
func (t *transport) awaitGoAway(writerDone <-chan struct{}) {
	t.mu.Lock()
	fatal := t.fatal
	t.mu.Unlock()
	if !fatal {
		return
	}
	tm := time.NewTimer(time.Second)
	defer tm.Stop()
	select {
	case <-writerDone:
	case <-tm.C:
	}
}

// connReason is a connection error with our reason for it, which goes
// into the GOAWAY's debug data.
type connReason struct {
	code   http2.ErrCode
	reason string
}

func (e connReason) Error() string { return "proxy: " + e.reason }
func (e connReason) Unwrap() error { return http2.ConnectionError(e.code) }

func connErr(code http2.ErrCode, reason string) error { return connReason{code, reason} }

// dispatch handles one frame: connection-level frames here, stream frames
// through the role.
func (t *transport) dispatch(p h2role, f http2.Frame) error {
	switch f := f.(type) {
	case *headerBlock:
		if f.HasPriority() && f.Priority.StreamDep == f.StreamID {
			return selfDependency(f.StreamID)
		}
		err := p.onHeaders(f)
		t.hd.blockDone()
		return err
	case *http2.PriorityFrame:
		// Priorities are advisory and we follow none (§5.3.2), but one
		// rule is not: a stream cannot depend on itself.
		if f.StreamDep == f.StreamID {
			return selfDependency(f.StreamID)
		}
		return t.ignoredFrame(p, "PRIORITY")
	case *http2.UnknownFrame:
		return t.ignoredFrame(p, "frames of unknown types")
	case *http2.DataFrame:
		t.df = dataFrame{StreamID: f.StreamID, Length: f.Length, end: f.StreamEnded(), data: f.Data()}
		err := p.onData(&t.df)
		t.df = dataFrame{}
		return err
	case *http2.RSTStreamFrame:
		t.mu.Lock()
		st, _ := p.streamLocked(f.StreamID)
		if st == nil {
			err := t.unknownStreamLocked(p, f.StreamID, evRecvReset, "RST_STREAM on a closed stream", strayCost)
			t.mu.Unlock()
			return err
		}
		t.mu.Unlock()
		return p.onReset(f.StreamID, f.ErrCode)
	case *http2.SettingsFrame:
		if f.IsAck() {
			t.mu.Lock()
			defer t.mu.Unlock()
			return t.ackLocked(p, &t.settingsOut, "SETTINGS ACK for no SETTINGS")
		}
		if err := checkSettings(f); err != nil {
			return err
		}
		if _, fromServer := p.(*backendConn); fromServer {
			// §6.5.2: a server never sends ENABLE_PUSH=1; a client
			// treats it as a connection error PROTOCOL_ERROR.
			if v, ok := f.Value(http2.SettingEnablePush); ok && v != 0 {
				return connErr(http2.ErrCodeProtocol, "SETTINGS_ENABLE_PUSH=1 from a server")
			}
		}
		t.mu.Lock()
		err := p.glitchLocked(1, "SETTINGS") // a peer sends a handful per connection
		t.mu.Unlock()
		if err != nil {
			return err
		}
		if err := t.handleSettings(f, p.eachQueueLocked); err != nil {
			return err
		}
		p.settingsApplied()
	case *http2.WindowUpdateFrame:
		return t.onWindowUpdate(p, f.StreamID, f.Increment)
	case *http2.PingFrame:
		return t.onPing(p, f.IsAck(), f.Data)
	case *http2.GoAwayFrame:
		// A graceful shutdown takes two GOAWAYs (§6.8); each after the
		// first does no work but walk the streams, and a peer repeating
		// them did so without end.
		t.mu.Lock()
		again := t.goAways > 0
		t.goAways++
		var err error
		if again {
			err = p.glitchLocked(1, "GOAWAY again")
		}
		t.mu.Unlock()
		if err != nil {
			return err
		}
		p.onGoAway(f)
	case *http2.PushPromiseFrame:
		// §8.4: a client cannot push, and we sent ENABLE_PUSH=0 to
		// backends.
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	return nil
}

// ignoredFrame charges p for a frame we ignore (see calm.go's
// ignoredLocked).
func (t *transport) ignoredFrame(p h2role, what string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return p.ignoredLocked(what)
}

// plainControl reports whether the buffered frame fh, payload is a PING
// or WINDOW_UPDATE the frame loop may handle from the read buffer: one
// the Framer would parse without an error (RFC 9113 §6.7: 8 bytes on
// stream 0; §6.9: 4 bytes, an increment other than 0). Any other is left
// to the Framer, which reports it.
func plainControl(fh http2.FrameHeader, payload []byte) bool {
	switch fh.Type {
	case http2.FramePing:
		return fh.StreamID == 0 && len(payload) == 8
	case http2.FrameWindowUpdate:
		return len(payload) == 4 && binary.BigEndian.Uint32(payload)&(1<<31-1) != 0
	}
	return false
}

// onWindowUpdate handles a WINDOW_UPDATE of stream id (0: the
// connection) by inc, not 0.
func (t *transport) onWindowUpdate(p h2role, id, inc uint32) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	var q *sendQueue
	if id != 0 {
		st, sq := p.streamLocked(id)
		if st == nil {
			// §6.9: on an idle stream a connection error; on a
			// closed one legal in a race, useless in a flood.
			return t.unknownStreamLocked(p, id, evRecvWindowUpdate, "WINDOW_UPDATE on a closed stream", strayCost)
		}
		q = sq
	}
	if t.windowUpdateOverLocked(p.meterLocked()) {
		if err := p.glitchLocked(1, "WINDOW_UPDATE beyond the frames we sent"); err != nil {
			return err
		}
	}
	return t.handleWindowUpdateLocked(q, id, inc)
}

// onPing handles a PING, an answer (ack) or one to answer.
func (t *transport) onPing(p h2role, ack bool, data [8]byte) error {
	if ack {
		t.mu.Lock()
		err := t.ackLocked(p, &t.pingsOut, "PING ACK for no PING")
		t.mu.Unlock()
		if err != nil {
			return err
		}
		p.onPingAck(data)
		return nil
	}
	t.mu.Lock()
	// As grpc-go's server counts ping strikes: a PING after we sent
	// HEADERS or DATA is a peer measuring the link (BDP estimation,
	// keepalive under load); PINGs with nothing sent in between are a
	// flood.
	if !t.dataSent.Swap(false) {
		if err := p.glitchLocked(1, "PING"); err != nil {
			t.mu.Unlock()
			return err
		}
	}
	t.queueCtrlLocked(writeOp{kind: opPing, end: true, ping: data})
	t.mu.Unlock()
	t.signalPingAck()
	return nil
}

// handleSettings applies a peer's SETTINGS frame (RFC 9113 §6.5.2) and
// queues the acknowledgement. eachQueue, if non-nil, is called with mu held
// for every stream whose send window must change by delta (§6.9.2).
func (t *transport) handleSettings(f *http2.SettingsFrame, eachQueue func(func(*sendQueue))) error {
	if f.IsAck() {
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	err := f.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			return err
		}
		switch s.ID {
		case http2.SettingInitialWindowSize:
			delta := int32(s.Val) - t.peerInitWin
			t.peerInitWin = int32(s.Val)
			var overflow bool
			if eachQueue != nil && delta != 0 {
				eachQueue(func(q *sendQueue) {
					if delta > 0 && q.window > maxWindow-delta {
						overflow = true // RFC 9113 §6.9.2
						return
					}
					q.window += delta
					t.markReadyLocked(q)
				})
			}
			if overflow {
				return http2.ConnectionError(http2.ErrCodeFlowControl)
			}
		case http2.SettingMaxFrameSize:
			t.peerMaxFrame = s.Val
		case http2.SettingMaxConcurrentStreams:
			t.peerMaxStream = s.Val
		case http2.SettingMaxHeaderListSize:
			t.peerMaxHeaders = s.Val
		case http2.SettingHeaderTableSize:
			t.queueCtrlLocked(writeOp{kind: opTableSize, val: s.Val})
		}
		return nil
	})
	if err != nil {
		return err
	}
	t.gotSettings = true
	t.queueCtrlLocked(writeOp{kind: opSettingsAck})
	t.signal()
	return nil
}

// handleWindowUpdateLocked applies a WINDOW_UPDATE (RFC 9113 §6.9.1). q is
// the stream's send queue (nil for stream 0 or an unknown stream). Caller
// must hold mu.
func (t *transport) handleWindowUpdateLocked(q *sendQueue, id, increment uint32) error {
	inc := int32(increment)
	if id == 0 {
		if t.sendWindow > maxWindow-inc {
			return http2.ConnectionError(http2.ErrCodeFlowControl)
		}
		t.sendWindow += inc
		t.signalReadyLocked()
		return nil
	}
	if q == nil {
		return nil
	}
	if q.window > maxWindow-inc {
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeFlowControl}
	}
	q.window += inc
	t.markReadyLocked(q)
	t.signalReadyLocked()
	return nil
}

// signalReadyLocked wakes the writer after a window grew, if a stream is
// ready to send: one may have waited for that window. Most WINDOW_UPDATEs
// (a client returning a response's bytes, a backend a request's) come
// when nothing waits, and a wake-up for them started a writer goroutine
// that found nothing to write: about a third of a goroutine per unary
// call at 2,000 calls/s (issue 12). Caller must hold mu.
func (t *transport) signalReadyLocked() {
	if t.readyHead < len(t.ready) {
		t.signal()
	}
}

// selfDependency is RFC 9113 §5.3.1's answer to a stream that depends on
// itself: "a stream error of type PROTOCOL_ERROR", as x/net's server does.
func selfDependency(id uint32) error {
	return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol, Cause: errors.New("stream depends on itself")}
}

// unknownStreamLocked answers a frame (event ev) on stream id, which the
// connection does not track, as RFC 9113 §5.1 says for the state it is
// in: idle, a connection error PROTOCOL_ERROR; closed, STREAM_CLOSED for
// DATA and HEADERS; reset by us or closed otherwise, ignored, and counted
// as a glitch unless it is within what the peer may have had in flight
// on a stream we reset (cost, spent of resetAllowance; a negative cost is
// never within it). Caller must hold mu.
func (t *transport) unknownStreamLocked(p h2role, id uint32, ev h2event, what string, cost int64) error {
	st := p.forgottenLocked(id)
	if st == stClosed && t.resets.has(id) {
		st = stResetSent
	}
	if _, res := transition(st, ev); res != resIgnore {
		return resultErr(id, res)
	}
	if st == stResetSent && t.resets.spend(id, cost, t.resetAllowance()) {
		return nil // in flight when we reset it (§5.1)
	}
	return p.strayLocked(what)
}

// resultErr is the error RFC 9113 §5.1 makes of a transition's result on
// stream id; nil for resOK and resIgnore.
func resultErr(id uint32, res h2result) error {
	switch res {
	case resStreamClosed:
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeStreamClosed}
	case resProtocol:
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	return nil
}

// recvDataLocked is what every DATA frame goes through before its role
// sees its payload: flow control (RFC 9113 §6.9.1: the connection's window,
// then the stream's), the stream's state (§6.1), and the crediting of
// padding, which is never relayed. st and r are the stream's state and
// receive window, nil when the connection does not track it. It reports
// whether the role goes on with the payload; when not, err is what to
// answer, if anything, and the caller must wake the writer (the connection
// window was credited). Caller must hold mu.
func (t *transport) recvDataLocked(p h2role, f *dataFrame, st *h2state, r *recvState) (ok bool, err error) {
	n := int32(f.Length)
	connOK, streamOK := t.consumeLocked(r, n)
	switch {
	case !connOK:
		return false, http2.ConnectionError(http2.ErrCodeFlowControl)
	case st == nil:
		return false, t.unknownStreamLocked(p, f.StreamID, evRecvData, "DATA on a closed stream", int64(f.Length))
	case !streamOK:
		return false, http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeFlowControl}
	}
	if _, res := transition(*st, evRecvData); res != resOK {
		return false, resultErr(f.StreamID, res)
	}
	t.creditLocked(r, n-int32(len(f.Data())))
	return true, nil
}

// dataFrame is a DATA frame as the roles see it (onData): read by the
// Framer, or taken from the read buffer by takeData.
type dataFrame struct {
	StreamID uint32
	// Length is the frame's payload length, padding included: what flow
	// control counts (RFC 9113 §6.9.1).
	Length uint32
	end    bool
	data   []byte // the payload without padding
	// inBuf is set when data is a slice of the read buffer on a
	// connection that makes views (transport.views, readref.go).
	inBuf bool
}

// Data returns the payload, padding removed.
func (f *dataFrame) Data() []byte { return f.data }

// StreamEnded reports whether the frame has END_STREAM.
func (f *dataFrame) StreamEnded() bool { return f.end }

// bufferedFrame is the frame loop's fast path: when the read buffer holds
// the whole next frame, it returns the frame's header and its payload, a
// slice of the read buffer, which the caller discards from the buffer once
// the frame is handled. takeData and takeHeaders then decide whether the
// frame is one to take from there: DATA, whose payload the Framer would
// first copy into a buffer of its own (one more copy of every relayed
// byte), and HEADERS holding a whole block, for which the Framer would
// allocate a HeadersFrame and copy the block (three per gRPC call; issue
// 12); and PING and WINDOW_UPDATE (plainControl), which the Framer
// would parse into frames it allocates. ok is false, and so is every
// take, where the Framer has something to say: the first frame, a frame
// over the size limit, a frame inside a header block, the contGuard's
// error; the takes refuse DATA and HEADERS on stream 0 and malformed PING
// and WINDOW_UPDATE frames. The Framer then reads the frame and checks it
// as before. Reader goroutine only.
func (t *transport) bufferedFrame() (fh http2.FrameHeader, payload []byte, ok bool) {
	b := t.cr.buffered()
	if len(b) < frameHeaderLen || !t.sawFrame || t.hd.open || t.cg.err != nil {
		return fh, nil, false
	}
	n := int(b[0])<<16 | int(b[1])<<8 | int(b[2])
	if n > maxFrameSize || len(b) < frameHeaderLen+n {
		return fh, nil, false
	}
	id := binary.BigEndian.Uint32(b[5:]) & (1<<31 - 1)
	fh = http2.FrameHeader{Type: http2.FrameType(b[3]), Flags: http2.Flags(b[4]), Length: uint32(n), StreamID: id}
	return fh, b[frameHeaderLen : frameHeaderLen+n], true
}

// nextBuffered is bufferedFrame, except that on a plain socket it reads
// into the read buffer first when fewer bytes than a frame header are
// buffered (on a client connection: when none are, one read), so that
// the first frame of a fill can be taken from there too, not only those
// after it (a unary call's frames come a fill or two at a time: before,
// about one frame in three went through the Framer, which allocates
// PING, WINDOW_UPDATE and HEADERS frames); and on a
// connection that makes views (readref.go), the rest of a DATA frame of
// vecMin bytes or more whose start is buffered, so that the frame can be
// taken from there whole. Reader goroutine only.
func (t *transport) nextBuffered() (fh http2.FrameHeader, payload []byte, ok bool) {
	if fh, payload, ok = t.bufferedFrame(); ok {
		return fh, payload, ok
	}
	if !t.sawFrame || t.hd.open || t.cg.err != nil {
		return fh, payload, false
	}
	b := t.cr.buffered()
	if len(b) < frameHeaderLen {
		// At a frame's start with too little buffered: the next fill
		// goes into the buffer here, where its frames can be taken
		// from, not through the Framer, which copies what it reads.
		want := frameHeaderLen
		if !t.views {
			// On a client connection one fill of an empty buffer, no
			// more: fillTo waiting for the rest of a header would hold
			// the pooled buffer (fillRaw lets go of it only when
			// empty), 64 KiB for a client's few bytes. The Framer takes
			// a part of a header and waits with no buffer held.
			if len(b) > 0 {
				return fh, payload, false
			}
			want = 1
		}
		if !t.cr.fillTo(want) {
			return fh, payload, false
		}
		if fh, payload, ok = t.bufferedFrame(); ok {
			return fh, payload, ok
		}
		b = t.cr.buffered()
	}
	if !t.views || http2.FrameType(b[3]) != http2.FrameData { // views: b holds a header
		return fh, payload, false
	}
	if n := int(b[0])<<16 | int(b[1])<<8 | int(b[2]); n < vecMin || n > maxFrameSize || !t.cr.fillTo(frameHeaderLen+n) {
		return fh, payload, false
	}
	return t.bufferedFrame()
}

// takeData takes the buffered frame fh, payload if it is DATA with valid
// padding: t.df becomes the frame, its data a slice of the read buffer.
func (t *transport) takeData(fh http2.FrameHeader, payload []byte) bool {
	if fh.Type != http2.FrameData || fh.StreamID == 0 {
		return false // on stream 0 a connection error (§6.1), the Framer's to report
	}
	data := payload
	if fh.Flags.Has(http2.FlagDataPadded) {
		// §6.1: Pad Length, then data, then that much padding; padding
		// at least as long as the payload is a connection error.
		n := len(payload)
		if n == 0 || int(payload[0]) > n-1 {
			return false
		}
		data = payload[1 : n-int(payload[0])]
	}
	t.df = dataFrame{StreamID: fh.StreamID, Length: fh.Length, end: fh.Flags.Has(http2.FlagDataEndStream), data: data, inBuf: t.views}
	t.tookBuffered()
	return true
}

// takeHeaders takes the buffered frame fh if it is HEADERS holding a whole
// block (END_HEADERS), neither padded nor with a priority: t.hf becomes
// the frame, whose payload is the block for readHeaderBlock. As the
// Framer's checkFrameOrder, only an unfinished block expects CONTINUATION,
// so taking a finished one here leaves the Framer's state right.
//
// A block over ownBlockMax is left to the Framer: the decoder keeps a
// slice of its last input, and the Framer's buffer, which it then points
// into, is the connection's anyway (see ownBlock).
func (t *transport) takeHeaders(fh http2.FrameHeader) bool {
	const plain = http2.FlagHeadersEndStream | http2.FlagHeadersEndHeaders
	if fh.Type != http2.FrameHeaders || fh.StreamID == 0 || fh.Flags&^plain != 0 || !fh.Flags.Has(http2.FlagHeadersEndHeaders) || fh.Length > ownBlockMax {
		return false
	}
	t.hf = http2.HeadersFrame{FrameHeader: fh}
	t.tookBuffered()
	return true
}

// tookBuffered notes what the contGuard would have seen go by for a frame
// taken from the buffer: one more frame (park.go), and not an empty
// CONTINUATION.
func (t *transport) tookBuffered() {
	t.cg.frames++
	t.cg.empty = 0
}

// frameHeaderLen is the size of an HTTP/2 frame header (RFC 9113 §4.1).
const frameHeaderLen = 9
