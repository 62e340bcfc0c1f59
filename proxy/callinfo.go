package proxy

import (
	"errors"
	"log/slog"
	"net"
	"sync"
	"time"

	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// CallInfo describes one client call when it has ended, for access logs
// and metrics: see Config.OnCallEnd. The hook owns it after the call.
type CallInfo struct {
	// Method is the gRPC full method name, "/pkg.Service/Method"; empty
	// for a request rejected before its path was read.
	Method string
	// Backend is the address of the final attempt's backend; empty when
	// the call reached none (no backend picked, or a limit rejected it).
	Backend string
	// Upstream is the name of the Upstream the final attempt's connection
	// was dialed for (the cluster, with an UpstreamPicker), or, for a call
	// that reached no backend, the one its pick named (a limit refused
	// the call, or the routed cluster had no backend); empty for the
	// Server's own, or when the call was refused before it was routed.
	Upstream string
	// Attempts is how many times the call was given to a backend,
	// retries included; Attempts-1 are retries. A pick the proxy refused
	// without trying it (at MaxBackendConns, a backend that takes no
	// streams) is none: a call that waited for a slot after such
	// refusals made one attempt, and one refused everywhere none. Zero
	// when no backend was tried.
	Attempts int
	// Code is the gRPC status the client was sent (or, when the client
	// reset the stream or went away, CANCELLED).
	Code codes.Code
	// Message is grpc-message: the proxy's own for a status it made, the
	// backend's as sent (percent-encoded, gRPC over HTTP/2) otherwise.
	Message string
	// ProxyStatus reports that the proxy made the status rather than
	// relaying a backend's (see status.go).
	ProxyStatus bool
	// Limit names the limit that rejected the call when the proxy
	// answered it for one: "max_streams", "max_streams_per_backend",
	// "max_header_size" or "max_conn_buffer" (RESOURCE_EXHAUSTED), or
	// "max_backend_conns"
	// (UNAVAILABLE: every connection to the backend was full and no other
	// backend took the call), or a Picker's own (PickLimitError); empty
	// otherwise.
	Limit string
	// Start is when the request headers arrived.
	Start time.Time
	// Duration runs from Start until both the client side and the final
	// attempt were done.
	Duration time.Duration
	// RequestBytes and ResponseBytes are the DATA payload (gRPC
	// length-prefixed messages, padding excluded) received from the client
	// and relayed to it.
	RequestBytes, ResponseBytes int64
	// Client is the client connection's remote address.
	Client net.Addr
}

// PickLimitError is a Picker's error for a call a limit of its own
// refused (a route's rate limit, say): the client gets Status, and the
// call's CallInfo names Limit and, as its Upstream, the Upstream the call
// was routed to (frame engine).
type PickLimitError struct {
	Status   *status.Status
	Limit    string
	Upstream string
}

func (e *PickLimitError) Error() string { return e.Status.Err().Error() }

// GRPCStatus is the status the client gets.
func (e *PickLimitError) GRPCStatus() *status.Status { return e.Status }

// Limit names, see CallInfo.Limit.
const (
	LimitMaxStreams           = "max_streams"
	LimitMaxStreamsPerBackend = "max_streams_per_backend"
	LimitMaxHeaderSize        = "max_header_size"
	LimitMaxBackendConns      = "max_backend_conns"
	LimitMaxConnBuffer        = "max_conn_buffer"
)

// limitName is the CallInfo.Limit of a proxy failure.
func limitName(k failKind) string {
	switch k {
	case failTooManyCalls:
		return LimitMaxStreams
	case failBackendFull:
		return LimitMaxStreamsPerBackend
	case failHeadersTooLarge:
		return LimitMaxHeaderSize
	case failBackendConns, failQueueTimeout:
		return LimitMaxBackendConns
	case failConnBudget:
		return LimitMaxConnBuffer
	}
	return ""
}

// callInfo describes s once both its sides are done, so nothing writes its
// fields any more.
func (s *stream) callInfo(end time.Time) CallInfo {
	ci := CallInfo{
		Method:        s.method,
		Attempts:      s.attempts,
		Start:         s.start,
		Duration:      end.Sub(s.start),
		RequestBytes:  s.bytesIn,
		ResponseBytes: s.bytesOut,
		Client:        s.cc.remote,
		ProxyStatus:   !s.fromBackend,
	}
	if s.att != nil {
		ci.Backend = s.att.bc.addr
		ci.Upstream = s.att.bc.up.name
	} else if s.up != nil {
		// Picked, but refused before any backend took it (a cap of the
		// pool), or routed to a cluster with nothing to pick: the call
		// still belongs to that cluster's counts and log lines.
		ci.Upstream = s.up.name
	}
	if s.result != nil {
		st, _ := status.FromError(s.result)
		ci.Code = st.Code()
		var cs ClientStatus
		if errors.As(s.result, &cs) {
			ci.Code = cs.ClientCode()
		}
		if s.fromBackend {
			ci.Message = s.message
		} else {
			ci.Message = st.Message()
			if ci.Code != codes.OK {
				ci.Limit = limitName(s.failKind)
			}
			var le *PickLimitError
			if ci.Limit == "" && errors.As(s.pickErr, &le) {
				ci.Limit = le.Limit
				if ci.Upstream == "" {
					ci.Upstream = le.Upstream
				}
			}
		}
	}
	return ci
}

// maxPendingEnds bounds the calls waiting for Config.OnCallEnd; past it
// further calls are not reported (and counted), so a hook that blocks
// cannot grow the proxy's memory without bound.
const maxPendingEnds = 1 << 16

// maxPendingEndBytes bounds the bytes of the strings those calls hold
// (pendingSize): the count alone let a client that sends 60 KiB request
// paths (the backend's "unknown service" message repeats them) make the
// queue of a log that fell behind hold 65,536 times 120 KiB, 7.5 GiB.
// Calls of ordinary size stay under the count first (about 4 MiB of
// strings at 65,536 calls). The batch being delivered holds as much again
// at most. A variable for tests.
var maxPendingEndBytes = 16 << 20

// keepEndBatch is the largest batch deliverLoop keeps for the next
// batch, as LogWriter's keepLogBatch.
const keepEndBatch = 1024

// pendingSize is what ci's strings count in maxPendingEndBytes.
func pendingSize(ci *CallInfo) int {
	return len(ci.Method) + len(ci.Message) + len(ci.Backend) + len(ci.Upstream) + len(ci.Limit)
}

// endQueue hands ended calls to Config.OnCallEnd on a goroutine of its
// own: streams end under connection locks, and the hook (an access log
// writing a file, say) must run under none and must not hold up the
// relay. Calls are collected under mu and delivered in batches.
type endQueue struct {
	fn   func(CallInfo)
	log  *slog.Logger  // set by start
	wake chan struct{} // capacity 1: a coalescing "something is pending"
	done chan struct{} // closed when deliverLoop returns

	mu sync.Mutex
	// mu guards the fields below.
	pending []CallInfo
	bytes   int // pendingSize of pending
	dropped int64
	started bool
	closed  bool
}

func newEndQueue(fn func(CallInfo)) *endQueue {
	return &endQueue{fn: fn, wake: make(chan struct{}, 1), done: make(chan struct{})}
}

// push queues ci for the hook. It never blocks; once the queue is closed
// it drops ci.
func (q *endQueue) push(ci CallInfo) {
	q.mu.Lock()
	switch {
	case q.closed:
	case len(q.pending) >= maxPendingEnds, q.bytes+pendingSize(&ci) > maxPendingEndBytes:
		q.dropped++
	default:
		q.pending = append(q.pending, ci)
		q.bytes += pendingSize(&ci)
	}
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// start starts deliverLoop once, logging to log. The Server calls it
// from Serve.
func (q *endQueue) start(log *slog.Logger) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.started || q.closed {
		return
	}
	q.started = true
	q.log = log
	go q.deliverLoop()
}

// endStopWait bounds how long stop waits for the hook to take the calls
// still pending, as the process log's writer bounds its last lines.
const endStopWait = 2 * time.Second

// stop delivers what is pending, then ends deliverLoop and waits for it,
// for up to endStopWait: a hook that blocks (an access log on a FIFO
// nobody reads, or a hung disk) held up the shutdown for as long as it
// blocked, so SIGTERM never ended the process. Past the wait the calls
// not delivered yet are left to deliverLoop, which delivers them (and
// then returns) if the hook ever returns.
func (q *endQueue) stop() {
	q.mu.Lock()
	started := q.started
	q.closed = true
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
	if !started {
		return
	}
	t := time.NewTimer(endStopWait)
	defer t.Stop()
	select {
	case <-q.done:
	case <-t.C:
		q.mu.Lock()
		left := len(q.pending)
		q.mu.Unlock()
		q.log.Warn("call-end hook still busy at shutdown; not waiting for it", "waited", endStopWait, "pending", left)
	}
}

// deliverLoop calls the hook for every queued call, in order, holding no
// lock.
func (q *endQueue) deliverLoop() {
	defer close(q.done)
	var batch []CallInfo
	for range q.wake {
		q.mu.Lock()
		batch, q.pending = q.pending, batch[:0]
		q.bytes = 0
		dropped, closed := q.dropped, q.closed
		q.dropped = 0
		q.mu.Unlock()
		for i := range batch {
			q.fn(batch[i])
			batch[i] = CallInfo{}
		}
		if cap(batch) > keepEndBatch {
			// What a burst grew is not kept while idle: the slices
			// swapped here, of up to 65,536 calls (about 200 bytes
			// each), stayed live at their largest, 13 MiB each, after
			// a burst the hook fell behind.
			batch = nil
		}
		if dropped > 0 {
			q.log.Warn("call-end hook too slow; calls not reported", "dropped", dropped)
		}
		if closed {
			return
		}
	}
}

// noteBackendStatusLocked records that s ends with the backend's own
// status, in the final header block fields. Caller must hold cc.mu.
func (c *serverConn) noteBackendStatusLocked(s *stream, fields []hpack.HeaderField) {
	s.fromBackend = true
	if !c.srv.reportsEnds() {
		return
	}
	for _, f := range fields {
		if f.Name == "grpc-message" {
			s.message = f.Value
		}
	}
}

// reportsEnds reports whether ended calls are described to a hook
// (Config.OnCallEnd or Config.CountCallEnd).
func (s *Server) reportsEnds() bool { return s.ends != nil || s.countEnd != nil }

// stopEnds ends the delivery of ended calls, after every stream ended.
func (s *Server) stopEnds() {
	if s.ends != nil {
		s.ends.stop()
	}
}

// Stats are counts a Server reports at any time; see Server.Stats.
type Stats struct {
	// ClientConns is the client connections open now; ClientConnsParked
	// those of them idle without a reader goroutine (Config.ParkAfter).
	ClientConns, ClientConnsParked int
	// ClientConnsAccepted counts client connections served so far;
	// ClientConnsRefused those closed at once over Config.MaxConnections.
	ClientConnsAccepted, ClientConnsRefused int64
	// BackendConns is the backend connections open (or being opened) now.
	BackendConns int
	// BackendConnsByUpstream splits BackendConns by the name of the
	// Upstream they were opened for ("" for the Server's own).
	BackendConnsByUpstream map[string]int
	// CallsWaitingByUpstream is the calls waiting for a stream slot on a
	// backend whose connections are all full (Config.MaxBackendPending),
	// by the same names, for every name in BackendConnsByUpstream.
	CallsWaitingByUpstream map[string]int
}

// Stats reads the server's connection counts, for metrics read at scrape
// time. Safe for concurrent use; it takes the server's and the pool's
// locks briefly.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	st := Stats{ClientConns: len(s.conns)}
	s.mu.Unlock()
	st.ClientConnsParked = s.parker.parked()
	st.ClientConnsAccepted = s.accepted.Load()
	st.ClientConnsRefused = s.refusals.refused()
	st.BackendConnsByUpstream = map[string]int{}
	st.CallsWaitingByUpstream = map[string]int{}
	s.pool.mu.Lock()
	for k, cs := range s.pool.conns {
		st.BackendConns += len(cs)
		st.BackendConnsByUpstream[k.up.name] += len(cs)
		n := 0
		for _, b := range cs {
			b.mu.Lock()
			n += int(b.queued)
			b.mu.Unlock()
		}
		st.CallsWaitingByUpstream[k.up.name] += n
	}
	s.pool.mu.Unlock()
	return st
}
