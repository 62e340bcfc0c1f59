package director

import (
	"cmp"
	"slices"
	"sync/atomic"
	"time"
)

// counters are the long-lived per-backend counters. One instance exists per
// address for as long as the address stays in the set; snapshots and
// outstanding done functions point at it. Make them with newCounters.
type counters struct {
	// inflight counts the backend's picked streams whose done has not
	// been called. Unlike the rest, it is not the address's for as long
	// as it stays in the set, but for as long as calls run on it: an
	// address that leaves the set with calls in flight and comes back
	// before they end (a DNS answer without it, a registry blip; the
	// proxy keeps those calls running) gets its count back, so that
	// least_request and peak_ewma count the calls still on it
	// (Director.departed). Hence a pointer, shared by the counters of
	// the address's stays in the set: to own, or to the own of the
	// counters of its stay that the calls began in. own is inline, so
	// that the count shares the cache line of the other counters a pick
	// and its done touch, as before it was a pointer: allocated apart,
	// the 8-byte counts of a set's backends shared one line, which the
	// cores' picks bounced between them (BenchmarkPick with least_request
	// over 3 backends: 1.3x the time per pick).
	inflight  *atomic.Int64
	own       atomic.Int64
	successes atomic.Int64
	failures  atomic.Int64
	// consecutive counts Unavailable outcomes since the last outcome that
	// showed the backend reachable; see observe.
	consecutive atomic.Int64
	// connRun counts the connection failures (see isConnectionFailure)
	// at the end of the current run of Unavailable outcomes.
	connRun atomic.Int64
	// ejectConnRun is connRun when the run reached EjectAfter, taken by
	// the outcome that set ejectPending: what the ejection decides on.
	// Outcomes observed after it, before Run decides (a call that ended
	// well on the backend just before it died, reported late), must
	// not change what the run that ejects it said.
	ejectConnRun atomic.Int64
	// ejections counts ejections since the address joined the set.
	ejections atomic.Int64
	// ejectPending is set by the done call that completes a run of
	// failures and cleared by Run, which decides on the ejection; see
	// outlier.go.
	ejectPending atomic.Bool
	// latency is the peak EWMA estimate; used by PeakEWMA only.
	latency ewma

	// The state below is guarded by Director.mu.

	// ejectedUntil is when the current ejection ends; zero if the backend
	// is not ejected.
	ejectedUntil time.Time
	// reconnectProbe says the current ejection followed connection
	// failures, so it ends early once a new connection to the backend
	// completes its HTTP/2 handshake; see uneject.go.
	reconnectProbe bool
	// multiplier scales the next ejection's length; see Director.eject.
	multiplier int
	// restoredAt is when the last ejection ended; zero if never ejected.
	restoredAt time.Time
	// capWarned is Director.ejectEpoch+1 when the max ejection percent last
	// kept this backend in, so that is logged at Warn once per epoch.
	capWarned uint64
	// unhealthy is the verdict of active health checks; see health.go.
	unhealthy bool
	// unhealthyReason and ejectReason say why, for BackendStats.Reason.
	unhealthyReason, ejectReason string
	// slowStartAt is when the backend's slow-start window began; zero if
	// it is not (or no longer) slow-starting. See slowstart.go.
	slowStartAt time.Time
}

// newCounters returns fresh counters with an in-flight count of their own.
func newCounters() *counters {
	c := new(counters)
	c.inflight = &c.own
	return c
}

// backend is one address as seen by one snapshot. It is immutable; only the
// counters it points at change.
type backend struct {
	addr      string
	weight    uint32 // at least 1
	ctr       *counters
	ejected   bool // excluded from the snapshot's ready list
	probe     bool // ejected, and Run probes it with handshakes (uneject.go)
	unhealthy bool // excluded from the ready list, unless in panic mode
	// ejectedUntil and reason copy the counters' state when the snapshot
	// was built, for Backends.
	ejectedUntil time.Time
	reason       string
	// slowSince is the start of the backend's slow-start window in Unix
	// nanoseconds of Config.Now, or 0 if it was not slow-starting when the
	// snapshot was built. slowFactor is the slow-start factor then, in
	// (0, 1]; 1 if not slow-starting.
	slowSince  int64
	slowFactor float64
}

