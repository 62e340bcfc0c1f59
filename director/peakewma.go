package director

import (
	"context"
	"errors"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// peakEWMA is latency-aware P2C, after Finagle's PeakEwma and Linkerd's
// (tower's) balancer: sample backends as leastRequest does, and take the
// one with the lowest cost = latency estimate × (streams in flight + 1).
// The in-flight factor makes a backend that is fast but already busy less
// attractive, so traffic spreads before the estimates catch up.
//
// The estimate (see ewma) is fed by done: the time from Pick to done, on
// Config.Now. That is the stream's whole life, not the time to the first
// response byte as in Linkerd, so for long-lived streams it measures their
// duration, and the policy suits request/response traffic best.
type peakEWMA struct {
	p2c
	now     func() time.Time
	tau     float64 // Config.EWMADecay in nanoseconds
	penalty float64 // Config.FailurePenalty in nanoseconds
}

func newPeakEWMA(choices int, r randSource, now func() time.Time, slowStart, decay, penalty time.Duration) *peakEWMA {
	return &peakEWMA{
		p2c:     p2c{choices: choices, rand: r, slow: slowStarter{window: slowStart, now: now, rand: r}},
		now:     now,
		tau:     float64(decay),
		penalty: float64(penalty),
	}
}

func (p *peakEWMA) build(ready []*backend, _ bool) picker {
	return &peakEWMAPicker{p: p, ready: ready}
}

// peakEWMAPicker is one snapshot's peak EWMA choice.
type peakEWMAPicker struct {
	p     *peakEWMA
	ready []*backend
}

func (pp *peakEWMAPicker) pick(context.Context) *backend {
	if len(pp.ready) == 1 {
		return pp.ready[0]
	}
	return pp.p.pickBy(pp.ready, pp.p, pp.p.now().UnixNano())
}

// minEstimate floors the latency estimate in the cost, in nanoseconds, so
// that the in-flight count still tells backends apart when estimates have
// decayed to (nearly) zero.
const minEstimate = float64(time.Microsecond)

// load is the cost.
func (p *peakEWMA) load(b *backend, now int64) float64 {
	est := b.ctr.latency.estimate(now, p.tau)
	return max(est, minEstimate) * float64(b.ctr.inflight.Load()+1)
}

// observe feeds the outcome of one stream, picked at start and ended at
// end (Unix nanoseconds), to ctr's estimate. A success counts as its
// duration. Any other outcome except cancellation counts as at least
// Config.FailurePenalty, so that a backend that fails fast does not look
// fast: with the peak rule its estimate jumps to the penalty at once. A
// cancelled stream (status Canceled or context.Canceled) is not a
// latency, but its duration is a lower bound on one: it only counts as a
// peak, when it is above the estimate. So a cancel soon after the pick
// says nothing, while a backend that never answers, whose every stream
// ends when its client gives up, does not decay to looking fastest and
// draw all the traffic (tower's PeakEwma, after which Linkerd's, records
// a dropped request's time too).
func (p *peakEWMA) observe(ctr *counters, start, end int64, err error) {
	sample := float64(max(end-start, 0))
	if err != nil {
		if errors.Is(err, context.Canceled) || status.Code(err) == codes.Canceled {
			ctr.latency.raise(sample, end, p.tau)
			return
		}
		sample = max(sample, p.penalty)
	}
	ctr.latency.update(sample, end, p.tau)
}

// ewma is one backend's peak-sensitive, time-decaying latency estimate.
//
// Between samples the estimate decays toward zero with time constant tau:
// est(t) = val·exp(-(t-at)/tau). That makes a backend nobody has picked
// for a while look fast again, so it gets probed, as in Finagle and tower.
// A sample s at time t, with w = exp(-(t-at)/tau):
//   - above the decayed estimate replaces it at once (the peak rule: react
//     to slowness quickly);
//   - otherwise is blended in: val = est(t) + s·(1-w), so lower samples
//     pull the estimate down with time constant tau, however often they
//     come.
//
// Reading the decayed value is pure, so Pick reads it without locks;
// updates are serialised by mu. A reader racing an update may pair the new
// value with the old time or the other way round, which skews that one
// estimate slightly and is harmless.
type ewma struct {
	mu  sync.Mutex    // mu serialises update.
	val atomic.Uint64 // math.Float64bits of the estimate at time at, ns
	at  atomic.Int64  // Unix nanoseconds of Config.Now
}

// reset sets the estimate to v as of now.
func (e *ewma) reset(v time.Duration, now time.Time) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.at.Store(now.UnixNano())
	e.val.Store(math.Float64bits(float64(v)))
}

// estimate returns the estimate decayed to now, in nanoseconds.
func (e *ewma) estimate(now int64, tau float64) float64 {
	v := math.Float64frombits(e.val.Load())
	if dt := now - e.at.Load(); dt > 0 {
		v *= math.Exp(-float64(dt) / tau)
	}
	return v
}

// raise records s, in nanoseconds, taken at now, only if it is above the
// estimate decayed to now: a lower bound on a latency, which is a peak or
// says nothing.
func (e *ewma) raise(s float64, now int64, tau float64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	at := max(now, e.at.Load())
	if s <= e.estimate(at, tau) {
		return
	}
	e.at.Store(at)
	e.val.Store(math.Float64bits(s))
}

// update records sample s, in nanoseconds, taken at now.
func (e *ewma) update(s float64, now int64, tau float64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	at := e.at.Load()
	v := math.Float64frombits(e.val.Load())
	w := 1.0
	if now > at {
		w = math.Exp(-float64(now-at) / tau)
		// A done racing another may come in with an earlier now; keep
		// time monotonic and let its sample count only as a peak.
		e.at.Store(now)
	}
	if cur := v * w; s > cur {
		v = s
	} else {
		v = cur + s*(1-w)
	}
	e.val.Store(math.Float64bits(v))
}
