package loadtest

import (
	"errors"
	"fmt"
	"math"
	"strconv"
)

// BalanceError is returned by CheckBalance when a backend's share of the
// calls is further from an even share than allowed.
type BalanceError struct {
	// Backend is the name of the backend furthest from an even share. For
	// an expected backend that got no calls at all it is a placeholder such
	// as "#3 of 3 (no calls)".
	Backend string
	// Share is the backend's share of the calls, in percent.
	Share float64
	// Even is the even share, 100/N, in percent.
	Even float64
	// Allowed is the allowed deviation, in percentage points.
	Allowed float64
}

func (e *BalanceError) Error() string {
	return fmt.Sprintf("balance assertion failed: backend %s got %.1f%% (even share %.1f%%, allowed ±%s)",
		e.Backend, e.Share, e.Even, strconv.FormatFloat(e.Allowed, 'f', -1, 64))
}

// CheckBalance checks that every backend got an even share of the calls, to
// within pct percentage points. The even share is 100/N, where N is expect
// if it is positive and otherwise the number of backends seen; with expect
// larger than the number seen, the missing backends count as having 0%.
// Calls attributed to UnknownBackend are part of the total (so they lower
// every share) but UnknownBackend is not a backend.
//
// It returns a *BalanceError naming the backend furthest off, or another
// error when there is nothing to judge (no calls attributed to a backend)
// or pct is negative.
func (r *Result) CheckBalance(pct float64, expect int) error {
	if pct < 0 || math.IsNaN(pct) {
		return fmt.Errorf("balance assertion: allowed deviation must be a non-negative number of percentage points, got %v", pct)
	}
	var named []Backend
	for _, b := range r.Backends {
		if b.Name != UnknownBackend && b.Calls > 0 {
			named = append(named, b)
		}
	}
	if len(named) == 0 {
		return errors.New("balance assertion failed: no call was attributed to a backend")
	}
	n := len(named)
	if expect > 0 {
		n = expect
	}
	even := 100 / float64(n)
	var worst *BalanceError
	consider := func(name string, share float64) {
		dev := math.Abs(share - even)
		if dev <= pct+1e-9 {
			return
		}
		if worst == nil || dev > math.Abs(worst.Share-even) {
			worst = &BalanceError{Backend: name, Share: share, Even: even, Allowed: pct}
		}
	}
	for _, b := range named {
		consider(b.Name, b.Share)
	}
	for i := len(named); i < n; i++ {
		consider(fmt.Sprintf("#%d of %d (no calls)", i+1, n), 0)
	}
	if worst != nil {
		return worst
	}
	return nil
}

// ErrorRateError is returned by CheckErrorRate when too many calls failed.
type ErrorRateError struct {
	// Rate is the percentage (0..100) of calls that failed.
	Rate float64
	// Errors and Count are the failed calls and all calls.
	Errors, Count uint64
	// Allowed is the highest rate allowed, in percent.
	Allowed float64
}

func (e *ErrorRateError) Error() string {
	return fmt.Sprintf("error rate assertion failed: %d of %d calls failed (%.2f%%, allowed %s%%)",
		e.Errors, e.Count, e.Rate, strconv.FormatFloat(e.Allowed, 'f', -1, 64))
}

// CheckErrorRate checks that at most pct percent (0..100) of the calls
// failed, counting the calls as ghz does (Result.Count, Result.Errors). A
// run that made no calls fails the check, since it showed nothing.
//
// It returns an *ErrorRateError when the rate is above pct, another error
// when no call was made or pct is not in 0..100.
func (r *Result) CheckErrorRate(pct float64) error {
	if pct < 0 || pct > 100 || math.IsNaN(pct) {
		return fmt.Errorf("error rate assertion: allowed rate must be a percentage from 0 to 100, got %v", pct)
	}
	if r.Count == 0 {
		return errors.New("error rate assertion failed: no call was made")
	}
	rate := 100 * float64(r.Errors) / float64(r.Count)
	if rate > pct+1e-9 {
		return &ErrorRateError{Rate: rate, Errors: r.Errors, Count: r.Count, Allowed: pct}
	}
	return nil
}
