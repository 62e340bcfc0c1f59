package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
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

	// mu (in transport) guards the fields below.
	streams    map[uint32]*stream // open backend streams by backend stream id
	pending    []*stream          // waiting to be opened, in arrival order
	reserved   uint32             // streams open or pending: what the pool counts
	nextID     uint32
	goingAway  bool // GOAWAY received, draining, or ids nearly exhausted: take no new streams
	connected  bool
	assumedMax uint32      // peer's stream limit assumed until its SETTINGS arrive
	drainTimer *time.Timer // forces the close of a draining connection
}

// errDrainTimeout closes a draining connection whose streams outlived
// Config.DrainTimeout.
var errDrainTimeout = errors.New("backend left the set and its drain timeout expired")

// drain stops new streams on b and closes it once its streams are done, or
// after timeout.
func (b *backendConn) drain(timeout time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.drainTimer != nil || b.closed {
		return
	}
	b.goingAway = true
	b.drainAndClose = true
	b.drainTimer = time.AfterFunc(timeout, func() { b.close(errDrainTimeout) })
	b.signal()
}

func newBackendConn(p *pool, addr string) *backendConn {
	cfg := &p.srv.cfg
	b := &backendConn{pool: p, addr: addr, streams: make(map[uint32]*stream), nextID: 1}
	b.transport.init(true, cfg.StreamWindow, cfg.ConnWindow, cfg.MaxHeaderListSize, p.srv.log.With("backend", addr))
	return b
}

// capLocked is how many streams this connection may carry. Caller must
// hold mu.
//
// Until the backend's SETTINGS arrive its limit is unknown, and the RFC's
// initial value is "unlimited"; we assume 100, the smallest limit RFC 9113
// §6.5.2 recommends, so a new connection never takes more streams than a
// well-behaved server accepts. Streams beyond a lower advertised limit wait
// for a slot on this connection (at most 100 of them); later streams go to
// another connection, which assumes the limit its siblings learned.
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
	return true
}

// addStream queues s to be opened with the given request headers. The
// caller reserved a slot with tryReserve.
func (b *backendConn) addStream(s *stream, fields []hpack.HeaderField, end bool) {
	b.mu.Lock()
	s.reqFields = fields
	s.reqEnd = end
	s.downRecv = recvState{window: b.streamWindow}
	s.down.src = &b.transport
	s.down.credit = &s.downRecv
	if b.closed {
		// The connection failed between the reservation and now; its
		// failAll has run already, so fail this stream the same way.
		cause := b.closeErr
		b.closeSideLocked(s)
		b.mu.Unlock()
		s.cc.failDown(s, codes.Unavailable, fmt.Sprintf("streamlb: backend %s: %v", b.addr, cause))
		return
	}
	b.pending = append(b.pending, s)
	b.mu.Unlock()
	b.signal()
}

// run dials the backend, then writes until the connection ends, and
// finally fails every stream still on it with UNAVAILABLE.
func (b *backendConn) run(ctx context.Context) {
	cfg := &b.pool.srv.cfg
	dctx, cancel := context.WithTimeout(ctx, cfg.ConnectTimeout)
	nc, err := cfg.Dial(dctx, "tcp", b.addr)
	cancel()
	if err != nil {
		err = fmt.Errorf("connecting: %w", err)
		b.mu.Lock()
		b.closed = true
		b.closeErr = err
		b.mu.Unlock()
		b.failAll(fmt.Sprintf("streamlb: backend %s: %v", b.addr, err))
		return
	}
	b.attach(nc)
	b.mu.Lock()
	b.connected = true
	b.queueCtrlLocked(writeOp{kind: opSettings, settings: []http2.Setting{
		{ID: http2.SettingEnablePush, Val: 0},
		{ID: http2.SettingInitialWindowSize, Val: uint32(cfg.StreamWindow)},
		{ID: http2.SettingMaxFrameSize, Val: maxFrameSize},
		{ID: http2.SettingMaxHeaderListSize, Val: cfg.MaxHeaderListSize},
	}})
	if inc := cfg.ConnWindow - defaultInitialWindowRFC; inc > 0 {
		b.queueCtrlLocked(writeOp{kind: opWindowUpdate, val: uint32(inc)})
		b.recvWindow += inc
	}
	closed := b.closed
	b.mu.Unlock()
	if closed {
		nc.Close()
		b.failAll("streamlb: backend connection closed")
		return
	}
	readerDone := make(chan error, 1)
	go func() {
		err := b.readLoop()
		b.close(err) // stops the writer too
		readerDone <- err
	}()
	var werr error
	if _, err := b.bw.WriteString(http2.ClientPreface); err != nil {
		werr = err
	} else {
		werr = b.writeLoop(b)
	}
	b.close(werr)
	rerr := <-readerDone
	cause := rerr
	if cause == nil || errors.Is(cause, io.EOF) {
		cause = werr
	}
	msg := "streamlb: backend connection to " + b.addr + " lost"
	if cause != nil && !errors.Is(cause, errClosed) {
		msg += ": " + cause.Error()
	}
	b.mu.Lock()
	if b.drainTimer != nil {
		b.drainTimer.Stop()
	}
	b.mu.Unlock()
	b.failAll(msg)
}

