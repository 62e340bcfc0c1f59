package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/metadata"
)

// serverConn is one client connection: the proxy is the HTTP/2 server. It
// has a reader, readLoop (serve's own goroutine), and a writer that runs
// on demand, only while there is something to write (transport.signal).
type serverConn struct {
	transport
	srv    *Server
	bufs   bufBudget       // Config.MaxConnBufferedBytes; see budget.go
	remote net.Addr        // the client's address
	ctx    context.Context // passed to Picker.Pick; cancelled when the connection ends
	cancel context.CancelFunc

	// mu (in transport) guards the fields below.
	streams   map[uint32]*stream // open client streams by client stream id
	lastID    uint32             // highest client stream id seen
	goingAway bool               // final GOAWAY sent: no new streams
	// recentStreams counts the streams opened since the housekeeper last
	// looked, up to 2: from the second on, the connection carries calls
	// one after another, and its writer parks between them rather than
	// exit (streamsLocked).
	recentStreams uint8
	// drainPhase is where the two-step graceful shutdown stands (RFC 9113
	// §6.8): drainNone, drainPinged (GOAWAY with 2^31-1 and a PING sent;
	// streams still accepted), drainFinal (GOAWAY with the real last id).
	drainPhase   uint8
	goAwaySent   bool      // a GOAWAY was queued; goAwayID is its last-stream-id
	goAwayID     uint32    // never increases (§6.8)
	handshook    bool      // our SETTINGS is queued: other frames may follow
	drainPending bool      // shutdown asked for before handshook
	calm         calmMeter // early resets and glitches (calm.go)
	idleSince    time.Time // when the last stream closed; see idleCheck

	// nextSweep is when the next RequestIdleTimeout sweep is due; zero
	// until the handshake is done, or with the sweeps off. The server's
	// housekeeper runs the sweeps and the idle check (Server.housekeep).
	nextSweep  time.Time
	drainTimer *time.Timer   // ends the PING wait of a graceful shutdown; guarded by mu
	readerDone chan struct{} // closed when the reader stopped reading; ends the linger
	lingering  atomic.Bool   // the writer half-closed the socket and waits in linger
	writerDone chan struct{} // closed when the last writer finished; set by serve
	pk         parkCtl       // the reader's goroutine while idle: park.go
}

const (
	drainNone uint8 = iota
	drainPinged
	drainFinal
)

// drainPing is the payload of the PING sent with the first GOAWAY of a
// graceful shutdown; its ack ends the first step.
var drainPing = [8]byte{'s', 't', 'r', 'm', 'l', 'b', 'g', 'a'}

