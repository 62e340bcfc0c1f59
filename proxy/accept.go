package proxy

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"sync"
	"time"
)

// Accept back-off bounds, as net/http.Server uses them.
const (
	acceptBackoffMin = 5 * time.Millisecond
	acceptBackoffMax = time.Second
)

// acceptBackoff is the wait between failed accepts: it doubles from
// acceptBackoffMin to acceptBackoffMax over one burst of failures. The zero
// value is a fresh burst. Used by Serve's goroutine only.
type acceptBackoff struct {
	failures int
	d        time.Duration
}

// fail records a failed accept and returns how long to wait.
func (b *acceptBackoff) fail() time.Duration {
	b.failures++
	b.d = min(max(2*b.d, acceptBackoffMin), acceptBackoffMax)
	return b.d
}

// temporaryAcceptError reports whether err leaves the listener usable:
// EMFILE, ENFILE, ECONNABORTED and the like. net/http's Serve makes the
// same call with net.Error's deprecated Temporary, which is still the only
// way the net package says so for accept.
func temporaryAcceptError(err error) bool {
	if errors.Is(err, net.ErrClosed) {
		return false
	}
	var te interface{ Temporary() bool }
	if errors.As(err, &te) && te.Temporary() {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// refusalLog counts refusals at a limit (connections over
// Config.MaxConnections, calls over Config.MaxBackendConns) and logs them
// at most once per refusalLogEvery, with the count since the last line, so
// a burst of refusals makes one log line, not one per refusal.
type refusalLog struct {
	mu sync.Mutex
	// mu guards the fields below.
	total   int64
	since   int64 // refused since the last log line
	lastLog time.Time
}

const refusalLogEvery = time.Second

// note records one refusal at limit, and logs msg at level with args if
// the last line is older than refusalLogEvery. It logs after releasing mu.
func (r *refusalLog) note(now time.Time, log *slog.Logger, level slog.Level, msg string, limit int, args ...any) {
	r.mu.Lock()
	r.total++
	r.since++
	if now.Sub(r.lastLog) < refusalLogEvery {
		r.mu.Unlock()
		return
	}
	r.lastLog = now
	total, since := r.total, r.since
	r.since = 0
	r.mu.Unlock()
	log.Log(context.Background(), level, msg, append([]any{"limit", limit, "refused", since, "refused_total", total}, args...)...)
}

// refused returns how many connections were refused so far.
func (r *refusalLog) refused() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.total
}
