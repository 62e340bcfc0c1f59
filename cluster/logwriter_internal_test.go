package cluster

import (
	"bytes"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

// gateWriter blocks every Write until open is closed, telling entered
// about the first Write, and keeps what it was given.
type gateWriter struct {
	entered chan struct{} // closed when the first Write starts
	open    chan struct{} // closed by the test to let Writes through
	once    sync.Once

	mu  sync.Mutex
	out bytes.Buffer
}

func newGateWriter() *gateWriter {
	return &gateWriter{entered: make(chan struct{}), open: make(chan struct{})}
}

func (g *gateWriter) Write(p []byte) (int, error) {
	g.once.Do(func() { close(g.entered) })
	<-g.open
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.out.Write(p)
}

func (g *gateWriter) String() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.out.String()
}

// line is a 100-byte log line numbered i.
func line(i int) []byte {
	s := fmt.Sprintf("line %04d ", i)
	return []byte(s + strings.Repeat("x", 99-len(s)) + "\n")
}

// TestLogWriterBlocked: with the writer stuck, Write neither blocks nor
// queues more than the bound; the lines over it are dropped and counted,
// and reported once the writer takes lines again; Close flushes.
func TestLogWriterBlocked(t *testing.T) {
	g := newGateWriter()
	lw := NewLogWriter(g, 1000, nil)
	lw.Write(line(0))
	<-g.entered // writeLoop is stuck writing line 0, which still counts
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 1; i <= 50; i++ {
			lw.Write(line(i))
		}
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Write blocked on a stuck writer")
	}
	lw.mu.Lock()
	queued, buffered := lw.queued, len(lw.buf)
	lw.mu.Unlock()
	if queued > 1000 || buffered > 1000 {
		t.Errorf("queued %d bytes (%d not yet taken), want at most the bound, 1000", queued, buffered)
	}
	if got := lw.Dropped(); got != 41 {
		t.Errorf("Dropped() = %d, want 41 (lines 10..50)", got)
	}
	close(g.open)
	lw.Close()
	out := g.String()
	var want strings.Builder
	for i := 0; i <= 9; i++ {
		want.Write(line(i))
	}
	want.WriteString("streamlb: log writer fell behind; 41 lines dropped\n")
	if out != want.String() {
		t.Errorf("written:\n%s\nwant:\n%s", out, want.String())
	}
	if got := lw.Dropped(); got != 0 {
		t.Errorf("Dropped() = %d after the notice, want 0", got)
	}
}

// TestLogWriterFlushOnClose: every line written before Close is out when
// Close returns, in order, and lines after it are dropped.
func TestLogWriterFlushOnClose(t *testing.T) {
	g := newGateWriter()
	close(g.open)
	lw := NewLogWriter(g, 0, nil)
	var want strings.Builder
	for i := range 2000 {
		lw.Write(line(i))
		want.Write(line(i))
	}
	lw.Close()
	if out := g.String(); out != want.String() {
		t.Errorf("after Close, %d bytes written, want the %d written to the LogWriter", len(out), want.Len())
	}
	lw.Write([]byte("late\n"))
	lw.Close()
	if strings.Contains(g.String(), "late") {
		t.Error("a line written after Close went out")
	}
}

// TestLogWriterCloseStuck: Close gives up on a writer that never takes
// its lines after FlushTimeout.
func TestLogWriterCloseStuck(t *testing.T) {
	g := newGateWriter()
	lw := NewLogWriter(g, 0, nil)
	lw.FlushTimeout = 50 * time.Millisecond
	lw.Write(line(0))
	<-g.entered
	start := time.Now()
	lw.Close()
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Close took %v on a stuck writer, want about its FlushTimeout", d)
	}
	close(g.open) // let writeLoop end, for the leak check
	<-lw.done
}