func newServerConn(srv *Server, nc net.Conn) *serverConn {
	c := &serverConn{srv: srv, remote: nc.RemoteAddr(), readerDone: make(chan struct{})}
	cfg := &srv.cfg
	c.transport.init(cfg.StreamWindow, cfg.ConnWindow, cfg.MaxHeaderListSize, srv.log)
	c.transport.ackDelay = max(cfg.PingAckDelay, 0)
	c.writeTimeout = cfg.WriteTimeout
	c.bufs = bufBudget{limit: cfg.MaxConnBufferedBytes, owner: &c.transport}
	c.budget = &c.bufs
	if cfg.MaxBackendPending > 0 {
		c.onWithhold = func() { go c.shedWaiting() }
	}
	c.attach(nc)
	if rc := parkRawConn(nc); rc != nil {
		c.pk.rc = rc
		c.cg.pk, c.cg.nc = &c.pk, nc
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	return c
}

// serve runs the connection until it ends or its reader parks (park.go),
// and reports whether it parked. When it did not, the writer goroutine it
// starts has exited, and every stream has been failed or finished.
func (c *serverConn) serve() (parked bool) {
	if err := c.handshake(); err != nil {
		c.log.Debug("connection rejected", "remote", c.nc.RemoteAddr().String(), "err", err)
		c.nc.Close()
		c.cancel()
		return false
	}
	// From here on the server's housekeeper checks the connection.
	c.mu.Lock()
	now := time.Now()
	if c.srv.cfg.IdleTimeout > 0 {
		c.idleSince = now
	}
	if d := c.srv.cfg.RequestIdleTimeout; d > 0 {
		c.nextSweep = now.Add(d / 4)
	}
	c.mu.Unlock()
	// The writer runs on demand: a goroutine exists only while there is
	// something to write, or streams are open or opened lately
	// (transport.signal, streamsLocked), so an idle connection holds the
	// reader's goroutine alone. The last one calls writerFinished.
	c.writerDone = make(chan struct{})
	c.starts = &c.srv.writerStarts
	c.startOnDemand(c)
	return c.run()
}

// run is the reader from the handshake, or from a resume, on: it runs the
// frame loop until the connection ends, and then ends it, or until the
// reader parks, and reports whether it parked.
func (c *serverConn) run() (parked bool) {
	for {
		err := c.readLoop(c)
		if err == errParkAsked {
			if c.tryPark() {
				return true
			}
			continue
		}
		if !c.drainAfterError() {
			close(c.readerDone)
			c.awaitGoAway(c.writerDone)
		}
		c.close(err)
		<-c.writerDone
		c.cleanup()
		c.stopDrainTimer()
		c.cancel()
		return false
	}
}

// housekeep runs on the server's housekeeper (Server.housekeepPeriod): a
// parked writer exits, the request-idle sweep runs when it is due, the
// idle check, and an idle reader is asked to park (park.go).
func (c *serverConn) housekeep(now time.Time) {
	c.reapWriter()
	c.mu.Lock()
	c.recentStreams = 0
	sweep := !c.nextSweep.IsZero() && !now.Before(c.nextSweep)
	c.mu.Unlock()
	if sweep {
		c.sweepRequestIdle(now)
	}
	c.idleCheck(now)
	c.askPark(now, c.srv.cfg.ParkAfter)
}

// idleCheck shuts a connection that has had no stream for
// Config.IdleTimeout down gracefully (GOAWAY, then close), as grpc-go's
// MaxConnectionIdle does. The housekeeper's period makes that happen
// within a second (or a quarter of the timeout) after it ran out.
func (c *serverConn) idleCheck(now time.Time) {
	d := c.srv.cfg.IdleTimeout
	c.mu.Lock()
	if d <= 0 || c.idleSince.IsZero() || c.closed || c.goingAway || c.drainPhase != drainNone ||
		len(c.streams) > 0 || now.Sub(c.idleSince) < d {
		c.mu.Unlock()
		return
	}
	c.mu.Unlock()
	c.log.Debug("closing idle client connection", "remote", c.nc.RemoteAddr().String(), "idle", d)
	c.shutdown()
}

// handshake reads the client connection preface (RFC 9113 §3.4) within
// PrefaceTimeout and queues our SETTINGS. Anything else gets a clear
// answer: HTTP/1.x a 505 response, other bytes a GOAWAY(PROTOCOL_ERROR).
func (c *serverConn) handshake() error {
	cfg := &c.srv.cfg
	c.nc.SetReadDeadline(time.Now().Add(cfg.PrefaceTimeout))
	buf := make([]byte, len(http2.ClientPreface))
	got := 0
	for got < len(buf) {
		n, err := c.nc.Read(buf[got:])
		got += n
		// Decide as soon as the bytes tell, without waiting for 24 bytes
		// that a short HTTP/1.x request may never send.
		switch classifyPreface(buf[:got]) {
		case prefaceTLS:
			// The client's TLS stack will report the cleartext answer as
			// "not TLS" (Go: "first record does not look like a TLS
			// handshake", OpenSSL: "wrong version number").
			c.nc.SetWriteDeadline(time.Now().Add(time.Second))
			fmt.Fprint(c.nc, "streamlb: this port speaks cleartext HTTP/2 (h2c), not TLS\n")
			return errors.New("proxy: TLS handshake on a cleartext (h2c) port")
		case prefaceHTTP1:
			writeHTTP1Rejection(c.nc)
			return errors.New("proxy: HTTP/1.x request on an HTTP/2-only port")
		case prefaceGarbage:
			rejectPreface(c.nc)
			return errors.New("proxy: bad connection preface")
		}
		if err != nil {
			return fmt.Errorf("proxy: reading connection preface: %w", err)
		}
	}
	c.nc.SetReadDeadline(time.Time{})
	c.mu.Lock()
	c.queueCtrlLocked(writeOp{kind: opSettings, settings: []http2.Setting{
		{ID: http2.SettingMaxConcurrentStreams, Val: cfg.MaxConcurrentStreams},
		{ID: http2.SettingInitialWindowSize, Val: uint32(cfg.StreamWindow)},
		{ID: http2.SettingMaxFrameSize, Val: maxFrameSize},
		{ID: http2.SettingMaxHeaderListSize, Val: cfg.MaxHeaderListSize},
	}})
	if inc := cfg.ConnWindow - defaultInitialWindowRFC; inc > 0 {
		c.queueCtrlLocked(writeOp{kind: opWindowUpdate, val: uint32(inc)})
		c.recvWindow += inc
	}
	c.handshook = true
	pending := c.drainPending
	c.mu.Unlock()
	if pending {
		c.shutdown()
	}
	return nil
}

// rejectPreface answers an invalid connection preface with a connection
// error PROTOCOL_ERROR (RFC 9113 §3.4): our SETTINGS first, as every server
// preface starts, then GOAWAY, then a clean close: the write side is shut
// (FIN) and what the client sent is read and dropped, up to a bound, so the
// close does not turn into a TCP reset that could destroy the GOAWAY before
// the client reads it.
func rejectPreface(nc net.Conn) {
	nc.SetDeadline(time.Now().Add(time.Second))
	fr := http2.NewFramer(nc, nil)
	if fr.WriteSettings() != nil || fr.WriteGoAway(0, http2.ErrCodeProtocol, []byte("streamlb: bad HTTP/2 connection preface")) != nil {
		return
	}
	if cw, ok := nc.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil {
		io.Copy(io.Discard, io.LimitReader(nc, maxPrefaceDrain))
	}
}

// maxPrefaceDrain bounds what rejectPreface reads from a client whose
// preface was invalid.
const maxPrefaceDrain = 64 << 10

type prefaceKind int

const (
	prefaceSoFarOK   prefaceKind = iota // a prefix of the HTTP/2 preface
	prefaceUndecided                    // a prefix of an HTTP/1.x request line
	prefaceHTTP1
	prefaceTLS // a TLS record: handshake (22) is the first a client sends
	prefaceGarbage
)

// classifyPreface tells what the first bytes of a connection are.
func classifyPreface(b []byte) prefaceKind {
	if len(b) <= len(http2.ClientPreface) && string(b) == http2.ClientPreface[:len(b)] {
		return prefaceSoFarOK
	}
	if b[0] == 0x16 { // RFC 8446 §5.1: ContentType handshake(22)
		return prefaceTLS
	}
	for _, m := range []string{"GET ", "POST ", "PUT ", "HEAD ", "DELETE ", "OPTIONS ", "PATCH ", "CONNECT ", "TRACE "} {
		if bytes.HasPrefix(b, []byte(m)) {
			return prefaceHTTP1
		}
		if len(b) < len(m) && m[:len(b)] == string(b) {
			return prefaceUndecided
		}
	}
	return prefaceGarbage
}

func writeHTTP1Rejection(nc net.Conn) {
	body := "streamlb: this port speaks gRPC over HTTP/2 only (h2c with prior knowledge); HTTP/1.x is not supported\n"
	if _, ok := nc.(interface{ ConnectionState() tls.ConnectionState }); ok { // *tls.Conn, or a wrapper of one
		body = "streamlb: this port speaks gRPC over HTTP/2 only (h2 over TLS); HTTP/1.x is not supported\n"
	}
	nc.SetWriteDeadline(time.Now().Add(time.Second))
	fmt.Fprintf(nc, "HTTP/1.1 505 HTTP Version Not Supported\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(body), body)
}

// streamError answers a stream error, ours or the Framer's, with
// RST_STREAM (RFC 9113 §5.4.2). A stream the client opened with a HEADERS
// frame the Framer rejected (an upper-case field name, a bad pseudo-header)
// leaves the idle state all the same (§5.1.1), so the frames the client
// sends on it next are those of a closed stream, not of an idle one, and
// cost that stream only.
func (c *serverConn) streamError(se http2.StreamError) error {
	c.mu.Lock()
	if id := se.StreamID; id%2 == 1 && id > c.lastID {
		c.lastID = id
	}
	err := c.glitchLocked(1, "stream error")
	c.mu.Unlock()
	if err != nil {
		return err
	}
	return c.resetFromClient(se.StreamID, se.Code, true, se.Cause)
}

func (c *serverConn) goAwayFatal(code http2.ErrCode, detail error) {
	c.mu.Lock()
	var debug []byte
	if detail != nil {
		debug = []byte(detail.Error())
	}
	c.queueGoAwayLocked(c.lastID, code, debug)
	c.fatal = true
	c.goingAway = true
	c.drainAndClose = true
	c.mu.Unlock()
	c.signal()
}

// connError implements errorPolicy: GOAWAY with the last stream id we
// took, then the connection closes once the writer flushed it.
func (c *serverConn) connError(err error, code http2.ErrCode, detail error) error {
	c.log.Debug("client connection error", "remote", c.remote.String(), "err", err)
	c.goAwayFatal(code, detail)
	return fmt.Errorf("proxy: client connection error: %w", err)
}

// streamLocked implements streamTable.
func (c *serverConn) streamLocked(id uint32) (*h2state, *sendQueue) {
	if s := c.streams[id]; s != nil {
		return &s.cst, &s.down
	}
	return nil, nil
}

// forgottenLocked implements streamTable. Clients open odd ids in
// increasing order (RFC 9113 §5.1.1) and we open none. Streams above the
// last id of a GOAWAY we sent were never processed: their frames are
// ignored (§6.8).
func (c *serverConn) forgottenLocked(id uint32) h2state {
	switch {
	case id%2 == 0 || id > c.lastID:
		return stIdle
	case c.goAwaySent && id > c.goAwayID:
		return stResetSent
	}
	return stClosed
}

// onReset implements frameHandler.
func (c *serverConn) onReset(id uint32, code http2.ErrCode) error {
	return c.resetFromClient(id, code, false, nil)
}

// onGoAway implements frameHandler: the client will open no more streams;
// those in flight finish.
func (c *serverConn) onGoAway(*http2.GoAwayFrame) {}

// onPingAck implements frameHandler: the ack of the PING of a graceful
// shutdown ends its first step; that of a drain probe lets response
// windows grow (budget.go).
func (c *serverConn) onPingAck(data [8]byte) {
	c.bufs.onProbeAck(data)
	if data == drainPing {
		c.finishDrain()
	}
}

// settingsApplied implements frameHandler.
func (c *serverConn) settingsApplied() {}

// eachQueueLocked calls fn for the send queue of every open stream. Caller
// must hold mu.
func (c *serverConn) eachQueueLocked(fn func(*sendQueue)) {
	for _, s := range c.streams {
		fn(&s.down)
	}
}

func (c *serverConn) onHeaders(f *headerBlock) error {
	id := f.StreamID
	end := f.StreamEnded()
	c.mu.Lock()
	if s := c.streams[id]; s != nil {
		// The order is x/net's processHeaders: a HEADERS after the
		// client's END_STREAM first (§5.1 half-closed (remote):
		// STREAM_CLOSED), then request trailers, which must end the
		// stream (§8.1: a stream error, as processTrailerHeaders).
		if c.stepLocked(s, evRecvHeaders) != resOK {
			c.mu.Unlock()
			return http2.StreamError{StreamID: id, Code: http2.ErrCodeStreamClosed}
		}
		if !end {
			c.mu.Unlock()
			return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol, Cause: errors.New("request trailers without END_STREAM")}
		}
		if f.Truncated || len(f.Fields) > c.srv.cfg.MaxHeaderFields || len(f.PseudoFields()) > 0 {
			// Trailers cut short would change the request's meaning,
			// and trailers with pseudo-header fields are malformed: the
			// stream ends here (RFC 9113 §8.1).
			c.mu.Unlock()
			return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol}
		}
		if err := checkTrailerFields(f.Fields); err != nil {
			// Malformed as a header section with them would be: the
			// end of a malformed request is not relayed either.
			c.mu.Unlock()
			return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol, Cause: err}
		}
		if s.declLen >= 0 && s.bytesIn != s.declLen {
			err := s.lengthMismatch() // under mu: s may end once it is released
			c.mu.Unlock()
			return err
		}
		if a := s.att; a != nil {
			// gRPC has no request trailers, and a grpc-go server closes
			// the whole connection on a second HEADERS from the client
			// (an "illegal stream id"), taking every other client's
			// calls on it. Only the end of the stream is relayed, as an
			// empty DATA frame with END_STREAM; the fields are dropped.
			a.bc.enqueueUp(a, outItem{kind: itemData, end: true}, nil)
		}
		c.stepLocked(s, evRecvEnd)
		c.mu.Unlock()
		c.signal()
		return nil
	}
	if id%2 == 0 {
		c.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeProtocol) // RFC 9113 §5.1.1
	}
	if id <= c.lastID {
		// Not a stream of ours, and not above the highest the client
		// opened: ids must increase (RFC 9113 §5.1.1), so a connection
		// error PROTOCOL_ERROR, as x/net's processHeaders
		// ("stream_went_down"). Two exceptions, both frames the client
		// had in flight: on a stream we reset (§5.1: ignored after our
		// RST_STREAM, for which x/net only has its resetQueued), and
		// above the last id of our GOAWAY (§6.8: never processed).
		if c.forgottenLocked(id) == stResetSent || c.resets.has(id) {
			err := c.glitchLocked(1, "HEADERS on a reset stream")
			c.mu.Unlock()
			return err
		}
		c.mu.Unlock()
		return connErr(http2.ErrCodeProtocol, fmt.Sprintf("HEADERS on stream %d, at or below the highest opened (%d): stream ids must increase", id, c.lastID))
	}
	c.lastID = id
	if c.goingAway {
		// RFC 9113 §6.8: streams above the GOAWAY's id are ignored. The
		// block was decoded all the same (the HPACK state is the
		// connection's), so the frame is metered as the other frames we
		// ignore: a client racing the GOAWAY with the streams it had in
		// flight stays within the allowance, one that keeps opening
		// streams is cut with ENHANCE_YOUR_CALM rather than having us
		// decode its header blocks for free until the drain ends
		// (TestHeadersAfterGoAwayMetered).
		err := c.ignoredLocked("HEADERS above the GOAWAY's last stream id")
		c.mu.Unlock()
		return err
	}
	if uint32(len(c.streams)) >= c.srv.cfg.MaxConcurrentStreams {
		c.queueCtrlLocked(writeOp{kind: opReset, streamID: id, code: http2.ErrCodeRefusedStream})
		c.resets.add(id)
		err := c.limitGlitchLocked("HEADERS over MAX_CONCURRENT_STREAMS")
		c.mu.Unlock()
		c.signal()
		return err
	}
	over := f.Truncated || len(f.Fields) > c.srv.cfg.MaxHeaderFields
	var ri requestInfo
	var perr error
	if !over {
		ri, perr = parseRequest(f.Fields)
		if perr == nil && end && ri.contentLength > 0 {
			perr = malformedRequest(fmt.Sprintf("content-length %d and no DATA", ri.contentLength))
		}
	}
	now := c.srv.now()
	s := newStream()
	// The reader's reference, while it sets the stream up: once in the
	// table, its client side may end (abortCalls, sweepRequestIdle) as
	// soon as mu is released.
	defer s.unref()
	s.cc, s.start, s.declLen = c, now, -1
	s.down = sendQueue{s: s, id: id, window: c.peerInitWin, mem: &c.bufs}
	s.upRecv = recvState{id: id, window: c.streamWindow}
	s.cst.apply(evRecvHeaders)
	if end {
		s.cst.apply(evRecvEnd)
	}
	s.active = true
	if c.streams == nil {
		c.streams = make(map[uint32]*stream) // made at the first stream: idle connections have none
	}
	c.streams[id] = s
	if c.recentStreams < 2 {
		c.recentStreams++
	}
	c.streamOpenedLocked(now)
	c.mu.Unlock()

	if over {
		// As grpc-go's server answers a header list over its limit:
		// RESOURCE_EXHAUSTED, HTTP 431, the stream alone.
		return c.rejectOverLimit(s, failure{kind: failHeadersTooLarge}, "request headers over the limit")
	}
	s.method = ri.path // named in the call-end report of a refusal too
	var malformed malformedRequest
	switch {
	case errors.As(perr, &malformed):
		return c.rejectMalformed(s, malformed)
	case perr != nil: // a malformed grpc-timeout, as grpc-go's server answers it
		c.rejectStream(s, failure{kind: failBadRequest, cause: perr})
		return nil
	case ri.method != "POST":
		c.rejectStream(s, failure{kind: failBadMethod, detail: ri.method})
		return nil
	case !isGRPCContentType(ri.contentType):
		c.rejectStream(s, failure{kind: failBadContentType, detail: ri.contentType})
		return nil
	case c.srv.hopID != "" && looped(f.Fields, c.srv.hopID):
		c.rejectStream(s, failure{kind: failLoop, method: ri.path})
		return nil
	}
	if c.bufs.over() || !c.bufs.windowRoom(c.srv.cfg.BackendStreamWindow) {
		// The connection holds its whole budget already, or its streams'
		// backend windows would let it: new calls wait for the ones in
		// flight (budget.go).
		return c.rejectOverLimit(s, failure{kind: failConnBudget, limit: c.bufs.limit}, "a stream over the connection's buffer budget")
	}
	room := s.reqRoom[:]
	fields := f.Fields
	if ri.dropFields {
		fields = filterFields(fields)
	}
	if ri.contentTypes > 1 {
		fields = oneContentType(fields, ri.contentType)
	}
	if c.srv.hopID != "" && loopMark(fields) {
		s.reqFields = keepFields(&room, fields, hpack.HeaderField{Name: loopHeader, Value: c.srv.hopID})
	} else {
		s.reqFields = keepFields(&room, fields)
	}
	s.declLen = ri.contentLength
	s.reqSize = headerListSize(s.reqFields)
	c.bufs.add(int(s.reqSize))
	s.reqEnd = end

	if !c.srv.admit(s) {
		c.rejectStream(s, failure{kind: failTooManyCalls, limit: c.srv.cfg.MaxStreams})
		return nil
	}
	c.mu.Lock()
	if ri.hasTimeout {
		// Before the first attempt: its wait for a backend's handshake is
		// bounded by the time the deadline leaves (handshakeWait).
		s.deadline = time.Now().Add(ri.timeout)
		s.clientDeadline, s.clientTimeout = s.deadline, ri.timeout
	}
	fail, ok := c.startAttemptLocked(s, nil)
	if ok && !s.deadline.IsZero() && !s.cst.ended() {
		// Under the same hold of mu as the attempt's start: the client side
		// cannot end before mu is released, so the stream's end
		// (sideClosed) finds the timer to stop. An expiry that comes first
		// waits for mu in deadlineExceeded. The deadline is the earlier of
		// grpc-timeout's and the route's (routeTimeoutLocked), if any.
		s.timer = startDeadline(s, time.Until(s.deadline)) // the pick took some of it
	}
	c.mu.Unlock()
	if !ok {
		c.rejectStream(s, fail)
	}
	return nil
}

