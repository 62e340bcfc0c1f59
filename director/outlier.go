package director

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Passive outlier ejection, a first version of Envoy's consecutive
// gateway-failure detection (envoy.config.cluster.v3.OutlierDetection,
// consecutive_gateway_failure): a backend whose streams end with
// [Config.EjectAfter] Unavailable outcomes in a row is left out of picking
// for a while, then let back in.
//
// The pieces, and who runs them (grpc-go's outlierdetection balancer has
// the same split: calls count in atomics, ejection runs on its own timer):
//   - done (any goroutine, lock-free) classifies the outcome and counts the
//     run in an atomic; the call that completes a run marks the backend
//     ejectPending and wakes Run, without waiting for anything.
//   - Run's goroutine (reconcile, under mu) decides each pending ejection:
//     it checks the max-ejection cap, records the ejection in the backend's
//     long-lived counters and publishes a snapshot without it.
//   - Each snapshot carries the earliest end of an ejection (rebuildAt);
//     Run's timer fires then and publishes a snapshot with the backend
//     back. Every rebuild, whatever its cause, also restores the ejections
//     that have run out. Pick never rebuilds.

// Defaults for the outlier fields of [Config]. The values are Envoy's.
const (
	DefaultEjectAfter         = 3
	DefaultBaseEjection       = 10 * time.Second
	DefaultMaxEjection        = 5 * time.Minute
	DefaultMaxEjectionPercent = 50
)

// outlierConfig is the validated outlier part of a Config.
type outlierConfig struct {
	ejectAfter    int64 // run length that ejects; 0 disables ejection
	base, max     time.Duration
	maxPercent    int // 1..100
	maxMultiplier int // ceil(max/base): the multiplier never grows beyond it
}

func newOutlierConfig(cfg Config) (outlierConfig, error) {
	oc := outlierConfig{
		ejectAfter: int64(cfg.EjectAfter),
		base:       cfg.BaseEjection,
		max:        cfg.MaxEjection,
		maxPercent: cfg.MaxEjectionPercent,
	}
	switch {
	case oc.ejectAfter == 0:
		oc.ejectAfter = DefaultEjectAfter
	case oc.ejectAfter < 0:
		oc.ejectAfter = 0
	}
	if oc.base < 0 {
		return oc, fmt.Errorf("director: base ejection time %v is negative", cfg.BaseEjection)
	}
	if oc.base == 0 {
		oc.base = DefaultBaseEjection
	}
	switch {
	case oc.max < 0:
		return oc, fmt.Errorf("director: max ejection time %v is negative", cfg.MaxEjection)
	case oc.max == 0:
		oc.max = max(DefaultMaxEjection, oc.base)
	case oc.max < oc.base:
		return oc, fmt.Errorf("director: max ejection time %v is shorter than the base ejection time %v", oc.max, oc.base)
	}
	if oc.maxPercent == 0 {
		oc.maxPercent = DefaultMaxEjectionPercent
	}
	if oc.maxPercent < 0 || oc.maxPercent > 100 {
		return oc, fmt.Errorf("director: max ejection percent %d out of range 0..100", cfg.MaxEjectionPercent)
	}
	oc.maxMultiplier = int((oc.max + oc.base - 1) / oc.base)
	return oc, nil
}

// outcome is what one stream's end says about its backend's reachability.
type outcome int

const (
	// outcomeNeutral says nothing: the client gave up.
	outcomeNeutral outcome = iota
	// outcomeReachable means the backend answered, successfully or with an
	// application status; it ends a run of failures.
	outcomeReachable
	// outcomeUnreachable is codes.Unavailable: connect refused, a lost
	// connection, REFUSED_STREAM or GOAWAY, or a backend saying it is
	// unavailable; and a route's timeout that passed with the backend
	// given the whole request and no answer from it (the proxy's
	// Unanswered errors). Envoy's gateway failures (502, 503, 504) are the
	// same idea; a client's deadline is not.
	outcomeUnreachable
)

// draining is implemented by the errors the proxy reports for attempts
// that failed because their backend is shutting down gracefully (the
// proxy's Draining interface, matched by shape: director does not import
// proxy).
type draining interface {
	error
	Draining() bool
}

