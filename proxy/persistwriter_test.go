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

// idleOwner is a writerOwner with nothing to write, whose streamsLocked,
// which writeStep calls under mu after it freed toRelease, runs during.
type idleOwner struct{ during func() }

func (o *idleOwner) openLocked(batch []writeOp) []writeOp { return batch }
func (o *idleOwner) sentLastLocked(*sendQueue, bool)      {}
func (o *idleOwner) idleLocked() bool                     { return false }
func (o *idleOwner) writerFinished(error)                 {}
func (o *idleOwner) streamsLocked() bool {
	if o.during != nil {
		o.during()
		o.during = nil
	}
	return false
}

// TestOnDemandWriterExitFreesReleases: a buffer released while the
// on-demand writer runs goes to toRelease, which the writer frees at the
// start of its next step. Released after that step began (a client's
// RST_STREAM dropping a queue whose DATA waited for window, while the
// writer found nothing else to write), it was left there when the writer
// exited (wIdle) or was reaped: until a later write on the connection, or
// its close. A view pins its backend's read buffer meanwhile, and 32
// such pins turn views off for the process (readref.go).
func TestOnDemandWriterExitFreesReleases(t *testing.T) {
	a, b := tcpPair(t)
	t.Cleanup(func() { a.Close(); b.Close() })
	var tr transport
	tr.init(defaultInitialWindowRFC, defaultInitialWindowRFC, 1<<20, slog.New(slog.DiscardHandler))
	tr.attach(a)
	var mem bufBudget
	q := sendQueue{mem: &mem}
	q.pushData(make([]byte, 100), false)
	tr.owner = &idleOwner{during: func() { q.drop(&tr) }} // mu is held
	tr.wstate.Store(wRunning)                             // as signal does before it starts the writer
	tr.runWriter()                                        // nothing to write, no stream: it exits
	if st := tr.wstate.Load(); st != wIdle {
		t.Fatalf("writer state %d after it exited, want wIdle (%d)", st, wIdle)
	}
	tr.mu.Lock()
	left := len(tr.toRelease)
	tr.mu.Unlock()
	if left != 0 {
		t.Fatalf("the writer exited with %d released buffers in toRelease", left)
	}
}