// deadlineSlack is how close to a call's deadline a backend's CANCEL is
// taken for the deadline passing.
const deadlineSlack = 20 * time.Millisecond

// pickContext is the context handed to the Picker: the connection's, plus
// the configured request headers as incoming metadata.
func (c *serverConn) pickContext(fields []hpack.HeaderField) context.Context {
	keys := c.srv.cfg.PickMetadata
	if len(keys) == 0 {
		return c.ctx
	}
	md := metadata.MD{}
	for _, f := range fields {
		for _, k := range keys {
			if f.Name == k {
				md[k] = append(md[k], f.Value)
			}
		}
	}
	return metadata.NewIncomingContext(c.ctx, md)
}

// rejectStream answers a stream the proxy will not forward with a complete
// response carrying the status of f, and resets it (NO_ERROR) if the client
// is still sending, as grpc-go's server does. The stream never had a
// backend side.
func (c *serverConn) rejectStream(s *stream, f failure) {
	s.noBackendSide() // no attempt; the caller holds a reference
	c.mu.Lock()
	c.failLocked(s, f)
	c.mu.Unlock()
	c.signal()
}

// rejectMalformed ends s, whose request is malformed (RFC 9113 §8.1.1),
// with RST_STREAM(PROTOCOL_ERROR) instead of an answer: the stream error
// x/net's and grpc-go's servers make of it, handled as any other
// (streamError: a glitch point, the reset, a call-end report that says
// why). The stream never had a backend side.
func (c *serverConn) rejectMalformed(s *stream, why malformedRequest) error {
	id := s.down.id
	s.noBackendSide() // no attempt; the caller holds a reference
	return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol, Cause: why}
}