// unanswered is implemented by the errors the proxy reports for attempts
// that their route's timeout ended unanswered (the proxy's Unanswered
// interface, matched by shape like draining).
type unanswered interface {
	error
	Unanswered() bool
}

// classify maps the error a done call received to an outcome.
// DeadlineExceeded and Canceled are neutral because the client's deadline or
// cancellation, not the backend, usually causes them; counting them would
// let one impatient client eject a healthy backend. A route's timeout
// that the backend let pass without answering at all is the operator's
// bound, not a client's: it counts as a failure (unanswered).
func classify(err error) outcome {
	if err == nil {
		return outcomeReachable
	}
	var un unanswered
	if errors.As(err, &un) && un.Unanswered() {
		return outcomeUnreachable
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return outcomeNeutral
	}
	// A backend restarting gracefully announced it (the proxy's Draining
	// errors): it is drained, not punished, so that it is picked again as
	// soon as it is back (Kubernetes rolling restarts).
	var dr draining
	if errors.As(err, &dr) && dr.Draining() {
		return outcomeNeutral
	}
	switch status.Code(err) {
	case codes.Unavailable:
		return outcomeUnreachable
	case codes.Canceled, codes.DeadlineExceeded:
		return outcomeNeutral
	}
	return outcomeReachable
}

// cancelled reports whether err ended a call as CANCELLED (or
// context.Canceled): the client gave up on it or went away, or the proxy
// did not use the pick (the proxy's "not used" errors). Such a call is
// neither a success nor a failure of its backend in [BackendStats]: a
// client cancelling its calls must not paint a healthy backend as failing
// (Envoy counts downstream resets against no upstream either), as
// classify makes them neutral for outlier ejection.
func cancelled(err error) bool {
	return errors.Is(err, context.Canceled) || status.Code(err) == codes.Canceled
}

// connectionFailure is implemented by the errors the proxy reports for
// attempts whose backend connection could not be opened or was lost (the
// proxy's ConnectionFailure interface, matched by shape like draining).
type connectionFailure interface {
	error
	ConnectionFailed() bool
}

// isConnectionFailure reports whether err says the backend could not be
// reached at the connection level; see uneject.go.
func isConnectionFailure(err error) bool {
	var cf connectionFailure
	return errors.As(err, &cf) && cf.ConnectionFailed()
}

// observe feeds one stream outcome of b to outlier detection. It is called
// from done, concurrently and without locks; the outcome that completes a
// run of [Config.EjectAfter] failures hands the ejection to Run. connFail
// says an unreachable outcome was a connection failure; the run of those
// at the end of a run of failures decides whether the ejection may end
// early with a handshake (see uneject.go).
func (d *Director) observe(b *backend, o outcome, connFail bool) {
	if d.outlier.ejectAfter == 0 {
		return
	}
	c := b.ctr
	switch o {
	case outcomeReachable:
		// Load first: most outcomes are successes of a healthy backend,
		// and a store would bounce the cache line between cores.
		if c.consecutive.Load() != 0 {
			c.consecutive.Store(0)
		}
		if c.connRun.Load() != 0 {
			c.connRun.Store(0)
		}
	case outcomeUnreachable:
		if connFail {
			c.connRun.Add(1)
		} else if c.connRun.Load() != 0 {
			c.connRun.Store(0)
		}
		// Add hands each count to exactly one caller, so one call per run
		// sees the threshold.
		if n := c.consecutive.Add(1); n == d.outlier.ejectAfter {
			c.ejectConnRun.Store(c.connRun.Load())
			c.ejectPending.Store(true)
			d.kick()
		}
	}
}

