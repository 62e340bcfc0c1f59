package proxy

import (
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
)

// TestConcurrentGrowthWithinBudget: the backend streams of one client
// connection live on several backend connections, whose readers grow
// their windows (growLocked) each under its own lock, concurrently. The
// windows they grant together must stay within the client connection's
// budget (MaxConnBufferedBytes): the check against the budget and the
// count of the growth are one step. With the check in takeGrowth and the
// count (windows.Add) after it in the caller, two growths that read the
// windows before either counted its own both fitted, and the windows
// went past the budget by a growth each.
//
// A unit test of the accounting, driving growLocked and retireLocked as
// the backend readers do, one transport per goroutine: end to end, the
// growths of several backend connections line up in the same few
// nanoseconds too rarely to fail reliably.
func TestConcurrentGrowthWithinBudget(t *testing.T) {
	const (
		conns  = 2         // as many as run at once on a small machine
		w0     = 224 << 10 // initial backend stream window
		grow   = 64 << 10  // one growth: to w0+grow
		limit  = conns*w0 + grow
		rounds = 20000
	)
	// The initial windows of one stream per backend connection leave
	// room for exactly one growth; the response share (limit/4, two
	// growths) is not what binds. Each round every connection grows its stream at once
	// (a spinning barrier lines them up), then all retire.
	b := &bufBudget{limit: limit}
	b.drained.Store(1 << 62) // every growth has fresh drain evidence
	var arrived atomic.Int64
	barrier := func(n int64) {
		arrived.Add(1)
		for spins := 0; arrived.Load() < n; spins++ {
			if spins > 1000 {
				runtime.Gosched() // the other is not running: let it
			}
		}
	}
	var over, overRounds atomic.Int64
	var wg sync.WaitGroup
	for range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tr := &transport{streamWindow: w0, maxStreamWindow: w0 + grow}
			for i := range int64(rounds) {
				r := &recvState{target: w0, grow: b}
				tr.openWindowLocked(r)
				barrier((3*i + 1) * conns)
				tr.growLocked(r, r.target)
				barrier((3*i + 2) * conns)
				if w := b.windows.Load(); w > limit {
					overRounds.Add(1)
					over.Store(w - limit)
				}
				barrier((3*i + 3) * conns)
				tr.retireLocked(r)
			}
		}()
	}
	wg.Wait()
	if n := overRounds.Load(); n > 0 {
		t.Errorf("in %d of %d rounds the windows of %d streams went past the %d-byte budget (by %d bytes)", n/conns, rounds, conns, limit, over.Load())
	}
	if w, g := b.windows.Load(), b.grown.Load(); w != 0 || g != 0 {
		t.Errorf("after all streams retired: windows %d, grown %d, want 0 and 0", w, g)
	}
}