// lengthMismatch is the stream error of a request whose DATA does not add
// up to the content-length it declared (RFC 9113 §8.1.1): malformed, as
// x/net's server finds it; the backend's stream is reset with the
// client's.
func (s *stream) lengthMismatch() error {
	return http2.StreamError{StreamID: s.down.id, Code: http2.ErrCodeProtocol, Cause: malformedRequest(fmt.Sprintf("content-length %d, DATA of %d bytes", s.declLen, s.bytesIn))}
}

// rejectOverLimit is rejectStream for a stream refused because its
// connection reached one of its own limits, which also costs the
// connection a glitch (limitGlitchLocked, what names it); it returns the
// connection error once the glitch budget is spent.
func (c *serverConn) rejectOverLimit(s *stream, f failure, what string) error {
	c.rejectStream(s, f)
	c.mu.Lock()
	err := c.limitGlitchLocked(what)
	c.mu.Unlock()
	return err
}

// finishDownLocked ends the response with the given header blocks, the
// last of which ends the stream, discarding what was queued, and resets
// the stream if the client has not finished sending. Only for a response
// none of whose payload was written: a failure of the proxy's after that
// goes through endStatusLocked (midstream.go). Caller must hold mu.
func (c *serverConn) finishDownLocked(s *stream, blocks ...[]hpack.HeaderField) {
	s.down.drop(&c.transport)
	c.endDownLocked(s, blocks...)
}

// endDownLocked ends the response with the given header blocks, after
// what is queued, and resets the stream if the client has not finished
// sending. Caller must hold mu.
func (c *serverConn) endDownLocked(s *stream, blocks ...[]hpack.HeaderField) {
	for i, fields := range blocks {
		s.down.push(outItem{kind: itemHeaders, end: i == len(blocks)-1, fields: fields})
	}
	if !s.cst.recvEnded() {
		queueResetLocked(s, http2.ErrCodeNo)
	}
	s.down.closed = true
	c.markReadyLocked(&s.down)
}

// queueResetLocked queues RST_STREAM(code) behind what s's response has
// queued; sentLastLocked sends it after the last frame if the queue's
// entry went with that frame. Caller must hold s.cc.mu.
func queueResetLocked(s *stream, code http2.ErrCode) {
	s.rstQueued = true
	s.rstCode = code
	s.down.push(outItem{kind: itemReset, code: code})
}

// failDown ends a call with the status of f (see failLocked). Nothing
// happens if the response already ended or a is no longer the stream's
// attempt. The caller owns a reference to a.s.
func (c *serverConn) failDown(a *attempt, f failure) {
	s := a.s
	if streamDebug {
		s.live("failDown")
	}
	c.mu.Lock()
	if s.att != a || s.down.closed || s.cst.ended() {
		c.mu.Unlock()
		return
	}
	c.failLocked(s, f)
	c.mu.Unlock()
	c.signal()
}