// failAll ends every stream on b with UNAVAILABLE: the backend is gone, so
// there is nothing to reset on its side.
func (b *backendConn) failAll(msg string) {
	b.mu.Lock()
	var left []*stream
	for _, s := range b.streams {
		left = append(left, s)
	}
	for _, s := range b.pending {
		if !s.bClosed && s.up.id == 0 {
			left = append(left, s)
		}
	}
	b.pending = nil
	for _, s := range left {
		b.closeSideLocked(s)
	}
	b.mu.Unlock()
	for _, s := range left {
		s.cc.failDown(s, codes.Unavailable, msg)
	}
}

func (b *backendConn) readLoop() error {
	for {
		f, err := b.rfr.ReadFrame()
		if err == nil {
			err = b.handleFrame(f)
		}
		if err == nil {
			continue
		}
		var se http2.StreamError
		if errors.As(err, &se) {
			b.resetFromBackend(se.StreamID, se.Code, true)
			continue
		}
		var ce http2.ConnectionError
		if errors.As(err, &ce) {
			b.mu.Lock()
			b.queueCtrlLocked(writeOp{kind: opGoAway, code: http2.ErrCode(ce)})
			b.goingAway = true
			b.drainAndClose = true
			b.mu.Unlock()
			b.signal()
			return fmt.Errorf("protocol error from backend: %w", err)
		}
		return err
	}
}

func (b *backendConn) handleFrame(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.MetaHeadersFrame:
		return b.onHeaders(f)
	case *http2.DataFrame:
		return b.onData(f)
	case *http2.RSTStreamFrame:
		b.resetFromBackend(f.StreamID, f.ErrCode, false)
	case *http2.SettingsFrame:
		return b.handleSettings(f, b.eachQueueLocked)
	case *http2.WindowUpdateFrame:
		b.mu.Lock()
		var q *sendQueue
		if s := b.streams[f.StreamID]; s != nil {
			q = &s.up
		}
		err := b.handleWindowUpdateLocked(q, f)
		b.mu.Unlock()
		return err
	case *http2.PingFrame:
		if !f.IsAck() {
			b.mu.Lock()
			b.queueCtrlLocked(writeOp{kind: opPing, end: true, ping: f.Data})
			b.mu.Unlock()
			b.signal()
		}
	case *http2.GoAwayFrame:
		b.onGoAway(f)
	case *http2.PushPromiseFrame:
		return http2.ConnectionError(http2.ErrCodeProtocol) // we sent ENABLE_PUSH=0
	}
	return nil
}

func (b *backendConn) eachQueueLocked(fn func(*sendQueue)) {
	for _, s := range b.streams {
		fn(&s.up)
	}
}

func (b *backendConn) onHeaders(f *http2.MetaHeadersFrame) error {
	id := f.StreamID
	end := f.StreamEnded()
	b.mu.Lock()
	s := b.streams[id]
	if s == nil {
		b.mu.Unlock()
		if id >= b.nextIDSnapshot() {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		return nil
	}
	if s.bRecvEnd {
		b.mu.Unlock()
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeStreamClosed}
	}
	if end {
		s.bRecvEnd = true
		b.maybeCloseLocked(s)
	}
	b.mu.Unlock()
	s.cc.enqueueDown(s, outItem{kind: itemHeaders, end: end, fields: filterFields(f.Fields)}, nil)
	return nil
}

func (b *backendConn) nextIDSnapshot() uint32 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.nextID
}

