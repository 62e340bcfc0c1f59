package proxy

import (
	"io"
	"log/slog"
	"runtime"
	"sync/atomic"
	"testing"
	"time"
)

// TestEndQueueReleasesBurst: once a burst of ended calls that the hook
// fell behind has been delivered, the queue does not keep the slices the
// burst grew, as LogWriter does not keep a burst's buffer: deliverLoop
// swapped its slices of up to 65,536 CallInfos (about 200 bytes each)
// back and forth for ever, 13 MiB each live in a proxy that idles at 5
// MiB.
func TestEndQueueReleasesBurst(t *testing.T) {
	release := make(chan struct{})
	var got atomic.Int64
	q := newEndQueue(func(CallInfo) {
		<-release
		got.Add(1)
	})
	q.start(slog.New(slog.NewTextHandler(io.Discard, nil)))
	defer q.stop()
	heap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	before := heap()
	const n = maxPendingEnds
	for range n {
		q.push(CallInfo{Method: "/s/M", Backend: "127.0.0.1:1"})
	}
	close(release)
	deadline := time.Now().Add(20 * time.Second)
	for got.Load() < n && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got.Load() != n {
		t.Fatalf("the hook got %d calls, want %d", got.Load(), n)
	}
	q.push(CallInfo{Method: "/s/M"}) // one more batch, after the burst
	for got.Load() < n+1 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond) // deliverLoop back to waiting
	after := heap()
	if grown := int64(after) - int64(before); grown > 4<<20 {
		t.Errorf("the heap is %d bytes larger once the burst was delivered, want the queue's slices released (at most 4 MiB)", grown)
	}
}