// ejectLocked decides the ejection of b, whose counters were marked
// ejectPending after a run of failures, and reports whether the set's
// state changed (b ejected, or expired ejections restored on the way), so
// that the caller publishes. b is not ejected if it is already, or if the
// max-ejection cap forbids it. Caller must hold mu; only reconcile calls
// it.
//
// The ejection lasts BaseEjection times the backend's multiplier, at most
// MaxEjection. The multiplier grows by one per ejection and decays, like
// Envoy's, by one for every BaseEjection the backend spent back in the set
// since its last ejection ended; the decay is applied lazily here, when the
// next ejection is decided. So a backend that fails again at once is
// ejected for 10s, 20s, 30s, …, and one that stays up for long enough
// starts again at 10s.
func (d *Director) ejectLocked(all []*backend, b *backend, now time.Time) bool {
	c := b.ctr
	failures := d.outlier.ejectAfter
	// Start a new run whatever happens, as Envoy does: a backend the cap
	// keeps in is reconsidered after another full run, not every failure.
	c.consecutive.Store(0)
	c.connRun.Store(0)
	connRun := c.ejectConnRun.Swap(0)
	if !c.ejectedUntil.IsZero() {
		// Streams picked before the ejection are still ending.
		return false
	}

	restored := d.restoreExpiredLocked(all, now)
	ejected, healthyOthers := 0, 0
	for _, x := range all {
		switch {
		case !x.ctr.ejectedUntil.IsZero():
			ejected++
		case x.ctr != c && !x.ctr.unhealthy:
			healthyOthers++
		}
	}
	total := len(all)
	// Never eject the last pickable backend, nor the last healthy one:
	// publishing would restore another at once.
	lastHealthy := !c.unhealthy && healthyOthers == 0
	if ejected+1 >= total || (ejected+1)*100 > total*d.outlier.maxPercent || lastHealthy {
		// Logging every refused run would flood the log while most of the
		// set is down, so warn once per backend until the ejected set
		// changes.
		level := slog.LevelWarn
		if c.capWarned == d.ejectEpoch+1 {
			level = slog.LevelDebug
		}
		c.capWarned = d.ejectEpoch + 1
		d.logger.Log(context.Background(), level, "backend not ejected: max ejection percent reached",
			"backend", b.addr, "failures", failures, "ejected", ejected, "backends", total,
			"max_ejection_percent", d.outlier.maxPercent)
		return restored
	}

	m := c.multiplier
	if !c.restoredAt.IsZero() {
		m -= int(min(now.Sub(c.restoredAt)/d.outlier.base, time.Duration(m)))
	}
	m = min(m+1, d.outlier.maxMultiplier)
	dur := min(d.outlier.base*time.Duration(m), d.outlier.max)
	c.multiplier = m
	c.ejectedUntil = now.Add(dur)
	c.ejectReason = fmt.Sprintf("ejected for %v after %d calls in a row ended UNAVAILABLE", dur, failures)
	// The failures that ended the run were connection failures: a new
	// connection that completes its handshake disproves them, so the
	// ejection may end early (uneject.go). Only a first ejection: one
	// that follows soon after the last ended (multiplier above 1) runs
	// its full time, so a backend that accepts connections and then
	// fails its calls costs a run of failures per ejection, not per probe.
	c.reconnectProbe = connRun > 0 && m == 1
	c.ejections.Add(1)
	d.ejectEpoch++
	if c.reconnectProbe {
		d.logger.Info("backend ejected", "backend", b.addr, "failures", failures, "duration", dur,
			"probe", "until a new connection completes its handshake")
	} else {
		d.logger.Info("backend ejected", "backend", b.addr, "failures", failures, "duration", dur)
	}
	return true
}

// restoreExpiredLocked restores the backends of bs whose ejection has
// ended by now, and reports whether there were any. Caller must hold mu.
func (d *Director) restoreExpiredLocked(bs []*backend, now time.Time) bool {
	restored := false
	for _, b := range bs {
		if c := b.ctr; !c.ejectedUntil.IsZero() && !now.Before(c.ejectedUntil) {
			d.restoreLocked(b, now)
			d.logger.Info("backend restored", "backend", b.addr)
			restored = true
		}
	}
	return restored
}

// restoreLocked ends b's ejection. The run of failures is reset: outcomes
// of streams picked before the ejection and ended during it say nothing
// about the backend now. Caller must hold mu.
func (d *Director) restoreLocked(b *backend, now time.Time) {
	c := b.ctr
	c.ejectedUntil = time.Time{}
	c.reconnectProbe = false
	c.restoredAt = now
	c.consecutive.Store(0)
	c.connRun.Store(0)
	c.ejectPending.Store(false)
	d.ejectEpoch++
}