// snapshot is an immutable view of the backend set that Pick reads without
// locking. A new one is built for every change and published atomically;
// nothing in it changes after that, only the counters its backends point
// at.
type snapshot struct {
	// all holds every backend, sorted by addr.
	all []*backend
	// ready holds the backends the picker chooses from, sorted by addr:
	// the healthy, unejected ones, or in panic mode every unejected one.
	// It is empty only if the whole set is.
	ready []*backend
	// picker is the policy's picker over ready; nil if ready is empty.
	picker picker
	// healthy reports that ready holds a backend that is healthy and not
	// ejected, that is, the snapshot is not in panic mode and not empty.
	healthy bool
	// rebuildAt is when the snapshot goes stale, in nanoseconds of
	// monoNanos, or 0 if never: the earliest end of an ejection or of a
	// slow-start step. Run's timer rebuilds it then.
	rebuildAt int64
}

// emptySnapshot is the set before the first update. Shared and read-only.
var emptySnapshot = &snapshot{}

// sortBackends sorts bs by address in place.
func sortBackends(bs []*backend) {
	slices.SortFunc(bs, func(a, b *backend) int { return cmp.Compare(a.addr, b.addr) })
}

// findBackend returns the backend with address addr in bs, which is sorted
// by address, or nil.
func findBackend(bs []*backend, addr string) *backend {
	i, ok := slices.BinarySearchFunc(bs, addr, func(b *backend, addr string) int { return cmp.Compare(b.addr, addr) })
	if !ok {
		return nil
	}
	return bs[i]
}

// cloneBackends returns fresh copies of bs for publishLocked, which sets
// their derived fields; published backends are immutable.
func cloneBackends(bs []*backend) []*backend {
	out := make([]*backend, len(bs))
	for i, b := range bs {
		out[i] = &backend{addr: b.addr, weight: b.weight, ctr: b.ctr}
	}
	return out
}

// minTime returns the earlier of two Unix-nanosecond times, where 0 means
// none.
func minTime(a, b int64) int64 {
	if a == 0 || (b != 0 && b < a) {
		return b
	}
	return a
}

// publishLocked builds a snapshot from bs and stores it. bs are fresh
// backends, which publishLocked takes over. It sorts them, restores
// ejections that have run out, makes sure a backend is pickable if any
// exists and that at most MaxEjectionPercent of bs is ejected, ends
// slow-start windows that have passed, sets the derived fields
// and has the policy build the picker. It wakes Run, whose timer follows
// the new snapshot's rebuildAt. Caller must hold mu.
func (d *Director) publishLocked(bs []*backend, now time.Time) *snapshot {
	sortBackends(bs)
	d.restoreExpiredLocked(bs, now)
	d.ensurePickableLocked(bs, now)
	d.capEjectionsLocked(bs, now)

	var rebuildAt int64
	ready := make([]*backend, 0, len(bs))
	healthy := 0
	for _, b := range bs {
		c := b.ctr
		b.ejected = !c.ejectedUntil.IsZero()
		b.probe = b.ejected && c.reconnectProbe
		b.unhealthy = c.unhealthy
		b.ejectedUntil, b.reason = c.ejectedUntil, ""
		switch {
		case b.ejected && b.unhealthy:
			b.reason = c.ejectReason + "; " + c.unhealthyReason
		case b.ejected:
			b.reason = c.ejectReason
		case b.unhealthy:
			b.reason = c.unhealthyReason
		}
		b.slowSince, b.slowFactor = 0, 1
		if b.ejected {
			rebuildAt = minTime(rebuildAt, monoNanos(c.ejectedUntil))
		}
		if !c.slowStartAt.IsZero() {
			if f, next, ok := d.slowStartStep(c.slowStartAt, now); ok {
				b.slowSince, b.slowFactor = c.slowStartAt.UnixNano(), f
				rebuildAt = minTime(rebuildAt, monoNanos(next))
			} else {
				c.slowStartAt = time.Time{}
			}
		}
		if !b.ejected && !b.unhealthy {
			ready = append(ready, b)
			healthy++
		}
	}
	s := &snapshot{all: bs, healthy: healthy > 0, rebuildAt: rebuildAt}
	panicking := healthy == 0 && len(bs) > 0
	if panicking {
		// Panic mode, as Envoy's: with no healthy backend, the checks are
		// more likely wrong than every backend down, and failing every
		// stream is the worst outcome. ensurePickableLocked left at least
		// one backend unejected.
		for _, b := range bs {
			if !b.ejected {
				ready = append(ready, b)
			}
		}
	}
	d.logPanicLocked(panicking, len(bs))
	s.ready = ready
	if len(ready) > 0 {
		anySlow := false
		for _, b := range ready {
			if b.slowSince != 0 {
				anySlow = true
				break
			}
		}
		s.picker = d.builder.build(ready, anySlow)
	}
	d.snap.Store(s)
	d.kick()
	return s
}

