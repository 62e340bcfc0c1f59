package cluster

import (
	"fmt"
	"io"
	"sync"
	"time"
)

// DefaultLogBuffer is how many bytes of log lines a [LogWriter] holds
// while its writer is behind, unless set otherwise (--log-buffer).
const DefaultLogBuffer = 1 << 20

// DefaultLogFlushTimeout bounds how long [LogWriter.Close] waits for the
// lines still queued to be written.
const DefaultLogFlushTimeout = 2 * time.Second

// keepLogBatch is the largest batch buffer writeLoop keeps for the next
// batch.
const keepLogBatch = 64 << 10

// LogWriter hands what is written to it to another writer (the process's
// stderr) on a goroutine of its own, so that a log line never blocks its
// caller: a stderr pipe nobody reads (a stuck log collector) would
// otherwise stop every goroutine that logs, and with it the relay when a
// Warn is logged on the data path. Nginx and Envoy log asynchronously for
// the same reason.
//
// Each Write is taken as one line (a slog handler writes a record in one
// Write) and is copied. At most max bytes are queued, the lines being
// written included (the buffers holding them can reach about twice that); a Write that would go past it is dropped and counted,
// and once the writer has caught up with the lines queued before it, a
// line made by notice says how many were dropped. Write never fails and
// never blocks on the writer. Safe for concurrent use.
type LogWriter struct {
	w      io.Writer
	max    int
	notice func(dropped int64) []byte
	// FlushTimeout bounds Close's wait; zero means DefaultLogFlushTimeout.
	// Set it before the first Write.
	FlushTimeout time.Duration

	wake chan struct{} // capacity 1: a coalescing "something is queued"
	done chan struct{} // closed when writeLoop returns

	mu sync.Mutex
	// mu guards the fields below.
	buf     []byte // lines queued, not yet taken by writeLoop
	queued  int    // bytes in buf and in the batch writeLoop is writing
	dropped int64  // lines dropped since the last notice
	started bool
	closed  bool
}

// NewLogWriter returns a LogWriter writing to w and queueing at most max
// bytes (max <= 0 means DefaultLogBuffer). notice makes the line that
// reports dropped lines, in the log's format; nil gives a plain text line.
// It starts nothing: the goroutine that writes starts with the first
// Write, and Close ends it.
func NewLogWriter(w io.Writer, max int, notice func(dropped int64) []byte) *LogWriter {
	if max <= 0 {
		max = DefaultLogBuffer
	}
	if notice == nil {
		notice = func(n int64) []byte {
			return fmt.Appendf(nil, "streamlb: log writer fell behind; %d lines dropped\n", n)
		}
	}
	return &LogWriter{w: w, max: max, notice: notice, wake: make(chan struct{}, 1), done: make(chan struct{})}
}

// Write queues a copy of p, or drops it if max bytes are queued already or
// the writer is closed. It always returns len(p), nil.
func (l *LogWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	switch {
	case l.closed:
		l.dropped++
		l.mu.Unlock()
		return len(p), nil
	case l.queued+len(p) > l.max:
		l.dropped++
	default:
		l.buf = append(l.buf, p...)
		l.queued += len(p)
	}
	if !l.started {
		l.started = true
		go l.writeLoop()
	}
	l.mu.Unlock()
	select {
	case l.wake <- struct{}{}:
	default:
	}
	return len(p), nil
}

// Dropped returns how many lines were dropped and not yet reported.
func (l *LogWriter) Dropped() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.dropped
}

// writeLoop writes the queued lines, a batch at a time, holding no lock
// while it writes, then the notice of the lines dropped meanwhile.
func (l *LogWriter) writeLoop() {
	defer close(l.done)
	var batch []byte
	// torn: the last write failed in the middle of a line (a full disk
	// takes the bytes that fit, then fails with ENOSPC); the next write
	// first ends that line, so that the lines after it are whole.
	torn := false
	write := func(p []byte) {
		if torn {
			if _, err := l.w.Write(newline); err != nil {
				return // still no room: p is lost whole
			}
			torn = false
		}
		if n, err := l.w.Write(p); err != nil && n > 0 && p[n-1] != '\n' {
			torn = true
		}
	}
	for range l.wake {
		l.mu.Lock()
		batch, l.buf = l.buf, batch[:0]
		dropped, closed := l.dropped, l.closed
		l.dropped = 0
		l.mu.Unlock()
		if len(batch) > 0 {
			write(batch)
		}
		if dropped > 0 {
			write(l.notice(dropped))
		}
		l.mu.Lock()
		l.queued -= len(batch)
		l.mu.Unlock()
		if cap(batch) > keepLogBatch {
			batch = nil // what a burst grew is not kept while idle
		}
		if closed {
			return
		}
	}
}

// Close writes what is queued and ends the writing goroutine, waiting for
// it at most FlushTimeout: a writer that does not take the lines (the
// blocked pipe LogWriter exists for) is given up on, its goroutine left
// blocked in Write, for the process to exit anyway. Lines written after
// Close are dropped. Close always returns nil.
func (l *LogWriter) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	started := l.started
	l.mu.Unlock()
	if !started {
		return nil // nothing was written, nor dropped
	}
	select {
	case l.wake <- struct{}{}:
	default:
	}
	wait := l.FlushTimeout
	if wait <= 0 {
		wait = DefaultLogFlushTimeout
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-l.done:
	case <-t.C:
	}
	return nil
}