// deadlineExceeded runs on the stream's timer when its deadline (the
// client's grpc-timeout, or its route's timeout) passes before the call
// ends: the client gets DEADLINE_EXCEEDED and the backend stream is
// cancelled. The timer owns a reference to s until this returns.
func (c *serverConn) deadlineExceeded(s *stream) {
	if streamDebug {
		s.live("deadlineExceeded")
	}
	// One critical section, so a retry switching attempts meanwhile cannot
	// make the deadline miss: whatever attempt is current now is cut.
	c.mu.Lock()
	a := s.att
	switch {
	case s.cst.ended():
	case !s.down.closed:
		f := s.deadlineFailure()
		f.unanswered = a != nil && s.unansweredLocked() && a.bc.silent(a)
		c.failLocked(s, f)
	case !s.routeDeadline() && !s.down.empty():
		// The answer ended in time, but the client has not taken all
		// of it by its own grpc-timeout: it grants no window. A client
		// keeping to its deadline has given up (its deadline comes
		// before the proxy's), so what is queued goes and the call
		// ends DEADLINE_EXCEEDED (a reset if part of a message went).
		// Otherwise the stream, the bytes it holds and the connection
		// were kept for as long as the client kept the connection:
		// neither --write-timeout (the socket takes writes) nor
		// --idle-timeout (a stream is open) ends that. A route's
		// timeout bounds the backend's answer only, as Envoy's does.
		c.endStatusLocked(s, s.deadlineFailure())
	}
	c.mu.Unlock()
	c.signal()
	if a != nil {
		a.bc.resetUp(a, http2.ErrCodeCancel)
	}
}

// abortCalls ends every call in flight on c with UNAVAILABLE ("server is
// shutting down"), cancels their backend streams, and closes c once what
// it queued is written: Server.Shutdown's drain ran out. Safe from any
// goroutine; it does not block.
func (c *serverConn) abortCalls() {
	var cut []*attempt
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	for _, s := range c.streams {
		if s.down.closed || s.cst.ended() {
			continue
		}
		if a := s.att; a != nil {
			s.ref() // cut's, until resetUp: failLocked may end s
			cut = append(cut, a)
		}
		c.failLocked(s, failure{kind: failShuttingDown, method: s.method})
	}
	if !c.goingAway && c.handshook {
		c.goingAway = true
		c.queueGoAwayLocked(c.lastID, http2.ErrCodeNo, nil)
	}
	c.drainAndClose = true
	c.mu.Unlock()
	c.signal()
	resetCut(cut)
}

// resetCut cancels the backend streams of attempts cut, as resetUp, and
// lets go of the reference to each one's stream that the list owned.
func resetCut(cut []*attempt) {
	for _, a := range cut {
		s := a.s
		a.bc.resetUp(a, http2.ErrCodeCancel)
		s.unref() // cut's
	}
}

// sweepRequestIdle runs on the server's housekeeper, every quarter of
// Config.RequestIdleTimeout: a stream whose request is not complete, that
// holds no request bytes its backend has yet to take (or has answers
// queued that the client does not take), and on
// which no frame moved either way for four sweeps in a row ends with
// DEADLINE_EXCEEDED, and its backend stream is cancelled. So does a
// stream whose request is complete while answers queued for it wait for a
// client that takes none of them (it grants no window): a stuck consumer
// of a server stream held the stream, the answer's bytes and the
// backend's handler and slot for as long as it kept its connection, as
// one of a bidi stream did only until this bound. One sweep per
// connection, not a timer per stream, keeps the cost off the per-frame
// path: a frame only sets a flag, and answer bytes the client took
// (bytesOut) count as a frame moving.
func (c *serverConn) sweepRequestIdle(now time.Time) {
	d := c.srv.cfg.RequestIdleTimeout
	var cut []*attempt
	failed := false
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	for _, s := range c.streams {
		if (s.cst.recvEnded() || s.down.closed) && s.down.empty() {
			continue // the backend's to answer, within the grpc-timeout
		}
		if s.bytesOut != s.sweptOut {
			s.sweptOut = s.bytesOut // the client took answer bytes
			s.active = true
		}
		if s.active || s.upRecv.held > 0 && s.down.empty() {
			// Active, or waiting on its backend: the proxy holds request
			// bytes the backend has not taken (it stopped reading, or
			// the call waits for a slot), and returns the client's
			// window only as it takes them. The client may have more to
			// send and no window to send it with: not idle. Unless
			// answers wait for the client to read them: a backend
			// that stopped reading because its answers do not go (an
			// echo to a client that never reads) waits on the client.
			s.active = false
			s.idleSweeps = 0
			continue
		}
		if s.idleSweeps++; s.idleSweeps < 4 {
			continue
		}
		if a := s.att; a != nil {
			s.ref() // cut's, until resetUp: failLocked may end s
			cut = append(cut, a)
		}
		c.failLocked(s, failure{kind: failRequestIdle, limit: d.Milliseconds()})
		failed = true
	}
	c.nextSweep = now.Add(d / 4)
	c.mu.Unlock()
	if len(cut) > 0 {
		c.log.Debug("request idle: streams ended", "remote", c.remote.String(), "streams", len(cut), "duration", d)
	}
	if failed {
		c.signal() // the failed streams' trailers or resets
	}
	resetCut(cut)
}

func (c *serverConn) onData(f *dataFrame) error {
	data := f.Data()
	end := f.StreamEnded()
	c.mu.Lock()
	queued := len(c.ctrl)
	s := c.streams[f.StreamID]
	var st *h2state
	var r *recvState
	if s != nil {
		st, r = &s.cst, &s.upRecv
	}
	if ok, err := c.recvDataLocked(c, f, st, r); !ok {
		c.mu.Unlock()
		c.signal() // the connection window was credited
		return err
	}
	s.bytesIn += int64(len(data))
	s.active = true
	if s.declLen >= 0 && (s.bytesIn > s.declLen || (end && s.bytesIn != s.declLen)) {
		err := s.lengthMismatch() // under mu: s may end once it is released
		c.mu.Unlock()
		c.signal() // the connection window was credited
		return err
	}
	if len(data) == 0 && !end {
		// Says nothing, and would cost a queue entry per frame toward
		// the backend: not relayed, and a glitch. Its padding was
		// credited: a WINDOW_UPDATE for it may be queued.
		err := c.glitchLocked(1, "empty DATA frame")
		wake := len(c.ctrl) != queued
		c.mu.Unlock()
		if wake {
			c.signal()
		}
		return err
	}
	if len(data) > 0 {
		if err := c.dataLocked(len(data), end); err != nil {
			c.mu.Unlock()
			return err
		}
	}
	if a := s.att; a == nil || !a.bc.enqueueUp(a, outItem{kind: itemData, end: end}, data) {
		c.creditLocked(r, int32(len(data)))
	}
	if end {
		c.stepLocked(s, evRecvEnd)
	}
	// Wake the writer only for a WINDOW_UPDATE it must send, a futex
	// wake-up per DATA frame costs more than the frame, or for a draining
	// connection whose last stream may just have ended (idleLocked). The
	// end of a request alone gives it nothing to write: waking it there
	// started a writer goroutine per unary call that found nothing to do.
	wake := len(c.ctrl) != queued || (end && c.goingAway)
	c.mu.Unlock()
	if wake {
		c.signal()
	}
	return nil
}