// ensurePickableLocked restores ejected backends early when that is the
// only way to have a pickable one. eject never ejects the last pickable
// backend, but the set can shrink to only ejected ones, or health can
// change under an ejection. Then the ejection that would end first ends
// now, preferring healthy backends: sending streams to a suspect backend
// beats failing them all. Caller must hold mu.
func (d *Director) ensurePickableLocked(bs []*backend, now time.Time) {
	var firstHealthy, firstAny *backend
	unejected := false
	for _, b := range bs {
		c := b.ctr
		if c.ejectedUntil.IsZero() {
			if !c.unhealthy {
				return // a healthy backend is pickable
			}
			unejected = true // pickable in panic mode
			continue
		}
		if !c.unhealthy && (firstHealthy == nil || c.ejectedUntil.Before(firstHealthy.ctr.ejectedUntil)) {
			firstHealthy = b
		}
		if firstAny == nil || c.ejectedUntil.Before(firstAny.ctr.ejectedUntil) {
			firstAny = b
		}
	}
	first := firstHealthy
	if first == nil && !unejected {
		// No healthy backend at all, and every one ejected: panic mode
		// needs one back.
		first = firstAny
	}
	if first != nil {
		d.restoreLocked(first, now)
		d.logger.Info("backend restored early: no other backend is pickable", "backend", first.addr)
	}
}

// capEjectionsLocked restores ejected backends early, those whose
// ejection would end first, while more than MaxEjectionPercent of bs are
// ejected. ejectLocked keeps new ejections within the cap, but the set can
// shrink under ejected backends. Caller must hold mu.
func (d *Director) capEjectionsLocked(bs []*backend, now time.Time) {
	for {
		var first *backend
		ejected := 0
		for _, b := range bs {
			if c := b.ctr; !c.ejectedUntil.IsZero() {
				ejected++
				if first == nil || c.ejectedUntil.Before(first.ctr.ejectedUntil) {
					first = b
				}
			}
		}
		if ejected*100 <= len(bs)*d.outlier.maxPercent {
			return
		}
		d.restoreLocked(first, now)
		d.logger.Info("backend restored early: more than max ejection percent of the set ejected", "backend", first.addr,
			"ejected", ejected, "backends", len(bs), "max_ejection_percent", d.outlier.maxPercent)
	}
}

// logPanicLocked logs entering and leaving panic mode. Caller must hold mu.
func (d *Director) logPanicLocked(panicking bool, backends int) {
	if panicking == d.panicking {
		return
	}
	d.panicking = panicking
	if panicking {
		d.logger.Warn("no healthy backend; picking among all backends", "backends", backends, "policy", d.policyName)
	} else {
		d.logger.Info("healthy backends available again", "policy", d.policyName)
	}
}

// monoEpoch anchors monoNanos. It is set once and never swapped.
var monoEpoch = time.Now()

// monoNanos turns t into nanoseconds since monoEpoch, on the monotonic
// clock when t carries a reading (time.Now's do), so a wall-clock step
// (NTP, a resumed VM) neither stalls an ejection's end nor makes every
// Pick rebuild. Times from a fake clock have no monotonic reading and
// compare by wall time, consistently.
func monoNanos(t time.Time) int64 { return t.Sub(monoEpoch).Nanoseconds() }

// call tracks one picked stream. Its done method is the function Pick hands
// out; the flag makes repeated calls harmless, as grpc-go's PickResult.Done
// contract tolerates misbehaving callers.
type call struct {
	d        *Director
	b        *backend
	start    int64 // Unix nanoseconds of the pick; set for PeakEWMA only
	finished atomic.Bool
}

// done records the end of the stream: the first call decrements in-flight,
// counts err (nil is a success, a cancel neither: see cancelled), feeds it to the latency estimate and
// outlier detection, and asks for re-resolution on Unavailable; later calls
// do nothing. The backend may have left the set since; then the update
// lands on counters nobody reads, which is harmless, and outlier detection
// ignores it.
func (c *call) done(err error) {
	if c.finished.Swap(true) {
		return
	}
	d := c.d
	ctr := c.b.ctr
	ctr.inflight.Add(-1)
	switch {
	case err == nil:
		ctr.successes.Add(1)
	case !cancelled(err):
		ctr.failures.Add(1)
	}
	if d.ewma != nil {
		d.ewma.observe(ctr, c.start, d.now().UnixNano(), err)
	}
	o := classify(err)
	if o == outcomeUnreachable && d.resolveNow != nil {
		d.resolveNow()
	}
	d.observe(c.b, o, o == outcomeUnreachable && isConnectionFailure(err))
}
