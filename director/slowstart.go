package director

import (
	"math"
	"time"
)

// Slow start, after Envoy's (slow_start_config, aggression 1): a backend
// that joins a non-empty set, or becomes healthy again, gets a share of
// traffic that grows linearly over Config.SlowStart from
// SlowStartMinPercent of its weight.
//
// The window's start lives in counters.slowStartAt (under mu). Every
// snapshot build computes each backend's factor and schedules a rebuild
// for the next step (SlowStart/slowStartSteps later) or the window's end,
// whichever is first; the weighted policies recompute their schedules from
// the factors then. The P2C policies compute the factor at the pick
// instead (see slowSkip), so for them the ramp is smooth; the step
// rebuilds only end the window.

// slowStartSteps is how many times a slow-start window is re-evaluated for
// the weighted policies.
const slowStartSteps = 20

// slowStartScale is the weight unit while a backend slow-starts: effective
// weights are weight × slowStartScale × factor, so the factor has a
// resolution of 1%.
const slowStartScale = 100

// slowStartFactor returns the share of its weight a backend gets elapsed
// into a slow-start window of length window: elapsed/window, at least
// SlowStartMinPercent/100, and 1 from the window's end on.
func slowStartFactor(elapsed, window time.Duration) float64 {
	if elapsed >= window {
		return 1
	}
	return max(float64(max(elapsed, 0))/float64(window), SlowStartMinPercent/100.0)
}

// slowStartStep returns the slow-start factor at now of a window that
// began at start, and when the next step is due. ok is false once the
// window has passed (or if slow start is disabled).
func (d *Director) slowStartStep(start, now time.Time) (factor float64, next time.Time, ok bool) {
	elapsed := now.Sub(start)
	if d.slowStart <= 0 || elapsed >= d.slowStart {
		return 1, time.Time{}, false
	}
	end := start.Add(d.slowStart)
	next = now.Add(max(d.slowStart/slowStartSteps, 1))
	if end.Before(next) {
		next = end
	}
	return slowStartFactor(elapsed, d.slowStart), next, true
}

// effectiveWeights returns the weights the weighted policies pick bs by:
// each backend's weight (or 1 if useWeight is false) times its slow-start
// factor. Without slow start in bs they are the plain weights; with it,
// weights are scaled by slowStartScale so that factors survive rounding,
// and none is below 1.
func effectiveWeights(bs []*backend, useWeight bool) []uint64 {
	anySlow := false
	for _, b := range bs {
		if b.slowSince != 0 {
			anySlow = true
			break
		}
	}
	ws := make([]uint64, len(bs))
	for i, b := range bs {
		w := uint64(1)
		if useWeight {
			w = uint64(b.weight)
		}
		if anySlow {
			w = max(1, uint64(math.Round(float64(w)*slowStartScale*b.slowFactor)))
		}
		ws[i] = w
	}
	return ws
}

// slowStarter is the slow-start part of the P2C policies: they skip a
// slow-starting backend they picked with probability 1-factor and pick
// again, once.
type slowStarter struct {
	window time.Duration // Config.SlowStart; 0 disables
	now    func() time.Time
	rand   randSource
}

// slowSkipResolution is the granularity of the skip draw.
const slowSkipResolution = 1 << 20

// skip reports whether to skip b, which a P2C policy just picked. It draws
// randomness only for a backend that is slow-starting.
func (s slowStarter) skip(b *backend) bool {
	if b.slowSince == 0 || s.window <= 0 {
		return false
	}
	f := slowStartFactor(time.Duration(s.now().UnixNano()-b.slowSince), s.window)
	if f >= 1 {
		return false
	}
	return s.rand.IntN(slowSkipResolution) >= int(f*slowSkipResolution)
}