func (b *backendConn) onData(f *http2.DataFrame) error {
	id := f.StreamID
	data := f.Data()
	n := int32(f.Length)
	end := f.StreamEnded()
	b.mu.Lock()
	s := b.streams[id]
	var r *recvState
	if s != nil {
		r = &s.downRecv
	}
	connOK, streamOK := b.consumeLocked(r, n)
	switch {
	case !connOK:
		b.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeFlowControl)
	case s == nil:
		b.mu.Unlock()
		b.signal()
		return nil
	case !streamOK:
		b.mu.Unlock()
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeFlowControl}
	case s.bRecvEnd:
		b.mu.Unlock()
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeStreamClosed}
	}
	b.creditLocked(r, n-int32(len(data)))
	if end {
		s.bRecvEnd = true
		b.maybeCloseLocked(s)
	}
	b.mu.Unlock()
	if !s.cc.enqueueDown(s, outItem{kind: itemData, end: end}, data) {
		b.creditStream(r, int32(len(data)))
	}
	return nil
}

// resetFromBackend handles a RST_STREAM from the backend, or a stream error
// we detected (sendRST).
func (b *backendConn) resetFromBackend(id uint32, code http2.ErrCode, sendRST bool) {
	b.mu.Lock()
	if sendRST {
		b.queueCtrlLocked(writeOp{kind: opReset, streamID: id, code: code})
	}
	s := b.streams[id]
	if s != nil {
		b.closeSideLocked(s)
	}
	b.mu.Unlock()
	b.signal()
	if s == nil {
		return
	}
	if sendRST {
		s.cc.failDown(s, codes.Internal, fmt.Sprintf("streamlb: protocol error from backend %s: %v", b.addr, code))
		return
	}
	s.cc.backendReset(s, code)
}

// onGoAway stops new streams on b; streams the backend did not process
// (ids above the GOAWAY's last stream id, RFC 9113 §6.8) fail with
// UNAVAILABLE. The rest finish, then the connection closes.
func (b *backendConn) onGoAway(f *http2.GoAwayFrame) {
	b.mu.Lock()
	b.goingAway = true
	b.drainAndClose = true
	var unprocessed []*stream
	for id, s := range b.streams {
		if id > f.LastStreamID {
			unprocessed = append(unprocessed, s)
		}
	}
	for _, s := range b.pending {
		if !s.bClosed && s.up.id == 0 {
			unprocessed = append(unprocessed, s)
		}
	}
	b.pending = nil
	for _, s := range unprocessed {
		b.closeSideLocked(s)
	}
	b.mu.Unlock()
	b.signal()
	if f.ErrCode != http2.ErrCodeNo {
		b.log.Warn("backend sent GOAWAY", "code", f.ErrCode.String(), "debug", string(f.DebugData()))
	}
	for _, s := range unprocessed {
		s.cc.failDown(s, codes.Unavailable, "streamlb: backend "+b.addr+" is going away (GOAWAY) and did not process the call")
	}
}

// enqueueUp queues a request item other than DATA (trailers) toward the
// backend.
func (b *backendConn) enqueueUp(s *stream, it outItem) {
	b.mu.Lock()
	if !s.up.closed && !s.bClosed {
		s.up.items = append(s.up.items, it)
		if it.end {
			s.up.closed = true
		}
		b.markReadyLocked(&s.up)
	}
	b.mu.Unlock()
	b.signal()
}

// enqueueUpData queues request DATA toward the backend. It reports false
// when the backend side is gone and the caller must credit the bytes back.
func (b *backendConn) enqueueUpData(s *stream, data []byte, end bool) bool {
	b.mu.Lock()
	if s.up.closed || s.bClosed {
		b.mu.Unlock()
		return false
	}
	s.up.pushData(data, end)
	if end {
		s.up.closed = true
	}
	b.markReadyLocked(&s.up)
	b.mu.Unlock()
	b.signal()
	return true
}

// resetUp cancels the backend side of s: a RST_STREAM if it was opened.
func (b *backendConn) resetUp(s *stream, code http2.ErrCode) {
	b.mu.Lock()
	if s.bClosed {
		b.mu.Unlock()
		return
	}
	if s.up.id != 0 {
		b.queueCtrlLocked(writeOp{kind: opReset, streamID: s.up.id, code: code})
	}
	b.closeSideLocked(s)
	b.mu.Unlock()
	b.signal()
}

func (b *backendConn) maybeCloseLocked(s *stream) {
	if s.bRecvEnd && s.bSentEnd {
		b.closeSideLocked(s)
	}
}

// closeSideLocked removes s from b and frees its slot. Caller must hold mu.
func (b *backendConn) closeSideLocked(s *stream) {
	if s.bClosed {
		return
	}
	s.bClosed = true
	s.up.drop()
	s.up.closed = true
	s.downRecv.done = true
	if s.up.id != 0 {
		delete(b.streams, s.up.id)
	}
	b.reserved--
	s.sideClosed()
	b.signal()
}

