package proxy

import (
	"log/slog"
	"testing"
	"time"
)

// TestPersistentWriterGoneFreesReleases: once a backend connection's
// writer (writeLoop, the persistent writer) has exited, a buffer its
// queues let go of must go back to its pool at once. releaseLocked used to
// leave every such buffer in toRelease, for a writer that would never run
// again: the request bytes of the attempts failAll and retryOrFail
// discard after the connection ended (or that never left a connection
// whose dial failed) stayed there, counted in no budget, until the
// connection itself was collected.
func TestPersistentWriterGoneFreesReleases(t *testing.T) {
	a, b := tcpPair(t)
	t.Cleanup(func() { a.Close(); b.Close() })
	var tr transport
	tr.init(defaultInitialWindowRFC, defaultInitialWindowRFC, 1<<20, slog.New(slog.DiscardHandler))
	tr.usePersistentWriter()
	tr.attach(a)
	tr.close(errClosed)
	done := make(chan error, 1)
	go func() { done <- tr.writeLoop(nil) }() // a closed transport's writer never asks its role
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("writer did not exit")
	}
	var mem bufBudget
	q := sendQueue{mem: &mem}
	q.pushData(make([]byte, 100), false)
	tr.mu.Lock()
	q.drop(&tr) // as discardLocked after failAll
	left := len(tr.toRelease)
	tr.mu.Unlock()
	if left != 0 {
		t.Fatalf("after the writer exited, %d released buffers wait in toRelease for a writer that will not run", left)
	}
	if got := mem.used.Load(); got != 0 {
		t.Fatalf("budget %d after the drop, want 0", got)
	}
}
