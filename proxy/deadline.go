package proxy

import (
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// deadlineTimer is a stream's grpc-timeout timer. Timers are reused from
// one call to the next (deadlinePool): a time.AfterFunc per call was two
// allocations (the timer and its closure) of the six a unary call made.
// A timer goes back to the pool only when stop stopped it before it fired,
// so a reused timer never runs the previous stream's expiry.
type deadlineTimer struct {
	t *time.Timer
	// s is the stream the running timer is for: set before the timer is
	// started, taken by fire or cleared when stop stopped the timer.
	s atomic.Pointer[stream]
}

var deadlinePool sync.Pool // of *deadlineTimer, stopped, s nil

// startDeadline starts a timer that fails s with DEADLINE_EXCEEDED after d
// (serverConn.deadlineExceeded), unless stopped first. The armed timer
// owns a reference to s: fire lets go of it once deadlineExceeded
// returned, stop when it kept the timer from firing.
func startDeadline(s *stream, d time.Duration) *deadlineTimer {
	s.ref() // the timer's
	dt, _ := deadlinePool.Get().(*deadlineTimer)
	if dt == nil {
		dt = new(deadlineTimer)
		dt.s.Store(s)
		dt.t = time.AfterFunc(d, dt.fire)
		return dt
	}
	dt.s.Store(s)
	dt.t.Reset(d)
	return dt
}

func (dt *deadlineTimer) fire() {
	if s := dt.s.Swap(nil); s != nil {
		s.cc.deadlineExceeded(s)
		s.unref() // the timer's
	}
}

// stop stops the timer; if that kept it from firing (Timer.Stop reports
// so for a func timer only when the function will not run), the timer is
// free for another call. A timer that fired, or is firing, is left to the
// garbage collector.
func (dt *deadlineTimer) stop() {
	if dt.t.Stop() {
		s := dt.s.Swap(nil)
		deadlinePool.Put(dt)
		if s != nil {
			s.unref() // the timer's
		}
	}
}

// routeTimeoutLocked applies the timeout d of the route s's first pick
// named (UpstreamPick.Timeout): the call's deadline becomes the route's
// if that comes before the client's own. One deadline, so one timer
// (startDeadline) serves both. Called under cc.mu before any backend sees
// the stream.
func (s *stream) routeTimeoutLocked(d time.Duration) {
	s.routeTimeout = d
	if dl := time.Now().Add(d); s.deadline.IsZero() || dl.Before(s.deadline) {
		s.deadline = dl
	}
}

// routeDeadline reports whether s's deadline is its route's: one came
// before the client's own (clientDeadline, zero if none).
func (s *stream) routeDeadline() bool {
	return s.routeTimeout > 0 && !s.deadline.Equal(s.clientDeadline)
}

// deadlineFailure is the failure of s when its deadline passes: the
// client's grpc-timeout, or the route's timeout.
func (s *stream) deadlineFailure() failure {
	if s.routeDeadline() {
		return failure{kind: failRouteTimeout, method: s.method, limit: int64(s.routeTimeout)}
	}
	return failure{kind: failDeadline, method: s.method}
}

// unansweredLocked reports whether s's deadline passing now is its
// backend not answering (Unanswered, which counts towards the backend's
// ejection, as Envoy counts its upstream timeouts): the deadline is the
// route's and the backend has the whole request; the caller adds that
// the backend sent no response message (attempt.gotData). Response
// headers alone are no answer: grpc-go's server sends them with its
// first message or its status. The same
// whichever timer saw the deadline first: ours (deadlineExceeded), or the
// backend's, which was sent what was left of the route's timeout as its
// grpc-timeout (attemptFields) and may end the stream a moment earlier,
// with headers and DEADLINE_EXCEEDED (routeTimedOut) or a CANCEL
// (backendReset). Counted only when ours came first, a backend that never
// answered escaped ejection whenever its timer won the race, as under
// load. Caller must hold s.cc.mu.
func (s *stream) unansweredLocked() bool {
	return s.routeDeadline() && s.cst.recvEnded()
}

// routeTimedOut reports whether fields, a backend's final header block
// for s, are the backend giving up on the route's timeout: s's deadline
// is its route's, it is less than deadlineSlack away, and the status is
// DEADLINE_EXCEEDED (or CANCELLED, as the grpc-proxy engine takes it).
// The backend was sent what was left of that deadline as its
// grpc-timeout (attemptFields), so its own timer runs out at about the
// moment ours does, and first when ours runs late.
func (s *stream) routeTimedOut(fields []hpack.HeaderField) bool {
	if !s.routeDeadline() || time.Until(s.deadline) >= deadlineSlack {
		return false
	}
	code := status.Code(outcome(fields))
	return code == codes.DeadlineExceeded || code == codes.Canceled
}

// timeoutPassAfter is how long a call with the client's grpc-timeout may
// wait in the proxy before its attempt is sent and still pass that
// grpc-timeout on as received (attemptFields).
const timeoutPassAfter = time.Millisecond

// attemptFields returns the request headers an attempt of s sends its
// backend: reqFields as they are, or with a grpc-timeout of what is left
// of the call's deadline, so that the backend gives up when the proxy
// does: on a route with a timeout (Envoy sets grpc-timeout to its route
// timeout the same way), and for the client's own grpc-timeout once the
// call has waited in the proxy for timeoutPassAfter or more (for a new
// backend connection's handshake, a slot, or a retry). Passed on as
// received after such a wait, it gave the backend a deadline later than
// the client's by the wait, which its handler would pass on to the calls
// it makes; a grpc-go client, or proxy, computes it when it sends. The
// first attempt of a call that did not wait (its connection had done its
// handshake when it was added, and it was not queued for a slot) is sent
// without a look at the clock. The copy is the one allocation it costs
// per attempt; reqFields itself stays as received, for the next attempt
// to count down from its own moment.
// a is the attempt being opened; caller must hold its connection's mu.
func (s *stream) attemptFields(a *attempt) []hpack.HeaderField {
	if s.deadline.IsZero() || (s.routeTimeout == 0 && a == &s.first && !a.waits && !a.queued) {
		return s.reqFields
	}
	left := time.Until(s.deadline)
	if s.routeTimeout == 0 && s.clientTimeout-left < timeoutPassAfter {
		return s.reqFields
	}
	v := formatTimeout(left)
	out := make([]hpack.HeaderField, 0, len(s.reqFields)+1)
	set := false
	for _, f := range s.reqFields {
		if f.Name == "grpc-timeout" {
			if set {
				continue // the last one counted (parseRequest); one goes
			}
			f.Value, set = v, true
		}
		out = append(out, f)
	}
	if !set {
		out = append(out, hpack.HeaderField{Name: "grpc-timeout", Value: v})
	}
	return out
}