// openLocked implements role: it opens pending streams while the backend's
// concurrency limit allows, assigning ids in the order HEADERS are written
// (RFC 9113 §5.1.1). Streams wait for the backend's SETTINGS first so they
// never exceed its SETTINGS_MAX_CONCURRENT_STREAMS.
func (b *backendConn) openLocked(batch []writeOp) []writeOp {
	if !b.gotSettings {
		return batch
	}
	limit := b.capLocked()
	i := 0
	for ; i < len(b.pending) && uint32(len(b.streams)) < limit; i++ {
		s := b.pending[i]
		b.pending[i] = nil
		if s.bClosed {
			continue
		}
		id := b.nextID
		b.nextID += 2
		if b.nextID > maxStreamID-2*b.pool.srv.cfg.BackendStreamsPerConn {
			b.goingAway = true // leave room for what is reserved; the pool opens a new connection
			b.drainAndClose = true
		}
		s.up.id = id
		s.up.window = b.peerInitWin
		s.downRecv.id = id
		b.streams[id] = s
		batch = append(batch, writeOp{kind: opHeaders, streamID: id, end: s.reqEnd, fields: s.reqFields})
		s.reqFields = nil
		if s.reqEnd {
			s.bSentEnd = true
		}
		b.markReadyLocked(&s.up)
	}
	b.pending = b.pending[i:]
	if len(b.pending) == 0 {
		b.pending = nil
	}
	return batch
}

// sentLastLocked implements role.
func (b *backendConn) sentLastLocked(s *stream, reset bool) {
	s.bSentEnd = true
	if reset || s.bRecvEnd {
		b.closeSideLocked(s)
	}
}

// idleLocked implements role.
func (b *backendConn) idleLocked() bool {
	return len(b.streams) == 0 && len(b.pending) == 0
}

// pool holds the backend connections, keyed by address.
type pool struct {
	srv *Server
	ctx context.Context // cancelled on hard close; bounds dials

	mu sync.Mutex
	// mu guards the fields below.
	conns    map[string][]*backendConn
	inflight map[string]*atomic.Int64 // calls in flight per backend, when MaxStreamsPerBackend is set
	closed   bool
	wg       sync.WaitGroup
}

var errBackendFull = errors.New("backend is at its concurrency limit")

// retain drains the connections of every backend not in keep.
func (p *pool) retain(keep map[string]bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for addr, cs := range p.conns {
		if keep[addr] {
			continue
		}
		for _, b := range cs {
			b.drain(p.srv.cfg.DrainTimeout)
		}
	}
	for addr, n := range p.inflight {
		if !keep[addr] && n.Load() == 0 {
			delete(p.inflight, addr)
		}
	}
}

var errPoolClosed = errors.New("proxy: server is shutting down")

// get returns a connection to addr with a stream slot reserved, opening a
// new connection when every existing one is full (its
// SETTINGS_MAX_CONCURRENT_STREAMS or BackendStreamsPerConn reached).
func (p *pool) get(addr string, s *stream) (*backendConn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, errPoolClosed
	}
	if max := p.srv.cfg.MaxStreamsPerBackend; max > 0 {
		n := p.inflight[addr]
		if n == nil {
			n = new(atomic.Int64)
			p.inflight[addr] = n
		}
		if n.Load() >= max {
			return nil, fmt.Errorf("%s: %w (limit %d)", addr, errBackendFull, max)
		}
		n.Add(1)
		s.backendCount = n
	}
	for _, b := range p.conns[addr] {
		if b.tryReserve() {
			return b, nil
		}
	}
	b := newBackendConn(p, addr)
	b.assumedMax = assumedPeerMaxStreams
	for _, sib := range p.conns[addr] {
		sib.mu.Lock()
		if sib.gotSettings {
			b.assumedMax = max(1, sib.peerMaxStream)
		}
		sib.mu.Unlock()
	}
	b.reserved = 1
	p.conns[addr] = append(p.conns[addr], b)
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		b.run(p.ctx)
		p.remove(b)
	}()
	return b, nil
}

func (p *pool) remove(b *backendConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	cs := p.conns[b.addr]
	for i, c := range cs {
		if c == b {
			cs = append(cs[:i], cs[i+1:]...)
			break
		}
	}
	if len(cs) == 0 {
		delete(p.conns, b.addr)
	} else {
		p.conns[b.addr] = cs
	}
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
