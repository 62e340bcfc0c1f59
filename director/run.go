package director

import (
	"context"
	"errors"
	"sync"
	"time"
)

// Run is the director's own goroutine: it decides the ejections that done
// calls hand it, ends ejections and advances slow-start steps on a timer,
// and runs the active health checks of [Config.HealthCheckInterval]. It
// blocks until ctx is cancelled, then returns nil; the caller decides
// whether to run it in a goroutine. Everything that rebuilds a snapshot
// because time passed or a stream failed happens here, so Pick and done
// never wait for a rebuild (grpc-go's pickers and its outlierdetection
// balancer's interval timer are the model).
//
// With health checks enabled, Run starts a checker goroutine and a client
// connection for every backend of the current set, and stops them when
// their backend leaves the set ([Director.UpdateState] wakes Run); a
// passing check ends an ejection at once. Without them, Run starts a
// reconnect prober for each backend ejected after connection failures,
// which ends the ejection once a handshake with it completes (see
// uneject.go). When Run returns, every goroutine it started has exited
// and every connection is closed, and the backends it had found unhealthy count as healthy again,
// as nothing checks them any more.
//
// Without Run, Pick still works over the sets UpdateState gives it, but
// backends are never ejected, ejections never end and slow start stays at
// its first step. Run returns an error if another Run of the same Director
// is running.
func (d *Director) Run(ctx context.Context) error {
	if !d.running.CompareAndSwap(false, true) {
		return errors.New("director: Run is already running")
	}
	defer d.running.Store(false)

	var wg sync.WaitGroup
	checkers := make(map[string]checker)
	probers := make(map[string]prober)
	defer func() {
		for _, c := range checkers {
			c.cancel()
		}
		for _, p := range probers {
			p.cancel()
		}
		wg.Wait()
		d.forgetHealth()
	}()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		if d.health.interval > 0 {
			d.syncCheckers(ctx, &wg, checkers)
		}
		due := d.reconcile()
		if d.health.interval == 0 {
			d.syncProbers(ctx, &wg, probers)
		}
		timer.Stop()
		if due != 0 {
			timer.Reset(time.Duration(max(due-monoNanos(d.now()), 0)))
		}
		select {
		case <-ctx.Done():
			return nil
		case <-d.wake:
		case <-timer.C:
		}
	}
}

// reconcile decides the pending ejections and publishes a fresh snapshot if
// one was decided, or if the current snapshot has gone stale (an ejection
// has run out, or a slow-start step is due). It returns when the
// snapshot it leaves goes stale, in nanoseconds of monoNanos, or 0 if
// never. Only Run calls it, and tests in place of Run's timer.
func (d *Director) reconcile() (due int64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.now()
	cur := d.snap.Load()
	changed := cur.rebuildAt != 0 && monoNanos(now) >= cur.rebuildAt
	for _, b := range cur.all {
		if b.ctr.ejectPending.Swap(false) && d.ejectLocked(cur.all, b, now) {
			changed = true
		}
	}
	if changed {
		cur = d.publishLocked(cloneBackends(cur.all), now)
	}
	return cur.rebuildAt
}
