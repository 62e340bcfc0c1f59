package proxy

import (
	"sync"
	"sync/atomic"
	"time"
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
// (serverConn.deadlineExceeded), unless stopped first.
func startDeadline(s *stream, d time.Duration) *deadlineTimer {
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
	}
}

// stop stops the timer; if that kept it from firing (Timer.Stop reports
// so for a func timer only when the function will not run), the timer is
// free for another call. A timer that fired, or is firing, is left to the
// garbage collector.
func (dt *deadlineTimer) stop() {
	if dt.t.Stop() {
		dt.s.Store(nil)
		deadlinePool.Put(dt)
	}
}