// resetFromClient handles a RST_STREAM from the client, or a stream error
// we detected (sendRST): the stream ends on both sides. A client's reset
// of a stream whose response has not ended counts towards the rapid-reset
// limit (calm.go); it returns the connection error once past it.
func (c *serverConn) resetFromClient(id uint32, code http2.ErrCode, sendRST bool, cause error) error {
	c.mu.Lock()
	if sendRST {
		c.queueCtrlLocked(writeOp{kind: opReset, streamID: id, code: code})
	}
	s := c.streams[id]
	if s == nil {
		// Gone since the frame loop looked, or, for a stream error, a
		// stream that never made it into the table (a HEADERS frame the
		// Framer rejected): its frames in flight are ignored.
		if sendRST {
			c.resets.add(id)
		}
		c.mu.Unlock()
		c.signal()
		return nil
	}
	var err error
	switch {
	case !s.down.closed:
		s.result = s.resetResult(code, sendRST, cause)
		if !sendRST {
			err = c.earlyResetLocked(s)
		}
	case s.down.statusQueued():
		// The whole answer was queued, but the stream was reset before
		// the client was sent its status (its window closed, and then
		// its deadline passed, say): it never saw the backend's
		// outcome, and the call ends as any call reset unanswered.
		s.fromBackend = false
		s.result = s.resetResult(code, sendRST, cause)
	}
	a := s.att
	if a != nil {
		s.ref() // ours, until resetUp: stepLocked may end s
	}
	if sendRST {
		c.stepLocked(s, evSendReset)
	} else {
		c.stepLocked(s, evRecvReset)
	}
	c.mu.Unlock()
	c.signal()
	if a != nil {
		a.bc.resetUp(a, http2.ErrCodeCancel)
		s.unref()
	}
	return err
}

// resetResult is the outcome of s, reset unanswered with code: by the
// client (sendRST false), or by us for its stream error, which cause says
// (nil if nothing more than the code).
func (s *stream) resetResult(code http2.ErrCode, sendRST bool, cause error) error {
	switch {
	case sendRST:
		// Our reset, for a stream error of the client's: it reports the
		// code we sent, not a reset of its own.
		return sentAs(failure{kind: failClientStream, h2code: code, cause: cause}.statusErr(), code)
	case code == http2.ErrCodeCancel && !s.clientDeadline.IsZero() && time.Until(s.clientDeadline) < deadlineSlack:
		// A gRPC client resets its call with CANCEL when its deadline
		// passes, a moment before our timer (started on the request's
		// arrival) would: the call ended for its deadline, as the client
		// reports it, not for the client giving up. The client's own
		// deadline, also when a route's timeout made the call's earlier:
		// that timer, running late, had not fired yet.
		if s.routeDeadline() && !time.Now().Before(s.deadline) {
			return s.deadlineFailure().statusErr() // the route's passed first
		}
		return failure{kind: failDeadline, method: s.method}.statusErr()
	}
	return failure{kind: failClientReset}.statusErr()
}

// pushDownData queues response DATA (copied) toward the client and counts
// it. Caller must hold the client connection's mu.
func (s *stream) pushDownData(data []byte, end bool) {
	n := len(s.down.items)
	s.down.pushData(data, end)
	if len(s.down.items) > n {
		// A new item: where its first message starts (cutQueuedLocked).
		s.down.items[len(s.down.items)-1].msgAt = s.msgs.nextAt(data)
	}
	s.countDown(data)
}

// pushDownView queues v, a view of a backend connection's read buffer
// (readref.go), as pushDownData queues a copy: it is counted in the
// budget by its bytes and freed by the writer that sends it.
func (s *stream) pushDownView(v *pbuf, end bool) {
	s.down.mem.add(len(v.b))
	s.down.push(outItem{kind: itemData, end: end, buf: v, n: len(v.b), msgAt: s.msgs.nextAt(v.b)})
	s.countDown(v.b)
}

// countDown counts response payload queued toward the client: the gRPC
// messages it completes (the bytes are counted as they are written, in
// popLocked). Caller must hold the client connection's mu.
func (s *stream) countDown(p []byte) {
	s.msgs.advance(p)
}

// endedByDataLocked sets the outcome of s, whose backend ended the
// response with DATA, without trailers: its own answer, relayed, which a
// gRPC client fails (errNoTrailers), or reads from the :status of headers
// that were not gRPC's (nonGRPC). Reported OK, a backend answering every
// call so was a success to the director, the metrics and the access log.
// Caller must hold cc.mu.
func (s *stream) endedByDataLocked() {
	s.result = s.nonGRPC
	if s.result == nil {
		s.result = errNoTrailers
	}
	s.fromBackend = true
}

// noteResponseHeadersLocked records a response header block of the
// backend's, not ending the response, queued toward the client: the first
// final one tells whether the response is gRPC's (nonGRPC). Caller must
// hold cc.mu.
func (s *stream) noteResponseHeadersLocked(fields []hpack.HeaderField) {
	if !s.respHeaders && !interimBlock(fields) {
		s.respHeaders = true
		s.nonGRPC = nonGRPCOutcome(fields)
	}
}

// enqueueDown queues a response item from the backend. It reports false if
// the response was already ended, in which case DATA bytes must be credited
// back by the caller.
func (c *serverConn) enqueueDown(a *attempt, it outItem, data []byte) bool {
	s := a.s
	if streamDebug {
		s.live("enqueueDown")
	}
	c.mu.Lock()
	if s.att != a || s.down.closed {
		c.mu.Unlock()
		return false
	}
	s.active = true
	if it.kind == itemData {
		if it.end {
			s.endedByDataLocked()
		}
		if it.buf != nil {
			s.pushDownView(it.buf, it.end)
		} else {
			s.pushDownData(data, it.end)
		}
	} else {
		if c.responseOverPeerLocked(a, it.fields) || c.responseOverBudgetLocked(a, it.fields) {
			// The block is not sent: let go of its decoded strings,
			// which the attempt's field storage would otherwise keep
			// until the call ends (up to MaxResponseHeaderListSize per
			// refused call). Nothing else refers to them.
			clear(it.fields)
			c.mu.Unlock()
			c.signal()
			a.bc.resetUp(a, http2.ErrCodeCancel)
			return true
		}
		if it.end && !s.cst.ended() && s.routeTimedOut(it.fields) {
			// The backend gave up on the grpc-timeout it was sent, what
			// was left of the route's timeout, a moment before our own
			// timer: the client is owed the route's timeout, as when the
			// backend resets the stream then (backendReset), and as the
			// grpc-proxy engine says it.
			clear(it.fields)
			cancelUp := !s.cst.recvEnded()
			f := s.deadlineFailure()
			f.unanswered = s.unansweredLocked() && !a.gotData // this goroutine writes gotData
			c.failLocked(s, f)
			c.mu.Unlock()
			c.signal()
			if cancelUp {
				a.bc.resetUp(a, http2.ErrCodeCancel)
			}
			return true
		}
		if it.end {
			switch {
			case responseStatus(it.fields) != "":
				// Trailers-only (trailers carry no pseudo-header, onHeaders):
				// a block without a gRPC content-type is read by its
				// :status.
				if s.result = nonGRPCOutcome(it.fields); s.result == nil {
					s.result = outcome(it.fields)
				}
			case s.nonGRPC != nil:
				s.result = s.nonGRPC // grpc-go ignores the trailers of such a response
			default:
				s.result = outcome(it.fields)
			}
			c.noteBackendStatusLocked(s, it.fields)
		} else {
			s.noteResponseHeadersLocked(it.fields)
		}
		s.down.push(it)
	}
	// The backend's complete answer while the client still sends: as for
	// the proxy's own statuses (endDownLocked), the answer is followed by
	// RST_STREAM(NO_ERROR), telling the client to stop (RFC 9113 §8.1),
	// and the backend's stream is cancelled. A grpc-go backend resets
	// its side itself; without this, one that did not left the stream
	// open on both connections for as long as the client kept its request
	// open, out of reach of the idle checks, its backend slot held.
	cancelUp := false
	if it.end && it.kind == itemHeaders && !s.cst.recvEnded() && !s.rstQueued {
		queueResetLocked(s, http2.ErrCodeNo)
		cancelUp = true
	}
	if it.end {
		s.down.closed = true
	}
	c.markReadyLocked(&s.down)
	c.mu.Unlock()
	c.signal()
	if cancelUp {
		a.bc.resetUp(a, http2.ErrCodeCancel)
	}
	return true
}

