package proxy

import (
	"bufio"
	"io"
	"sync"
)

// writeBufPool holds the writers' buffers. A connection takes one when it
// has frames to write and gives it back once they are flushed, as
// x/net/http2's bufferedWriter does: an idle connection holds none, which
// is most of what thousands of idle clients would otherwise cost.
var writeBufPool = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 32<<10) }}

// lazyWriter is a bufio.Writer on w whose buffer is only held between the
// first write and the flush that follows. Writer goroutine only.
type lazyWriter struct {
	w  io.Writer
	bw *bufio.Writer
}

func (l *lazyWriter) take() *bufio.Writer {
	if l.bw == nil {
		l.bw = writeBufPool.Get().(*bufio.Writer)
		l.bw.Reset(l.w)
	}
	return l.bw
}

func (l *lazyWriter) Write(p []byte) (int, error) { return l.take().Write(p) }

func (l *lazyWriter) WriteString(s string) (int, error) { return l.take().WriteString(s) }

// Flush writes what is buffered and gives the buffer back.
func (l *lazyWriter) Flush() error {
	if l.bw == nil {
		return nil
	}
	err := l.bw.Flush()
	l.bw.Reset(nil) // drops what a failed flush left, and the socket
	writeBufPool.Put(l.bw)
	l.bw = nil
	return err
}
