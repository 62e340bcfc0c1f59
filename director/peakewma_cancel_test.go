package director

import (
	"container/heap"
	"context"
	"math/rand/v2"
	"testing"
	"time"
)

// atkEvent is a done due at a fake-clock time.
type atkEvent struct {
	at   time.Time
	done func(error)
	err  error
}

type atkQueue []atkEvent

func (q atkQueue) Len() int           { return len(q) }
func (q atkQueue) Less(i, j int) bool { return q[i].at.Before(q[j].at) }
func (q atkQueue) Swap(i, j int)      { q[i], q[j] = q[j], q[i] }
func (q *atkQueue) Push(x any)        { *q = append(*q, x.(atkEvent)) }
func (q *atkQueue) Pop() any {
	old := *q
	x := old[len(old)-1]
	*q = old[:len(old)-1]
	return x
}

// TestAtkPeakEWMAHungBackendCancelled: backend "hung" never answers; every
// stream sent to it ends when the client gives up and cancels, 1s later.
// Backend "fast" answers in 10ms. PeakEWMA must send the hung backend only
// a small share (Linkerd/tower record the time a cancelled request was
// outstanding: a request dropped after 1s took at least 1s).
func TestAtkPeakEWMAHungBackendCancelled(t *testing.T) {
	clk := newFakeClock()
	d, err := New(Config{Policy: PeakEWMA, Logger: discardLogger(), Now: clk.Now,
		Rand: rand.New(rand.NewPCG(1, 2))})
	if err != nil {
		t.Fatal(err)
	}
	mustUpdate(t, d, state("fast:1", "hung:1"))
	var q atkQueue
	const picks = 12000 // one every 10ms: 120s
	counts := map[string]int{}
	for i := range picks {
		clk.Advance(10 * time.Millisecond)
		now := clk.Now()
		for q.Len() > 0 && !q[0].at.After(now) {
			e := heap.Pop(&q).(atkEvent)
			e.done(e.err)
		}
		addr, done, err := d.Pick(context.Background(), "/svc/M")
		if err != nil {
			t.Fatal(err)
		}
		if i >= picks/2 {
			counts[addr]++
		}
		if addr == "hung:1" {
			heap.Push(&q, atkEvent{at: now.Add(time.Second), done: done, err: errCanceled})
		} else {
			heap.Push(&q, atkEvent{at: now.Add(10 * time.Millisecond), done: done})
		}
	}
	t.Logf("second half: %v", counts)
	if share := float64(counts["hung:1"]) / float64(picks/2); share > 0.05 {
		t.Errorf("hung backend whose calls all end cancelled after 1s got %.0f%% of the picks, want under 5%%", share*100)
	}
}