// backendReset relays a RST_STREAM from the backend. A NO_ERROR reset after
// a complete response (a server ending the request early, RFC 9113 §8.1)
// follows the response; any other aborts it.
func (c *serverConn) backendReset(a *attempt, code http2.ErrCode) {
	s := a.s
	if streamDebug {
		s.live("backendReset")
	}
	c.mu.Lock()
	defer c.signal()
	defer c.mu.Unlock()
	if s.cst.ended() || s.att != a {
		return
	}
	if s.down.closed {
		// The response is complete (or being completed); a reset while the
		// client still sends tells it to stop (RFC 9113 §8.1), legal also
		// in half-closed (local). Queued after the response, and once, as
		// NO_ERROR whatever the backend's code: the response stands, and a
		// client may take another code for the call failing. grpc-go's
		// server sends CANCEL when its deadline timer fires just after the
		// handler's status went out, which made Go's HTTP/2 client fail a
		// call it had the whole answer to (TestDeadlineTimersRacing, rarely).
		if !s.cst.recvEnded() && !s.rstQueued {
			queueResetLocked(s, http2.ErrCodeNo)
			c.markReadyLocked(&s.down)
		}
		return
	}
	if code == http2.ErrCodeCancel && !s.deadline.IsZero() && time.Until(s.deadline) < deadlineSlack {
		// The backend enforces the same grpc-timeout (or the route's
		// remaining time, attemptFields) and cancelled the stream as it
		// ran out, a moment before our own timer: the client is owed
		// DEADLINE_EXCEEDED, not a bare reset.
		f := s.deadlineFailure()
		f.unanswered = s.unansweredLocked() && !a.gotData // this goroutine writes gotData
		c.failLocked(s, f)
		return
	}
	s.result = failure{kind: failBackendReset, backend: a.bc.addr, h2code: code}.statusErr()
	if code == http2.ErrCodeRefusedStream {
		// REFUSED_STREAM says the backend did not process the stream
		// (RFC 9113 §8.7), and grpc-go retries such a stream
		// transparently, but this one started its answer (the proxy
		// retries a refused stream itself while the client has seen
		// nothing of it: resetFromBackend). Relayed, it made the client
		// run the call again (attack round 4); the backend broke the
		// protocol, so the client gets INTERNAL_ERROR (codes.Internal).
		code = http2.ErrCodeInternal
		s.result = sentAs(s.result, code)
	}
	// Other codes are relayed as they are, so the client sees what a
	// direct call would: grpc-go maps RST_STREAM codes to statuses itself.
	// The reset follows the response bytes already received, which a
	// direct client would have read before it (see
	// resetAfterQueuedLocked).
	c.resetAfterQueuedLocked(s, code)
}

// stepLocked applies ev to s's state on the client connection (RFC 9113
// §5.1) and removes s from the connection once it ended. Caller must hold
// mu.
func (c *serverConn) stepLocked(s *stream, ev h2event) h2result {
	res, ended := c.transport.stepLocked(&s.cst, s.down.id, ev)
	if ended {
		c.removeLocked(s)
	}
	return res
}

// closeSideLocked ends s on the client connection whatever its state: the
// connection or the call is over. Caller must hold mu.
func (c *serverConn) closeSideLocked(s *stream) {
	if s.cst.ended() {
		return
	}
	s.cst = stClosed
	c.removeLocked(s)
}

// removeLocked removes s, which just ended, from the client connection.
// Caller must hold mu.
func (c *serverConn) removeLocked(s *stream) {
	delete(c.streams, s.down.id)
	if len(c.streams) == 0 && !c.idleSince.IsZero() {
		c.idleSince = time.Now()
	}
	s.down.drop(&c.transport)
	s.down.closed = true
	s.upRecv.done = true
	c.releaseHeldLocked(&s.upRecv)
	s.sideClosed()
}

// openLocked implements role; clients open streams, we do not.
func (c *serverConn) openLocked(batch []writeOp) []writeOp { return batch }

// sentLastLocked implements role.
func (c *serverConn) sentLastLocked(q *sendQueue, reset bool) {
	s := q.s
	if reset {
		c.stepLocked(s, evSendReset)
		return
	}
	c.stepLocked(s, evSendEnd)
	if s.rstQueued && !s.cst.recvEnded() {
		// The RST_STREAM queued behind the response's last frame went
		// with the queue when that frame was taken: send it now, after
		// that frame, or the stream stays open until the client ends its
		// side, which it may never do (RFC 9113 §8.1).
		c.queueCtrlLocked(writeOp{kind: opReset, streamID: q.id, code: s.rstCode})
		c.stepLocked(s, evSendReset)
	}
}

// writerFinished implements writerOwner.
func (c *serverConn) writerFinished(err error) {
	defer close(c.writerDone)
	// Whether it failed or drained (after GOAWAY, or a connection error's
	// GOAWAY), the connection is done: closing it also ends the reader,
	// which a client that keeps it open would not.
	if err == nil {
		c.linger()
	}
	c.close(err)
}

// streamsLocked implements writerOwner: streams are open, or two or more
// opened since the housekeeper last looked. A connection that carries a
// call at a time, as at a moderate rate, has none open between its calls;
// its writer used to exit after each response and a new one started, and
// grew its stack, for the next (issue 12: a goroutine start and a stack
// copy per call or so at 2,000 calls/s). Now it parks, and the
// housekeeper makes it exit within a period or two once calls stop
// (housekeep, reapWriter). A connection that made one call, or none (a
// client that only connected), holds no writer once it is answered.
func (c *serverConn) streamsLocked() bool {
	return len(c.streams) > 0 || c.recentStreams >= 2
}

// idleLocked implements role.
func (c *serverConn) idleLocked() bool {
	return c.fatal || (c.goingAway && len(c.streams) == 0)
}

// shutdown starts a graceful close in two steps (RFC 9113 §6.8): a GOAWAY
// with the largest stream id, so the client opens nothing new, and a PING;
// once the PING is acknowledged, or after Config.ShutdownPingTimeout, the
// streams the client opened meanwhile are in, and finishDrain sends the
// real last stream id. The connection closes when its streams are done.
// Safe to call more than once and from any goroutine; it does not block.
func (c *serverConn) shutdown() {
	c.mu.Lock()
	if !c.handshook {
		// Our SETTINGS must be the first frame we send (§3.4): the
		// handshake starts the shutdown once it queued it.
		c.drainPending = true
		c.mu.Unlock()
		return
	}
	if c.drainPhase != drainNone || c.goingAway {
		c.mu.Unlock()
		return
	}
	c.drainPhase = drainPinged
	c.queueGoAwayLocked(1<<31-1, http2.ErrCodeNo, nil)
	c.queueCtrlLocked(writeOp{kind: opPing, ping: drainPing})
	c.drainTimer = time.AfterFunc(c.srv.cfg.ShutdownPingTimeout, c.finishDrain)
	c.mu.Unlock()
	c.signal()
}

// finishDrain is the second step of shutdown: GOAWAY with the highest
// stream id the connection took, after which streams above it are
// ignored, and the connection closes once its streams are done. It runs
// on the PING ack or on the drain timer, whichever is first.
func (c *serverConn) finishDrain() {
	c.mu.Lock()
	if c.drainPhase != drainPinged {
		c.mu.Unlock()
		return
	}
	c.drainPhase = drainFinal
	if !c.goingAway {
		c.goingAway = true
		c.queueGoAwayLocked(c.lastID, http2.ErrCodeNo, nil)
	}
	c.drainAndClose = true
	c.mu.Unlock()
	c.signal()
}

// queueGoAwayLocked queues a GOAWAY whose last-stream-id is id, or that of
// the GOAWAY sent before if lower: it never increases (RFC 9113 §6.8).
// Caller must hold mu.
func (c *serverConn) queueGoAwayLocked(id uint32, code http2.ErrCode, debug []byte) {
	if c.goAwaySent && id > c.goAwayID {
		id = c.goAwayID
	}
	c.goAwaySent = true
	c.goAwayID = id
	c.queueCtrlLocked(writeOp{kind: opGoAway, val: id, code: code, debug: debug})
}

func (c *serverConn) stopDrainTimer() {
	c.mu.Lock()
	if c.drainTimer != nil {
		c.drainTimer.Stop()
	}
	c.mu.Unlock()
}

// linger runs after the writer flushed the final GOAWAY: it half-closes
// the socket and waits, at most Config.ShutdownLinger, for the client to
// close its side, so that frames it sent meanwhile do not make our kernel
// answer with a TCP RST that could destroy the GOAWAY in flight (as
// x/net/http2's goAwayTimeout does).
func (c *serverConn) linger() {
	d := c.srv.cfg.ShutdownLinger
	c.mu.Lock()
	closed := c.closed
	c.mu.Unlock()
	if closed || d <= 0 {
		return
	}
	c.lingering.Store(true)
	if cw, ok := c.nc.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-c.readerDone:
	case <-t.C:
	}
}

// goAwayWait is how long a write to the socket may go without moving a
// byte, after a connection error, before the reader judges that the
// client does not read and closes the connection (drainAfterError).
// goAwayMaxWait bounds the whole wait for a writer that is not stuck on
// the socket but does not finish either.
const (
	goAwayWait    = time.Second
	goAwayMaxWait = 10 * time.Second
)

// drainAfterError runs on the reader after the frame loop ended in a
// connection error (goAwayFatal), in place of transport.awaitGoAway: it
// reports false, doing nothing, after any other end. While the writer
// writes the GOAWAY and then lingers, the reader goes on reading what
// the client sends, and throws it away. A socket closed with bytes unread
// makes the kernel send a TCP RST at once and drop what it had not yet
// sent of ours: the GOAWAY, to a client that reads slowly (the client
// sees "connection reset by peer", never why; a client flooding us
// always has bytes in flight). Read and discarded, they leave nothing
// unread, the half-close (linger) sends the GOAWAY then FIN, and the
// linger ends when the client closes its side, as after a graceful
// shutdown.
//
// The reader used to wait a fixed second for the writer, then close the
// socket, GOAWAY written or not: a writer short of CPU (the race build
// under load), or behind a client that reads slowly, lost it. Now the
// client is judged not to read only when the writer has been in one
// socket write without moving a byte for goAwayWait (connWriter.progress,
// inWrite), or after goAwayMaxWait in all. After the first goAwayWait the
// writer still going gives up the streams' queued frames
// (transport.abandon), which a backend could go on feeding: what is left
// is the rest of its batch, the GOAWAY and control frames. From its
// linger on, ShutdownLinger bounds the wait. A client that does not read
// is closed after one or two goAwayWait, as before after one. It returns
// with the writer finished, or given up on, and readerDone closed.
func (c *serverConn) drainAfterError() bool {
	c.mu.Lock()
	fatal := c.fatal
	c.mu.Unlock()
	if !fatal {
		return false
	}
	buf := make([]byte, 4<<10)
	start := time.Now()
	w := c.bw
	seen, stuck := w.progress.Load(), w.inWrite.Load()
	c.nc.SetReadDeadline(start.Add(goAwayWait))
	for {
		_, err := c.nc.Read(buf)
		if err == nil {
			continue
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			// The client closed its side (or reset), or the writer
			// closed the socket at the end of its linger.
			break
		}
		select {
		case <-c.writerDone:
			close(c.readerDone)
			return true
		default:
		}
		now := time.Now()
		if c.lingering.Load() {
			// The writer's linger closes the socket when it ends.
			c.nc.SetReadDeadline(now.Add(goAwayWait))
			continue
		}
		n, in := w.progress.Load(), w.inWrite.Load()
		if (n == seen && in && stuck) || now.Sub(start) >= goAwayMaxWait {
			// In the same write as at the last look, and no byte moved
			// since: the client does not read.
			close(c.readerDone)
			return true
		}
		seen, stuck = n, in
		c.mu.Lock()
		if !c.abandon {
			c.abandon = true
			c.mu.Unlock()
			c.signal()
		} else {
			c.mu.Unlock()
		}
		c.nc.SetReadDeadline(now.Add(goAwayWait))
	}
	// The writer finishes on its own, or on the closed socket: its
	// linger, if it began one, ends with readerDone.
	close(c.readerDone)
	c.awaitGoAway(c.writerDone)
	return true
}

// cleanup fails every stream left when the connection ended: the backend
// side is cancelled. Runs after both goroutines exited.
func (c *serverConn) cleanup() {
	c.mu.Lock()
	var left []*attempt
	for _, s := range c.streams {
		if !s.down.closed || s.down.statusQueued() {
			// Also a call whose status was queued but never written:
			// its client did not see the backend's outcome.
			s.fromBackend = false
			s.result = failure{kind: failClientGone}.statusErr()
		}
		if a := s.att; a != nil {
			s.ref() // left's, until resetUp: closeSideLocked may end s
			left = append(left, a)
		}
		c.closeSideLocked(s)
	}
	c.mu.Unlock()
	resetCut(left)
}
